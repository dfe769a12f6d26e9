"""Parse what the lab's /init writes to the data serial port (pure; no QEMU needed).

The stream is: noise, BEGIN, FACT lines, the helper's JSON lines (one clock_cost line,
then one boot line per plan line), ERROR lines (the helper's stderr), END rc=N.
Lines may end in CR LF (the tty layer) and the last line may be cut short when the
guest dies; a line that is not valid JSON is kept in `garbage`, never dropped silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .initramfs import BEGIN, END, ERROR, FACT

# Keys the helper adds to a boot line that are not part of a sample's result.
_LINE_ONLY = ("type", "label", "recipe", "repeat")


@dataclass
class LabStream:
    begun: bool = False
    ended: bool = False
    rc: int | None = None
    facts: dict[str, str] = field(default_factory=dict)
    clock: dict | None = None
    boots: list[dict] = field(default_factory=list)
    results: list[dict] = field(default_factory=list)    # pyvmm.lab.experiments.inside job results
    errors: list[str] = field(default_factory=list)
    garbage: list[str] = field(default_factory=list)
    _partial: str = ""

    def feed(self, text: str) -> list[dict]:
        """Add received text; returns the boot lines completed by it."""
        text = self._partial + text
        lines = text.split("\n")
        self._partial = lines.pop()
        new = []
        for raw in lines:
            b = self._line(raw.replace("\r", "").replace("\0", ""))
            if b is not None:
                new.append(b)
        return new

    def close(self) -> None:
        """End of stream: a trailing partial line is reported as garbage."""
        if self._partial.strip():
            self._line(self._partial.replace("\r", ""))
        self._partial = ""

    def _line(self, line: str) -> dict | None:
        s = line.strip()
        if not self.begun:
            if s == BEGIN:
                self.begun = True
            return None
        if not s or self.ended:
            return None
        if s.startswith(END):
            self.ended = True
            rest = s[len(END):].strip()
            if rest.startswith("rc="):
                try:
                    self.rc = int(rest[3:])
                except ValueError:
                    self.garbage.append(s)
            return None
        if s.startswith(FACT + " "):
            key, _, val = s[len(FACT) + 1:].partition(" ")
            self.facts[key] = val.strip()
            return None
        if s.startswith(ERROR + " "):
            self.errors.append(s[len(ERROR) + 1:])
            return None
        try:
            obj = json.loads(s)
        except json.JSONDecodeError:
            self.garbage.append(s)
            return None
        if not isinstance(obj, dict):
            self.garbage.append(s)
        elif obj.get("type") == "clock_cost":
            self.clock = {"wall_read_ns": obj["wall_read_ns"], "cpu_read_ns": obj["cpu_read_ns"]}
        elif obj.get("type") == "boot":
            self.boots.append(obj)
            return obj
        elif obj.get("type") == "result":
            self.results.append(obj)
            return obj
        else:
            self.garbage.append(s)
        return None


def plan_label(seq: int | None, recipe: str, n: int) -> str:
    """Plan labels carry the sweep cell: 'SEQ/RECIPE/N', or 'warmup/RECIPE/N'."""
    head = "warmup" if seq is None else str(seq)
    return f"{head}/{recipe}/{n}"


def parse_label(label: str) -> tuple[int | None, str, int]:
    head, recipe, n = label.rsplit("/", 2) if label.count("/") >= 2 else ("", "", "")
    try:
        seq = None if head == "warmup" else int(head)
        return seq, recipe, int(n)
    except ValueError:
        raise ValueError(f"bad plan label {label!r}: expected SEQ/RECIPE/N") from None


def boot_to_sample(line: dict) -> dict | None:
    """A helper boot line as a run.json sample (None for a warm-up boot)."""
    seq, recipe, n = parse_label(line["label"])
    if seq is None:
        return None
    result = {k: v for k, v in line.items() if k not in _LINE_ONLY}
    return {"recipe": recipe, "n": n, "driver": "c", "seq": seq, "result": result}
