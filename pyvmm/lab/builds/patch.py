"""The project's KVM patches (pure): the INDEX (name, series, what it does), each patch's
files, digest and Kconfig lines, the scope a module rebuild allows, and the message
for a patch that does not apply. The patches themselves are in patches/."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, replace

from ...errors import LabError
from ..arch import X86_64, Arch

PATCH_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "patches")


@dataclass(frozen=True)
class Patch:
    name: str
    series: tuple[str, ...]
    summary: str
    text: str = ""              # the diff with its header; "" changes nothing
    # (series, diff) of NAME.SERIES.patch files: a change written for each series
    per_series: tuple[tuple[str, str], ...] = ()

    def for_series(self, series: str) -> "Patch":
        """The patch as written for `series` (NAME.SERIES.patch), else itself."""
        for s, text in self.per_series:
            if s == series:
                return replace(self, text=text)
        return self

    def whole_kernel(self) -> bool:
        """Whether any version of it changes files outside what a module rebuild
        takes (then only a whole-kernel build can apply it)."""
        texts = [self.text] + [t for _, t in self.per_series]
        return any(not in_module_scope(f) for t in texts
                   for f in replace(self, text=t).files())

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:12]

    def files(self) -> list[str]:
        """Paths the diff changes (from its '+++ b/PATH' lines)."""
        out = []
        for line in self.text.splitlines():
            if line.startswith("+++ "):
                path = line[4:].split("\t")[0].strip()
                path = path.split("/", 1)[1] if "/" in path else path
                if path not in out:
                    out.append(path)
        return out

    def has_diff(self) -> bool:
        return bool(self.files())

    def config(self) -> dict[str, str]:
        """Kconfig options the patch turns on for the rebuilt modules, from 'Config:
        CONFIG_X=y' lines in its header (before the diff)."""
        out = {}
        for line in self.text.split("\ndiff ", 1)[0].splitlines():
            m = re.match(r"Config:\s*(CONFIG_\w+)=(y)\s*$", line)
            if m:
                out[m.group(1)] = m.group(2)
            elif line.startswith("Config:"):
                raise LabError(f"patch {self.name}: bad line {line!r}: only 'Config: "
                               "CONFIG_NAME=y' is supported")
        return out


def parse_index(text: str) -> list[tuple[str, tuple[str, ...], str]]:
    """INDEX lines 'name series[,series] summary...' ('#' starts a comment)."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 2)
        if len(parts) < 3:
            raise LabError(f"patches/INDEX line {n}: expected 'name series summary', got "
                           f"{line!r}")
        out.append((parts[0], tuple(parts[1].split(",")), parts[2]))
    return out


def load_patches(folder: str = PATCH_DIR) -> dict[str, Patch]:
    with open(os.path.join(folder, "INDEX")) as f:
        index = parse_index(f.read())
    out = {}
    for name, series, summary in index:
        path = os.path.join(folder, f"{name}.patch")
        text = open(path).read() if os.path.exists(path) else ""
        per = []
        for s in series:
            p = os.path.join(folder, f"{name}.{s}.patch")
            if os.path.exists(p):
                with open(p) as f:
                    per.append((s, f.read()))
        if not text and per:
            text = per[0][1]
        out[name] = Patch(name, series, summary, text, tuple(per))
    return out


def get_patch(name: str, folder: str = PATCH_DIR) -> Patch:
    patches = load_patches(folder)
    if name not in patches:
        raise LabError(f"unknown KVM patch '{name}': the project has "
                       f"{', '.join(patches) or 'none'} (see pyvmm/lab/builds/patches/INDEX)")
    return patches[name]


def in_module_scope(path: str, arch: Arch = X86_64) -> bool:
    return any(path == s or path.startswith(s + "/") for s in arch.source_subset)


def check_patch_scope(patch: Patch, arch: Arch = X86_64) -> None:
    outside = [p for p in patch.files() if not in_module_scope(p, arch)]
    if outside:
        raise LabError(f"patch {patch.name} changes {', '.join(outside)}: a module rebuild "
                       f"takes only {', '.join(arch.source_subset)}; build the whole kernel "
                       f"instead (a variant with @hzN, e.g. 7.3+{patch.name}@hz250)")


def patch_failure(output: str, patch: str) -> str:
    """One message naming the file and hunk that did not apply, from `patch` output."""
    cur, failed = None, []
    for line in output.splitlines():
        m = re.match(r"(?:checking|patching) file (\S+)", line)
        if m:
            cur = m.group(1)
        m = re.match(r"Hunk #(\d+) FAILED at (\d+)", line)
        if m:
            failed.append(f"{cur}: hunk #{m.group(1)} (at line {m.group(2)})")
        m = re.search(r"can't find file to patch|No file to patch", line)
        if m:
            failed.append(f"{cur or 'a file'}: not in the source")
    if not failed:
        last = output.strip().splitlines()[-1:] or ["no output"]
        return f"patch {patch} does not apply: {last[0]}"
    return f"patch {patch} does not apply: " + "; ".join(failed)
