"""Static check of a KVM build: does kvm_io_bus_register_dev wait for a grace period?

Before Linux 6.18 the function ends by publishing the new bus and calling
synchronize_srcu_expedited() before freeing the old one; from 6.18 the old bus is freed
after a grace period without waiting. The check disassembles the function with objdump
and lists what it calls: in a module the calls show up as relocations, in a linked
image (vmlinux) as call targets.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

from .kernels import LabError, decompress_module

FUNCTION = "kvm_io_bus_register_dev"
WAIT_SYMBOL = "synchronize_srcu_expedited"
# Other ways a grace period could be waited for or deferred, reported when seen.
GRACE_SYMBOLS = ("synchronize_srcu", "synchronize_srcu_expedited", "synchronize_rcu",
                 "synchronize_rcu_expedited", "call_srcu", "call_rcu", "kvfree_call_rcu",
                 "kfree_call_rcu", "srcu_barrier")
_RELOC = re.compile(r"R_X86_64_(?:PLT32|PC32|32S?|64)\s+([A-Za-z_][\w.]*)")
_CALL = re.compile(r"\bcall\w*\s+[0-9a-f]+\s+<([A-Za-z_][\w.]*)(?:\+0x[0-9a-f]+)?>")


def function_calls(disassembly: str, function: str = FUNCTION) -> list[str] | None:
    """Symbols called or referenced from `function` in `objdump -d -r` output, in order of
    first use; None when the function is not in the listing."""
    lines = disassembly.splitlines()
    start = next((i for i, l in enumerate(lines) if l.rstrip().endswith(f"<{function}>:")), None)
    if start is None:
        return None
    seen: list[str] = []
    for line in lines[start + 1:]:
        if not line.strip() or re.match(r"^[0-9a-f]+ <.+>:$", line.strip()):
            break
        for rx in (_RELOC, _CALL):
            for m in rx.finditer(line):
                sym = m.group(1)
                if sym not in seen and sym != function:
                    seen.append(sym)
    return seen


def classify(calls: list[str]) -> dict:
    waits = WAIT_SYMBOL in calls
    grace = [s for s in calls if s in GRACE_SYMBOLS]
    if waits:
        behaviour = "sync"
        summary = (f"{FUNCTION} calls {WAIT_SYMBOL}: every registration waits for a grace "
                   "period (pre-6.18)")
    else:
        behaviour = "deferred"
        extra = f" (grace-period calls: {', '.join(grace)})" if grace else ""
        summary = (f"{FUNCTION} does not call {WAIT_SYMBOL}{extra}: the old bus is freed "
                   "without waiting (6.18+)")
    return {"function": FUNCTION, "calls_wait": waits, "grace_calls": grace,
            "behaviour": behaviour, "summary": summary}


def check(path: str) -> dict:
    """Run the check on a kvm.ko (plain or compressed) or a vmlinux with symbols."""
    if not os.path.isfile(path):
        raise LabError(f"{path} does not exist: give the path of kvm.ko (or kvm.ko.xz)")
    if not shutil.which("objdump"):
        raise LabError("objdump not found: apt-get install binutils")
    tmp = None
    target = path
    if path.endswith((".xz", ".gz", ".zst")):
        fd, tmp = tempfile.mkstemp(suffix=".ko")
        with os.fdopen(fd, "wb") as f:
            f.write(decompress_module(path))
        target = tmp
    try:
        with open(target, "rb") as f:
            if f.read(4) != b"\x7fELF":
                raise LabError(f"{path} is not an ELF file: give kvm.ko from a kernel build or "
                               "package")
        p = subprocess.run(["objdump", "-d", "-r", "--no-show-raw-insn", target],
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise LabError(f"objdump failed on {path}: {p.stderr.strip()[:300]}")
    finally:
        if tmp:
            os.unlink(tmp)
    calls = function_calls(p.stdout)
    if calls is None:
        raise LabError(f"{path} has no {FUNCTION}: is it kvm.ko (the KVM core module)?")
    out = classify(calls)
    out["path"] = os.path.abspath(path)
    out["calls"] = calls
    return out
