"""Boot recipes: ordered steps such as 'vm,mem,ioev:N,vcpu:1,run'.

Parsing and validation live in the C helper (bb_parse_recipe) so the Python VMM, the
in-process C helper and the standalone executable accept exactly the same language.
A template may use the letter N for the swept registration count.
"""

from __future__ import annotations

from .vmm.record import Record
from .errors import PyvmmError, RecipeError  # noqa: F401 (RecipeError re-exported)

OPS = {1: "vm", 2: "mem", 3: "ioev", 4: "eexist", 5: "deassign", 6: "vcpu", 7: "run",
       8: "memslot", 9: "teardown", 10: "gic"}
TARGETS = {0: "halt", 2: "probe", 3: "rung"}

# Named recipes. N is the registration count being swept.
PRESETS = {
    # Registrations before the vCPU exists (a VMM that wires devices up front).
    "before-vcpu": "vm,mem,ioev:N,vcpu:1,run:rung,memslot,run",
    # Registrations while the guest boots: at its 'device probe' marker (the guest
    # enabling virtio devices), then a BAR-like memslot change, as a real boot does.
    "during-boot": "vm,mem,vcpu:1,run:probe,ioev:N,run:rung,memslot,run",
    # Registrations after vCPU creation but before the first KVM_RUN.
    "after-vcpu": "vm,mem,vcpu:1,ioev:N,run:rung,memslot,run",
    # Controls for the verdict: the same ioctl rejected with EEXIST (no bus change),
    # and deassign (always waits for a grace period).
    "control": "vm,mem,ioev:N,eexist:N,deassign:N",
}


class Step(Record):
    """One recipe step: op, its count, and for run the marker it stops at."""

    __slots__ = ("op", "count", "target")

    def __init__(self, op: str, count: int = 1, target: str = "halt"):
        self.op, self.count, self.target = op, count, target

    def __str__(self) -> str:
        if self.op == "run":
            return f"run:{self.target}"
        if self.op in ("vm", "mem", "gic"):
            return self.op
        return f"{self.op}:{self.count}"


class Recipe(Record):
    """A parsed recipe: its canonical text and its steps."""

    __slots__ = ("text", "steps")

    def __init__(self, text: str, steps: tuple[Step, ...]):
        self.text, self.steps = text, steps

    def __str__(self) -> str:
        return self.text

    @property
    def registrations(self) -> int:
        return sum(s.count for s in self.steps if s.op == "ioev")


def native_module():
    try:
        from . import _native
    except ImportError as e:  # pragma: no cover - only when the package is not built
        raise PyvmmError(f"the C helper pyvmm._native is not built ({e}): install pyvmm with "
                         f"'make run' or 'pip install .'") from None
    return _native


def expand(template: str, n: int) -> str:
    """Substitute the swept count for N (also resolves preset names)."""
    text = PRESETS.get(template, template)
    return ",".join(":".join(str(int(n)) if part.strip() == "N" else part
                             for part in step.split(":"))
                    for step in text.split(","))


def _uses_n(text: str) -> bool:
    return any(part.strip() == "N" for step in text.split(",") for part in step.split(":"))


def parse(text: str, n: int | None = None) -> Recipe:
    """Parse and validate a recipe (or preset name). Raises RecipeError with the reason."""
    text = PRESETS.get(text, text)
    if _uses_n(text):
        if n is None:
            raise RecipeError(f"recipe '{text}' uses N but no count was given")
        text = expand(text, n)
    nat = native_module()
    ffi, lib = nat.ffi, nat.lib
    rec = ffi.new("struct bb_recipe *")
    err = ffi.new("char[]", lib.BB_ERR_LEN)
    if lib.bb_parse_recipe(text.encode(), rec, err, lib.BB_ERR_LEN) != 0:
        hint = ""
        if "," not in text and ":" not in text:
            hint = (f"; it is no preset either: the presets are {', '.join(PRESETS)}, or give "
                    "steps such as vm,mem,ioev:N,vcpu:1,run")
        raise RecipeError(f"bad recipe '{text}': {ffi.string(err).decode()}{hint}")
    steps = tuple(Step(OPS[rec.steps[i].op], rec.steps[i].count,
                       TARGETS.get(rec.steps[i].target, "halt"))
                  for i in range(rec.nsteps))
    buf = ffi.new("char[]", 1024)
    lib.bb_format_recipe(rec, buf, 1024)
    return Recipe(ffi.string(buf).decode(), steps)
