"""Typed vCPU exits and a pure decoder of struct kvm_run.

decode() reads only the bytes it is given, so unit tests can feed it hand-made
kvm_run images; Vcpu.run() feeds it the live mmap'ed page.
"""

from __future__ import annotations

import struct

from . import abi
from .record import Record
from .abi import ffi


class Exit(Record):
    """Base class of every exit (a Record: built once per exit, so kept cheap)."""

    __slots__ = ()


class Io(Exit):
    """Port I/O. data: for OUT, what the guest wrote (size * count bytes); for IN, b"".
    data_offset: where the data lives in the run page (answer an IN there)."""

    __slots__ = ("port", "is_write", "size", "count", "data", "data_offset")

    def __init__(self, port: int, is_write: bool, size: int, count: int, data: bytes,
                 data_offset: int):
        self.port = port
        self.is_write = is_write
        self.size = size
        self.count = count
        self.data = data
        self.data_offset = data_offset

    @property
    def value(self) -> int:
        """The first element written by an OUT, as an integer."""
        return int.from_bytes(self.data[: self.size], "little")


class Mmio(Exit):
    """MMIO. data: for writes, the bytes written; for reads, b""."""

    __slots__ = ("addr", "is_write", "length", "data")

    def __init__(self, addr: int, is_write: bool, length: int, data: bytes):
        self.addr = addr
        self.is_write = is_write
        self.length = length
        self.data = data

    @property
    def value(self) -> int:
        return int.from_bytes(self.data, "little")


class Hlt(Exit):
    __slots__ = ()


class Shutdown(Exit):
    """Triple fault or similar: the guest cannot continue."""

    __slots__ = ()


class FailEntry(Exit):
    __slots__ = ("hardware_entry_failure_reason", "cpu")

    def __init__(self, hardware_entry_failure_reason: int, cpu: int):
        self.hardware_entry_failure_reason = hardware_entry_failure_reason
        self.cpu = cpu


class InternalError(Exit):
    __slots__ = ("suberror", "data")

    SUBERRORS = {1: "EMULATION", 2: "SIMUL_EX", 3: "DELIVERY_EV", 4: "UNEXPECTED_EXIT_REASON"}

    def __init__(self, suberror: int, data: tuple[int, ...]):
        self.suberror = suberror
        self.data = data

    @property
    def suberror_name(self) -> str:
        return self.SUBERRORS.get(self.suberror, f"suberror {self.suberror}")


class Interrupted(Exit):
    """KVM_RUN returned EINTR (a signal or immediate_exit): not an error."""

    __slots__ = ()


class SystemEvent(Exit):
    __slots__ = ("type", "data")

    TYPES = {1: "SHUTDOWN", 2: "RESET", 3: "CRASH", 4: "WAKEUP", 5: "SUSPEND", 6: "SEV_TERM"}

    def __init__(self, type: int, data: tuple[int, ...]):
        self.type = type
        self.data = data

    @property
    def type_name(self) -> str:
        return self.TYPES.get(self.type, f"type {self.type}")


class MemoryFault(Exit):
    __slots__ = ("flags", "gpa", "size")

    def __init__(self, flags: int, gpa: int, size: int):
        self.flags = flags
        self.gpa = gpa
        self.size = size


class Unknown(Exit):
    __slots__ = ("reason", "hardware_exit_reason")

    def __init__(self, reason: int, hardware_exit_reason: int):
        self.reason = reason
        self.hardware_exit_reason = hardware_exit_reason

    @property
    def reason_name(self) -> str:
        return abi.EXIT_REASONS.get(self.reason, f"exit reason {self.reason}")


RUN_SIZE = ffi.sizeof("struct kvm_run")


def _fields(fmt: str, *paths: str) -> tuple[int, struct.Struct]:
    """A struct.Struct reading kvm_run fields `paths` (in order) with `fmt`, checked
    against the cffi layout so the format cannot drift from the declarations."""
    offs = [ffi.offsetof("struct kvm_run", *p.split(".")) for p in paths]
    pos = offs[0]
    codes, digits = [], ""
    for ch in fmt[1:]:
        if ch.isdigit():
            digits += ch
        else:
            codes.append(digits + ch)
            digits = ""
    fields = iter(zip(paths, offs))
    for code in codes:
        if not code.endswith("x"):          # padding reads no field
            path, off = next(fields)
            if pos != off:
                raise ImportError(f"kvm_run layout: {path} is at {off}, format {fmt} puts "
                                  f"it at {pos}")
        pos += struct.calcsize("<" + code)
    return offs[0], struct.Struct(fmt)


# The exit reason and the io fields in one read (a boot's exits are mostly port I/O).
_GAP = ffi.offsetof("struct kvm_run", "io") - ffi.offsetof("struct kvm_run", "exit_reason") - 4
REASON_IO_AT, REASON_IO = _fields(f"<I{_GAP}xBBHIQ", "exit_reason", "io.direction",
                                    "io.size", "io.port", "io.count", "io.data_offset")
_MMIO_AT, _MMIO = _fields("<Q8sIB", "mmio.phys_addr", "mmio.data", "mmio.len",
                          "mmio.is_write")
_KVM_EXIT_IO, _KVM_EXIT_MMIO, _KVM_EXIT_HLT = abi.KVM_EXIT_IO, abi.KVM_EXIT_MMIO, \
    abi.KVM_EXIT_HLT
_HLT = Hlt()


def decode(raw, page=None) -> Exit:
    """Decode a kvm_run image into a typed exit.

    `raw` is either bytes-like (at least sizeof(struct kvm_run) long, plus the I/O data
    area for IO exits) or a cffi `struct kvm_run *`. `page` is the buffer holding the whole
    run page when `raw` is a pointer (used for IO data, which lives past the struct).
    """
    if isinstance(raw, ffi.CData):
        if page is None:
            page = ffi.buffer(ffi.cast("char *", raw), RUN_SIZE)
        return decode_page(page)
    if len(raw) < RUN_SIZE:
        raise ValueError(f"kvm_run image is {len(raw)} bytes, need at least {RUN_SIZE}")
    return decode_page(raw)


def decode_page(page) -> Exit:
    """Decode the run page `page` (any buffer: the live mapping or a copy). Port I/O,
    MMIO and HLT, the exits a boot makes, are read with struct; the rest through cffi."""
    reason, direction, size, port, count, off = REASON_IO.unpack_from(page, REASON_IO_AT)
    if reason == _KVM_EXIT_IO:
        if direction == 1:          # KVM_EXIT_IO_OUT
            n = size * count
            if off + n > len(page):
                raise ValueError(f"IO data at {off:#x}+{n} lies outside the run page")
            return Io(port, True, size, count, bytes(page[off:off + n]), off)
        return Io(port, False, size, count, b"", off)
    if reason == _KVM_EXIT_MMIO:
        addr, data, length, is_write = _MMIO.unpack_from(page, _MMIO_AT)
        return Mmio(addr, bool(is_write), length, data[:min(length, 8)] if is_write else b"")
    if reason == _KVM_EXIT_HLT:
        return _HLT
    return _decode_rare(ffi.from_buffer("struct kvm_run *", page), reason)


def _decode_rare(run, reason: int) -> Exit:
    if reason == abi.KVM_EXIT_SHUTDOWN:
        return Shutdown()
    if reason == abi.KVM_EXIT_FAIL_ENTRY:
        f = run.fail_entry
        return FailEntry(f.hardware_entry_failure_reason, f.cpu)
    if reason == abi.KVM_EXIT_INTERNAL_ERROR:
        i = run.internal
        nd = min(i.ndata, 16)
        return InternalError(i.suberror, tuple(i.data[k] for k in range(nd)))
    if reason == abi.KVM_EXIT_INTR:
        return Interrupted()
    if reason == abi.KVM_EXIT_SYSTEM_EVENT:
        s = run.system_event
        nd = min(s.ndata, 16)
        return SystemEvent(s.type, tuple(s.data[k] for k in range(nd)))
    if reason == abi.KVM_EXIT_MEMORY_FAULT:
        m = run.memory_fault
        return MemoryFault(m.flags, m.gpa, m.size)
    return Unknown(reason, run.hw.hardware_exit_reason)


def describe(exit: Exit) -> str:
    """A short human description of an exit."""
    if isinstance(exit, Io):
        d = "out" if exit.is_write else "in"
        return f"IO {d} port {exit.port:#x} size {exit.size}" + (
            f" value {exit.value:#x}" if exit.is_write else "")
    if isinstance(exit, Mmio):
        d = "write" if exit.is_write else "read"
        return f"MMIO {d} {exit.addr:#x} len {exit.length}"
    if isinstance(exit, InternalError):
        return f"internal error {exit.suberror_name} data {[hex(x) for x in exit.data]}"
    if isinstance(exit, FailEntry):
        return (f"entry failed: hardware reason {exit.hardware_entry_failure_reason:#x} "
                f"on cpu {exit.cpu}")
    if isinstance(exit, SystemEvent):
        return f"system event {exit.type_name}"
    if isinstance(exit, MemoryFault):
        return f"memory fault at {exit.gpa:#x} size {exit.size:#x} flags {exit.flags:#x}"
    if isinstance(exit, Unknown):
        return f"unhandled {exit.reason_name} (hardware reason {exit.hardware_exit_reason:#x})"
    return type(exit).__name__.lower()
