"""Guest memory: host mappings that back memory slots.

A GuestMemory owns one host mapping (anonymous, or of a guest_memfd). It is owned by
the Vm and outlives any slot that maps it: the Vm unmaps memory only after the VM fd
is closed, so KVM never holds a slot pointing at unmapped host memory.
"""

from __future__ import annotations

import mmap as _mmap
import os

from . import abi
from .record import Record
from .abi import ffi
from ..errors import PyvmmError

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_PROT_RW = _mmap.PROT_READ | _mmap.PROT_WRITE
_ANONYMOUS = _mmap.MAP_PRIVATE | _mmap.MAP_ANONYMOUS | 0x4000     # 0x4000: MAP_NORESERVE


class GuestMemory:
    """A host mapping of `size` bytes, anonymous unless `fd` is given (MAP_SHARED of fd)."""

    def __init__(self, size: int, fd: int | None = None, offset: int = 0):
        if size <= 0 or size % PAGE_SIZE:
            raise PyvmmError(f"guest memory size {size:#x} must be a positive multiple of "
                             f"the page size ({PAGE_SIZE:#x})")
        if fd is None:
            address = abi.mmap(size, _PROT_RW, _ANONYMOUS, -1, 0)
        else:
            address = abi.mmap(size, _PROT_RW, _mmap.MAP_SHARED, fd, offset)
        if address < 0:
            raise PyvmmError(f"mmap of {size:#x} bytes of guest memory failed: "
                             f"{os.strerror(-address)}")
        self.size = size
        self.fd = fd
        self.host_addr = address
        self._ptr = ffi.cast("char *", address)

    @property
    def closed(self) -> bool:
        return self._ptr is None

    def _check(self, offset: int, length: int) -> None:
        if self._ptr is None:
            raise PyvmmError("guest memory is already unmapped")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise PyvmmError(f"access at {offset:#x}+{length:#x} is outside guest memory "
                             f"of size {self.size:#x}")

    def write(self, offset: int, data: bytes) -> None:
        n = len(data)
        ptr = self._ptr
        if ptr is None or offset < 0 or offset + n > self.size:
            self._check(offset, n)          # raises, saying which
        ffi.memmove(ptr + offset, data, n)

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return ffi.buffer(self._ptr + offset, length)[:]

    def write_u64(self, offset: int, value: int) -> None:
        self.write(offset, value.to_bytes(8, "little"))

    def read_u64(self, offset: int) -> int:
        return int.from_bytes(self.read(offset, 8), "little")

    def close(self) -> None:
        if self._ptr is not None:
            self._ptr = None
            abi.munmap(self.host_addr, self.size)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class MemorySlot(Record):
    """Bookkeeping for one KVM memory slot. `offset` is where the slot starts within
    `memory`; `guest_memfd` is the bound guest_memfd's fd, if any."""

    __slots__ = ("slot", "gpa", "size", "memory", "flags", "offset", "guest_memfd",
                 "guest_memfd_offset")

    def __init__(self, slot: int, gpa: int, size: int, memory: GuestMemory, flags: int = 0,
                 offset: int = 0, guest_memfd: int | None = None, guest_memfd_offset: int = 0):
        self.slot, self.gpa, self.size, self.memory = slot, gpa, size, memory
        self.flags, self.offset = flags, offset
        self.guest_memfd, self.guest_memfd_offset = guest_memfd, guest_memfd_offset

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self.gpa <= gpa and gpa + length <= self.end
