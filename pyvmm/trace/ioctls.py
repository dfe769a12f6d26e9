"""KVM ioctls by number (pure): the name of an ioctl given its number and the kind of fd it
was issued on, and what its argument says (the struct words a uprobe on libc's ioctl
read at the call, or the argument itself when it is a value).

KVM numbers its ioctls with type KVMIO (0xAE); a number's direction and nr name it, and a
few (direction, nr) pairs mean one thing on a VM fd and another on a vCPU fd, which the
fd's kind settles. The table is kvm_ioctls.txt beside this module.
"""

from __future__ import annotations

import functools
import os

from ..vmm.abi import (KVM_IOEVENTFD_FLAG_DATAMATCH as IOEVENTFD_DATAMATCH,
                       KVM_IOEVENTFD_FLAG_DEASSIGN as IOEVENTFD_DEASSIGN,
                       KVM_IOEVENTFD_FLAG_PIO as IOEVENTFD_PIO,
                       KVM_IRQFD_FLAG_DEASSIGN as IRQFD_DEASSIGN, KVM_MEM_GUEST_MEMFD,
                       KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY, KVMIO)

_DIRS = {0: "-", 1: "w", 2: "r", 3: "rw"}
TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kvm_ioctls.txt")

# struct kvm_userspace_memory_region flags, by name (the numbers are the ABI's)
MEM_FLAGS = {KVM_MEM_LOG_DIRTY_PAGES: "LOG_DIRTY_PAGES", KVM_MEM_READONLY: "READONLY",
             KVM_MEM_GUEST_MEMFD: "GUEST_MEMFD"}


@functools.lru_cache(maxsize=1)
def table() -> dict[tuple[str, int], list[tuple[str, str]]]:
    """(direction, nr) -> [(name, fd kind), ...] from kvm_ioctls.txt."""
    out: dict[tuple[str, int], list[tuple[str, str]]] = {}
    with open(TABLE_PATH) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, d, nr, kind = line.split()
            out.setdefault((d, int(nr, 16)), []).append((name, kind))
    return out


def is_kvm(cmd: int) -> bool:
    return (cmd >> 8) & 0xFF == KVMIO


def split(cmd: int) -> tuple[str, int, int]:
    """(direction, nr, size) of an ioctl number."""
    return _DIRS[(cmd >> 30) & 3], cmd & 0xFF, (cmd >> 16) & 0x3FFF


def name(cmd: int, kind: str | None = None) -> str:
    """The ioctl's name, e.g. 'KVM_IOEVENTFD'; for a number not in the table
    'KVM ioctl 0xNN (dir, size S)'."""
    if not is_kvm(cmd):
        return f"ioctl {cmd:#x}"
    d, nr, size = split(cmd)
    found = table().get((d, nr), [])
    if kind is not None:
        same = [n for n, k in found if k == kind]
        if same:
            return same[0]
    if found:
        return found[0][0]
    return f"KVM ioctl {nr:#04x} ({d}, size {size})"


def listed_kind(cmd: int) -> str | None:
    """The fd kind the header lists the ioctl under (when the fd is not known)."""
    found = table().get(split(cmd)[:2], [])
    return found[0][1] if found else None


def _u32(x: int) -> int:
    return x & 0xFFFFFFFF


def _s32(x: int) -> int:
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x & 0x80000000 else x


def args(name_: str, arg: int, words: tuple[int, ...] | None) -> dict:
    """What the argument says, for the ioctls whose argument matters to a start-up:
    `arg` is the third ioctl argument, `words` the first four little-endian u64 of the
    struct it points to (None when no uprobe read them)."""
    if name_ in ("KVM_CREATE_VCPU",):
        return {"vcpu_id": arg}
    if name_ in ("KVM_CHECK_EXTENSION",):
        return {"cap": arg}
    if name_ in ("KVM_SET_TSS_ADDR",):
        return {"addr": arg}
    if words is None or len(words) < 4:
        return {}
    w0, w1, w2, w3 = words[:4]
    if name_ == "KVM_IOEVENTFD":
        flags = _u32(w3)
        out = {"addr": w1, "len": _u32(w2), "eventfd": _s32(w2 >> 32), "flags": flags,
               "deassign": bool(flags & IOEVENTFD_DEASSIGN), "pio": bool(flags & IOEVENTFD_PIO)}
        if flags & IOEVENTFD_DATAMATCH:
            out["datamatch"] = w0
        return out
    if name_ in ("KVM_SET_USER_MEMORY_REGION", "KVM_SET_USER_MEMORY_REGION2"):
        slot, flags = _u32(w0), w0 >> 32
        return {"slot": slot & 0xFFFF, "as_id": slot >> 16, "flags": flags, "gpa": w1,
                "size": w2, "delete": w2 == 0}
    if name_ in ("KVM_REGISTER_COALESCED_MMIO", "KVM_UNREGISTER_COALESCED_MMIO"):
        return {"addr": w0, "size": _u32(w1), "pio": bool(w1 >> 32)}
    if name_ == "KVM_IRQFD":
        flags = _u32(w1)
        return {"eventfd": _s32(w0), "gsi": w0 >> 32, "flags": flags,
                "deassign": bool(flags & IRQFD_DEASSIGN)}
    if name_ == "KVM_ENABLE_CAP":
        return {"cap": _u32(w0)}
    if name_ == "KVM_CREATE_DEVICE":
        return {"type": _u32(w0)}
    if name_ in ("KVM_SET_DEVICE_ATTR", "KVM_GET_DEVICE_ATTR", "KVM_HAS_DEVICE_ATTR"):
        return {"group": w0 >> 32, "attr": w1}
    if name_ == "KVM_SET_GSI_ROUTING":
        return {"entries": _u32(w0)}
    if name_ in ("KVM_IRQ_LINE", "KVM_IRQ_LINE_STATUS"):
        return {"irq": _u32(w0), "level": _u32(w0 >> 32)}
    if name_ == "KVM_SET_IDENTITY_MAP_ADDR":
        return {"addr": w0}
    return {}


def describe(name_: str, a: dict) -> str:
    """The arguments in a few words, as a table cell shows them."""
    if not a:
        return ""
    if name_ == "KVM_IOEVENTFD":
        what = "deassign" if a["deassign"] else "assign"
        space = "port" if a["pio"] else "MMIO"
        dm = f" datamatch {a['datamatch']:#x}" if "datamatch" in a else ""
        return f"{what} {space} {a['addr']:#x} len {a['len']}{dm}"
    if name_.startswith("KVM_SET_USER_MEMORY_REGION"):
        flags = "|".join(v for k, v in MEM_FLAGS.items() if a["flags"] & k)
        if a["delete"]:
            return f"delete slot {a['slot']}"
        return (f"slot {a['slot']} gpa {a['gpa']:#x} size {_size(a['size'])}"
                + (f" {flags}" if flags else ""))
    if name_ == "KVM_CREATE_VCPU":
        return f"vCPU {a['vcpu_id']}"
    if "COALESCED" in name_:
        return f"{'port' if a['pio'] else 'MMIO'} {a['addr']:#x} size {a['size']:#x}"
    if name_ == "KVM_IRQFD":
        return f"{'deassign' if a['deassign'] else 'assign'} gsi {a['gsi']}"
    if name_ in ("KVM_CHECK_EXTENSION", "KVM_ENABLE_CAP"):
        return f"cap {a['cap']}"
    if name_ == "KVM_CREATE_DEVICE":
        return f"type {a['type']}"
    if "DEVICE_ATTR" in name_:
        return f"group {a['group']} attr {a['attr']:#x}"
    if name_ == "KVM_SET_GSI_ROUTING":
        return f"{a['entries']} routes"
    if name_ in ("KVM_IRQ_LINE", "KVM_IRQ_LINE_STATUS"):
        return f"irq {a['irq']} level {a['level']}"
    if "addr" in a:
        return f"{a['addr']:#x}"
    return ""


def _size(n: int) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div and n % div == 0:
            return f"{n // div} {unit}"
    return f"{n:#x}"
