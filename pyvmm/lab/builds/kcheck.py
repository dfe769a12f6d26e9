"""Static check of a KVM build: does kvm_io_bus_register_dev wait for a grace period,
and if not, how is the old bus freed and will the next memslot change wait for it?

Before Linux 6.18 the function ends by publishing the new bus and calling
synchronize_srcu_expedited() before freeing the old one; from 6.18 the old bus is freed
from a call_srcu() callback (a normal grace period, which the next
synchronize_srcu_expedited() on kvm->srcu, e.g. in kvm_swap_active_memslots, waits
behind: the fix's regression). The proposed remedy uses call_srcu_expedited(); this
project's defer-free-expedited patch hands the bus to a work item instead. The check
disassembles the functions with objdump and lists what they call: in a module the calls
show up as relocations, in a linked image (vmlinux) as call targets. In a whole image
(a lab kernel build) it also reads SRCU itself: which entry points the image has
(call_srcu_expedited, ...) and whether srcu_gp_start_if_needed kicks a pending grace
period for an expedited request (this project's srcu-kick patch).
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import tempfile

from ...analysis.predictions import expected_stall, refreshed, runs_gp_at_once  # noqa: F401
from ...errors import LabError
from ..sources.elf import decompress_module

FUNCTION = "kvm_io_bus_register_dev"
MEMSLOT_FUNCTION = "kvm_swap_active_memslots"
WAIT_SYMBOL = "synchronize_srcu_expedited"
WAIT_SYMBOLS = ("synchronize_srcu_expedited", "synchronize_srcu")
WORK_SYMBOLS = ("queue_delayed_work_on", "queue_work_on", "mod_delayed_work_on",
                "schedule_work", "schedule_delayed_work")
# Other ways a grace period could be waited for or deferred, reported when seen.
GRACE_SYMBOLS = ("synchronize_srcu", "synchronize_srcu_expedited", "synchronize_rcu",
                 "synchronize_rcu_expedited", "call_srcu", "call_rcu", "kvfree_call_rcu",
                 "kfree_call_rcu", "srcu_barrier")
_RELOC = re.compile(r"R_X86_64_(?:PLT32|PC32|32S?|64)\s+([A-Za-z_][\w.]*)")
_CALL = re.compile(r"\bcall\w*\s+[0-9a-f]+\s+<([A-Za-z_][\w.]*)(?:\+0x[0-9a-f]+)?>")
# arm64 (a vmlinux of a lab build): bl, and b for a tail call, to a symbol
_A64_SYM = re.compile(r"\s(?:bl|b)\s+[0-9a-f]+\s+<([A-Za-z_][\w.]*)(?:\+0x[0-9a-f]+)?>")


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
        for rx in (_RELOC, _CALL, _A64_SYM):
            for m in rx.finditer(line):
                sym = m.group(1)
                if sym not in seen and sym != function:
                    seen.append(sym)
    return seen


SRCU_START = "srcu_gp_start_if_needed"      # where every SRCU request starts (vmlinux)
KICK_SYMBOL = "mod_delayed_work_on"         # the srcu-kick patch's call there
SRCU_API = ("call_srcu", "call_srcu_expedited", "synchronize_srcu_expedited",
            "srcu_expedite_current")


def classify(calls: list[str], memslot_calls: list[str] | None = None,
             srcu_calls: list[str] | None = None) -> dict:
    """What the calls of kvm_io_bus_register_dev (and of kvm_swap_active_memslots, and
    of SRCU's srcu_gp_start_if_needed in a whole image, when given) say about the
    build."""
    waits = any(w in calls for w in WAIT_SYMBOLS)
    grace = [s for s in calls if s in GRACE_SYMBOLS or s in ("call_srcu_expedited",
                                                              "srcu_expedite_current")]
    if waits:
        mechanism = next(w for w in WAIT_SYMBOLS if w in calls)
    elif "call_srcu_expedited" in calls:
        mechanism = "call_srcu_expedited"
    elif "call_srcu" in calls and "srcu_expedite_current" in calls:
        mechanism = "call_srcu + srcu_expedite_current"
    elif "call_srcu" in calls:
        mechanism = "call_srcu"
    elif any(w in calls for w in WORK_SYMBOLS):
        mechanism = "work item"
    else:
        mechanism = "none"
    memslot_waits = None if memslot_calls is None else any(
        w in memslot_calls for w in WAIT_SYMBOLS)
    kick = srcu_calls is not None and KICK_SYMBOL in srcu_calls
    stall = expected_stall(mechanism, memslot_waits, kick)
    if waits:
        behaviour = "sync"
        summary = (f"{FUNCTION} calls {mechanism}: every registration waits for a grace "
                   "period (pre-6.18)")
    else:
        behaviour = "deferred"
        how = {"call_srcu": "from a call_srcu callback (6.18+)",
               "call_srcu_expedited": "from a call_srcu_expedited callback (the proposed "
                                      "remedy)",
               "call_srcu + srcu_expedite_current": "from a call_srcu callback, its grace "
                                                    "period expedited at once with "
                                                    "srcu_expedite_current()",
               "work item": "by a work item",
               "none": "without a grace-period call in the function"}[mechanism]
        summary = f"{FUNCTION} does not wait: the old bus is freed {how}"
    if memslot_waits is not None:
        summary += (f"; {MEMSLOT_FUNCTION} " + ("synchronizes" if memslot_waits
                                                 else "does not synchronize"))
    if stall is True:
        summary += ", so the next memslot change waits for the pending grace period"
        if mechanism == "call_srcu + srcu_expedite_current":
            summary += (" (srcu_expedite_current() does not shorten the jiffy its work is "
                        "queued for)")
    if kick:
        summary += ("; SRCU runs a pending grace period's work at once for an expedited "
                    "request (srcu-kick), so nothing waits behind it")
    at_once = runs_gp_at_once(mechanism)
    if at_once:
        summary += ("; each registration's expedited grace period is worked at once by "
                    "this CPU's rcu_gp worker, so registration can pay it in wall time "
                    "(read as either verdict)")
    return {"function": FUNCTION, "calls_wait": waits, "grace_calls": grace,
            "behaviour": behaviour, "mechanism": mechanism,
            "memslot_swap_waits": memslot_waits, "stall_expected": stall,
            "gp_work_at_once": at_once,
            "srcu_kick": kick if srcu_calls is not None else None, "summary": summary}


# (path, size, mtime, objdump) -> a check already made in this process: a lab remedies
# run readies every kernel dozens of times, and disassembling a vmlinux takes seconds
_CHECKED: dict[tuple, dict] = {}


def check(path: str, objdump: str = "objdump") -> dict:
    """Run the check on a kvm.ko (plain or compressed) or a vmlinux with symbols
    (`objdump`: aarch64-linux-gnu-objdump for an arm64 build). The same unchanged file
    is disassembled once per process; each caller gets its own copy."""
    if not os.path.isfile(path):
        raise LabError(f"{path} does not exist: give the path of kvm.ko (or kvm.ko.xz)")
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, objdump)
    if key not in _CHECKED:
        _CHECKED[key] = _check(path, objdump)
    return copy.deepcopy(_CHECKED[key])


def _check(path: str, objdump: str) -> dict:
    if not shutil.which(objdump):
        raise LabError(f"{objdump} not found: apt-get install "
                       + ("binutils" if objdump == "objdump" else
                          "binutils-" + objdump.rsplit("-", 1)[0]))
    tmp = None
    target = path
    if path.endswith((".xz", ".gz", ".zst")):
        fd, tmp = tempfile.mkstemp(suffix=".ko")
        with os.fdopen(fd, "wb") as f:
            f.write(decompress_module(path))
        target = tmp
    try:
        with open(target, "rb") as f:
            head = f.read(64)
            if head[0x38:0x3c] == b"ARM\x64":
                raise LabError(f"{path} is an arm64 Image, which carries no symbols: "
                               "pyvmm lab kernel --arch arm64 reads them from the lab kernel "
                               "itself (or give the vmlinux of a build)")
            if head[:4] != b"\x7fELF":
                raise LabError(f"{path} is not an ELF file: give kvm.ko from a kernel build or "
                               "package")
        if objdump == "objdump" and head[4] == 2 and head[18:20] == b"\xb7\x00":
            objdump = "aarch64-linux-gnu-objdump"      # an arm64 ELF (e_machine 183)
            if not shutil.which(objdump):
                raise LabError(f"{path} is an arm64 ELF: disassembling it needs {objdump} "
                               "(apt-get install binutils-aarch64-linux-gnu)")
        p = subprocess.run([objdump, "-d", "-r", "--no-show-raw-insn", target],
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise LabError(f"objdump failed on {path}: {p.stderr.strip()[:300]}")
    finally:
        if tmp:
            os.unlink(tmp)
    calls = function_calls(p.stdout)
    if calls is None:
        raise LabError(f"{path} has no {FUNCTION}: is it kvm.ko (the KVM core module)?")
    memslot_calls = function_calls(p.stdout, MEMSLOT_FUNCTION)
    srcu_calls = function_calls(p.stdout, SRCU_START)     # only in a whole image
    out = classify(calls, memslot_calls, srcu_calls)
    if srcu_calls is not None:
        out["srcu_api"] = [f for f in SRCU_API if f"<{f}>:" in p.stdout]
    out["path"] = os.path.abspath(path)
    out["calls"] = calls
    out["memslot_calls"] = memslot_calls
    return out


# ---- an image without symbols (Debian's arm64 Image: KVM built in, System.map a stub) ---
#
# The lab kernel itself says where its functions are: /init reads /proc/kallsyms (in
# address order for the kernel proper) and reports, as FACT lines, the address of each
# symbol the check needs and of the symbol after each function it disassembles (its
# end). Addresses are taken relative to _stext, the first byte of the text segment, whose
# place in the Image file its EFI header gives (BaseOfCode: the header ends there, aligned
# to the 64 KiB segment alignment); so the check reads the code from the Image on the host
# whatever KASLR did. The calls it finds are PC-relative (bl, b), untouched by relocation.

KSYM_FACT = "ksym"
KSYM_NEXT_FACT = "ksym-next"
DISASSEMBLED = (FUNCTION, MEMSLOT_FUNCTION, SRCU_START)
ANCHOR = "_stext"
KSYMS_WANTED = tuple(dict.fromkeys((ANCHOR,) + DISASSEMBLED + GRACE_SYMBOLS + WORK_SYMBOLS
                                   + SRCU_API + (KICK_SYMBOL,)))


def kallsyms_awk() -> str:
    """The awk program /init runs on /proc/kallsyms: 'ksym NAME ADDR' for every wanted
    symbol, 'ksym-next NAME ADDR' with the address of the line after a disassembled
    function (the first symbol of each name only)."""
    wanted = " ".join(KSYMS_WANTED)
    funcs = " ".join(DISASSEMBLED)
    return ("BEGIN { n = split(\"" + wanted + "\", w, \" \"); for (i = 1; i <= n; i++) "
            "want[w[i]] = 1; m = split(\"" + funcs + "\", f, \" \"); for (i = 1; i <= m; i++) "
            "fn[f[i]] = 1 } "
            "NF < 3 || $4 != \"\" { next } "
            "pending != \"\" && $1 != paddr { print \"" + FACT_PREFIX + " " + KSYM_NEXT_FACT
            + ":\" pending \" \" $1; pending = \"\" } "
            "($3 in want) && !($3 in seen) { seen[$3] = 1; print \"" + FACT_PREFIX + " "
            + KSYM_FACT + ":\" $3 \" \" $1; if ($3 in fn) { pending = $3; paddr = $1 } }")


FACT_PREFIX = "PYVMM-LAB-FACT"


def ksyms_from_facts(facts: dict[str, str]) -> tuple[dict[str, int], dict[str, int]]:
    """(symbol -> address, disassembled function -> end address) from a lab boot's facts."""
    syms, ends = {}, {}
    for key, val in facts.items():
        kind, _, name = key.partition(":")
        try:
            addr = int(val.split()[0], 16)
        except (ValueError, IndexError):
            continue
        if kind == KSYM_FACT:
            syms[name] = addr
        elif kind == KSYM_NEXT_FACT:
            ends[name] = addr
    return syms, ends


_A64_CALL = re.compile(r"^\s*([0-9a-f]+):\s+[0-9a-f]{8}\s+(bl|b)\s+0x([0-9a-f]+)")


def stext_offset(image: str) -> int:
    """Where _stext sits in an arm64 Image file: the BaseOfCode of its PE/COFF header
    (the EFI stub's), or 64 KiB (the segment alignment) for an image without one."""
    import struct
    with open(image, "rb") as f:
        head = f.read(4096)
    if len(head) < 0x40 or head[0x38:0x3c] != b"ARM\x64":
        raise LabError(f"{image} is not an arm64 Image (no ARM\\x64 magic at 0x38)")
    pe = struct.unpack_from("<I", head, 0x3c)[0]
    if head[:2] == b"MZ" and 0 < pe < len(head) - 48 and head[pe:pe + 4] == b"PE\0\0":
        return struct.unpack_from("<I", head, pe + 24 + 20)[0]
    return 0x10000


def image_calls(image: str, syms: dict[str, int], ends: dict[str, int], function: str,
                objdump: str) -> list[str] | None:
    """The wanted symbols `function` calls (bl) or jumps to (b, a tail call), in order of
    first use; None when the kernel did not report the function (inlined, or absent)."""
    if function not in syms or function not in ends or ANCHOR not in syms:
        return None
    base = syms[ANCHOR] - stext_offset(image)        # the address of the file's byte 0
    start, end = syms[function] - base, ends[function] - base
    if not 0 <= start < end or end - start > 1 << 20:
        raise LabError(f"{function}: the kernel reported a range the image cannot hold "
                       f"({start:#x}..{end:#x} from the start of the image)")
    p = subprocess.run([objdump, "-D", "-b", "binary", "-m", "aarch64",
                        f"--adjust-vma={base:#x}", f"--start-address={base + start:#x}",
                        f"--stop-address={base + end:#x}", image],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise LabError(f"{objdump} failed on {image}: {p.stderr.strip()[:300]}")
    by_addr = {a: n for n, a in syms.items()}
    seen: list[str] = []
    for line in p.stdout.splitlines():
        m = _A64_CALL.match(line)
        if m:
            name = by_addr.get(int(m.group(3), 16))
            if name and name != function and name not in seen:
                seen.append(name)
    return seen


def check_image(image: str, facts: dict[str, str], objdump: str) -> dict:
    """The check on an Image without symbols, with the addresses the lab kernel reported
    (ksyms_from_facts); the same result as check()."""
    if not shutil.which(objdump):
        raise LabError(f"{objdump} not found: it disassembles the arm64 image (apt-get "
                       "install binutils-aarch64-linux-gnu)")
    syms, ends = ksyms_from_facts(facts)
    calls = image_calls(image, syms, ends, FUNCTION, objdump)
    if calls is None:
        raise LabError(f"the lab kernel did not report {FUNCTION} and its end in "
                       "/proc/kallsyms: kernel-check cannot read this image")
    memslot_calls = image_calls(image, syms, ends, MEMSLOT_FUNCTION, objdump)
    srcu_calls = image_calls(image, syms, ends, SRCU_START, objdump)
    out = classify(calls, memslot_calls, srcu_calls)
    out["srcu_api"] = [f for f in SRCU_API if f in syms]
    out["path"] = os.path.abspath(image)
    out["calls"] = calls
    out["memslot_calls"] = memslot_calls
    return out
