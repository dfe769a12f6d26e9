"""x86 set-up for the 64-bit entry: the GDT, the identity page tables of the low 4 GiB
and the sregs patch that puts a vCPU in long mode, worked out once per process (the KVM
selftests keep the same in lib/x86/processor.c). Vcpu.setup_long_mode applies them; the
floor and the Python runner write the tables once per VM."""

from __future__ import annotations

import functools
import struct

from . import layout
from .abi import ffi

# The 64-bit entry's GDT, selectors and control bits come from layout (protocol.inc).
GDT_CODE64, GDT_DATA = layout.GDT_CODE64, layout.GDT_DATA
SEL_CODE, SEL_DATA = layout.SEL_CODE, layout.SEL_DATA


@functools.lru_cache(maxsize=1)
def gdt_image() -> bytes:
    """The GDT the VMM writes at GDT_GPA for the 64-bit entry: null, code, data."""
    return struct.pack("<3Q", 0, GDT_CODE64, GDT_DATA)


@functools.lru_cache(maxsize=1)
def long_mode_tables() -> bytes:
    """The GDT page and the page tables that follow it, as one image for GDT_GPA."""
    return gdt_image().ljust(layout.PML4_GPA - layout.GDT_GPA, b"\0") + identity_page_tables()


def write_long_mode_tables(write) -> None:
    """Write the 64-bit entry's GDT and identity page tables with `write(gpa, data)`
    (Vm.write_guest, or GuestMemory.write on RAM at GPA 0): once per VM, one write."""
    write(layout.GDT_GPA, long_mode_tables())


@functools.lru_cache(maxsize=1)
def identity_page_tables() -> bytes:
    """PML4 + PDPT + four page directories mapping the low 4 GiB with 2 MiB pages,
    laid out to be written at layout.PML4_GPA."""
    pml4 = struct.pack("<Q", layout.PDPT_GPA | 0x3) + bytes(4096 - 8)
    pdpt = b"".join(struct.pack("<Q", (layout.PD_GPA + i * 4096) | 0x3) for i in range(4))
    pdpt += bytes(4096 - len(pdpt))
    pds = struct.pack("<2048Q", *(((i << 21) | 0x83) for i in range(2048)))
    return pml4 + pdpt + pds


@functools.lru_cache(maxsize=1)
def long_mode_sregs_patch() -> tuple[tuple[int, bytes], ...]:
    """What setup_long_mode changes in the struct kvm_sregs that KVM_GET_SREGS returned,
    as (offset, bytes) runs: the six segments (flat 64-bit code, flat data), the GDT,
    CR0, CR3, CR4 and EFER. Worked out once through cffi; applying it per vCPU is a few
    slice assignments instead of some forty attribute writes."""
    s = ffi.new("struct kvm_sregs *")
    code = s.cs
    code.base, code.limit, code.selector = 0, 0xFFFFFFFF, SEL_CODE
    code.type, code.present, code.dpl, code.db, code.s, code.l, code.g = 11, 1, 0, 0, 1, 1, 1
    for seg in (s.ds, s.es, s.fs, s.gs, s.ss):
        seg.base, seg.limit, seg.selector = 0, 0xFFFFFFFF, SEL_DATA
        seg.type, seg.present, seg.dpl, seg.db, seg.s, seg.l, seg.g = 3, 1, 0, 1, 1, 0, 1
    s.gdt.base, s.gdt.limit = layout.GDT_GPA, 3 * 8 - 1
    s.cr3 = layout.PML4_GPA
    s.cr4 = layout.LM_CR4
    s.cr0 = layout.LM_CR0
    s.efer = layout.LM_EFER
    buf = ffi.buffer(s)
    out = []
    for first, last in (("cs", "ss"), ("gdt", "gdt"), ("cr0", "cr0"), ("cr3", "cr4"),
                        ("efer", "efer")):
        start = ffi.offsetof("struct kvm_sregs", first)
        end = ffi.offsetof("struct kvm_sregs", last) + ffi.sizeof(getattr(s, last)) \
            if last in ("ss", "gdt") else ffi.offsetof("struct kvm_sregs", last) + 8
        out.append((start, bytes(buf[start:end])))
    return tuple(out)
