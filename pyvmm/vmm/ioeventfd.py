"""Ioeventfds: an eventfd bound to a guest address (KVM_IOEVENTFD), the struct that binds
it, and what a failed binding means. The VM (vm.py) makes and deassigns them."""

from __future__ import annotations

import errno
import os

from . import abi
from .abi import ffi

VALID_IOEVENTFD_LENGTHS = (0, 1, 2, 4, 8)


def ioeventfd_arg(efd: int, addr: int, length: int, pio: bool, datamatch: int | None,
                   deassign: bool):
    """A struct kvm_ioeventfd, from one initializer in field order (datamatch, addr, len,
    fd, flags)."""
    flags = abi.KVM_IOEVENTFD_FLAG_PIO if pio else 0
    if datamatch is not None:
        flags |= abi.KVM_IOEVENTFD_FLAG_DATAMATCH
    if deassign:
        flags |= abi.KVM_IOEVENTFD_FLAG_DEASSIGN
    return ffi.new("struct kvm_ioeventfd *", (datamatch or 0, addr, length, efd, flags))


class Ioeventfd:
    """An eventfd bound to a guest address by KVM_IOEVENTFD. Owns the eventfd."""

    __slots__ = ("vm", "efd", "addr", "length", "pio", "datamatch", "assigned")

    def __init__(self, vm, efd: int, addr: int, length: int, pio: bool,
                 datamatch: int | None):
        self.vm = vm
        self.efd = efd
        self.addr = addr
        self.length = length
        self.pio = pio
        self.datamatch = datamatch
        self.assigned = True

    def describe(self) -> str:
        space = "port" if self.pio else "MMIO"
        dm = f" datamatch {self.datamatch:#x}" if self.datamatch is not None else ""
        return f"{space} {self.addr:#x} len {self.length}{dm}"

    def count(self) -> int:
        """Read and reset the eventfd counter (0 if it never fired)."""
        try:
            return os.eventfd_read(self.efd)
        except BlockingIOError:
            return 0

    def deassign(self) -> None:
        """KVM_IOEVENTFD with KVM_IOEVENTFD_FLAG_DEASSIGN (waits for an SRCU grace period)."""
        if self.assigned:
            self.vm._ioeventfd_ioctl(self.efd, self.addr, self.length, self.pio,
                                     self.datamatch, deassign=True)
            self.assigned = False
            self.vm._ioeventfds.discard(self)

    def close(self) -> None:
        """Close the eventfd. KVM drops its binding when the VM goes away; closing the fd
        alone does not deassign."""
        if self.efd >= 0:
            os.close(self.efd)
            self.efd = -1
        self.vm._ioeventfds.discard(self)

def ioeventfd_hint(err: int, addr: int, length: int, pio: bool, datamatch: int | None) -> str:
    """What a failed KVM_IOEVENTFD means, for the KvmError message."""
    space = "port" if pio else "MMIO"
    where = f"{space} {addr:#x} len {length}"
    if err == errno.EEXIST:
        return f"an ioeventfd already covers {where}"
    if err == errno.EINVAL:
        if length not in VALID_IOEVENTFD_LENGTHS:
            return f"length {length} is invalid: use 0, 1, 2, 4 or 8"
        if length == 0 and (pio or datamatch is not None):
            return "length 0 is only valid for MMIO without datamatch"
        if addr + length < addr:
            return f"{where} wraps around the address space"
        return f"KVM rejected {where}"
    if err == errno.ENOENT:
        return f"no ioeventfd is assigned at {where} for this eventfd"
    if err == errno.ENOSPC:
        return "the KVM I/O bus is full (1000 in-kernel devices)"
    return ""
