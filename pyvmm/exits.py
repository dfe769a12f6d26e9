"""Typed vCPU exits and a pure decoder of struct kvm_run.

decode() reads only the bytes it is given, so unit tests can feed it hand-made
kvm_run images; Vcpu.run() feeds it the live mmap'ed page.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import abi
from .abi import ffi


@dataclass(frozen=True)
class Exit:
    """Base class of every exit."""


@dataclass(frozen=True)
class Io(Exit):
    port: int
    is_write: bool
    size: int
    count: int
    data: bytes          # for OUT: what the guest wrote (size * count bytes); for IN: b""
    data_offset: int

    @property
    def value(self) -> int:
        """The first element written by an OUT, as an integer."""
        return int.from_bytes(self.data[: self.size], "little")


@dataclass(frozen=True)
class Mmio(Exit):
    addr: int
    is_write: bool
    length: int
    data: bytes          # for writes: the bytes written; for reads: b""

    @property
    def value(self) -> int:
        return int.from_bytes(self.data, "little")


@dataclass(frozen=True)
class Hlt(Exit):
    pass


@dataclass(frozen=True)
class Shutdown(Exit):
    """Triple fault or similar: the guest cannot continue."""


@dataclass(frozen=True)
class FailEntry(Exit):
    hardware_entry_failure_reason: int
    cpu: int


@dataclass(frozen=True)
class InternalError(Exit):
    suberror: int
    data: tuple[int, ...]

    SUBERRORS = {1: "EMULATION", 2: "SIMUL_EX", 3: "DELIVERY_EV", 4: "UNEXPECTED_EXIT_REASON"}

    @property
    def suberror_name(self) -> str:
        return self.SUBERRORS.get(self.suberror, f"suberror {self.suberror}")


@dataclass(frozen=True)
class Interrupted(Exit):
    """KVM_RUN returned EINTR (a signal or immediate_exit): not an error."""


@dataclass(frozen=True)
class SystemEvent(Exit):
    type: int
    data: tuple[int, ...]

    TYPES = {1: "SHUTDOWN", 2: "RESET", 3: "CRASH", 4: "WAKEUP", 5: "SUSPEND", 6: "SEV_TERM"}

    @property
    def type_name(self) -> str:
        return self.TYPES.get(self.type, f"type {self.type}")


@dataclass(frozen=True)
class MemoryFault(Exit):
    flags: int
    gpa: int
    size: int


@dataclass(frozen=True)
class Unknown(Exit):
    reason: int
    hardware_exit_reason: int

    @property
    def reason_name(self) -> str:
        return abi.EXIT_REASONS.get(self.reason, f"exit reason {self.reason}")


RUN_SIZE = ffi.sizeof("struct kvm_run")


def decode(raw, page=None) -> Exit:
    """Decode a kvm_run image into a typed exit.

    `raw` is either bytes-like (at least sizeof(struct kvm_run) long, plus the I/O data
    area for IO exits) or a cffi `struct kvm_run *`. `page` is the buffer holding the whole
    run page when `raw` is a pointer (used for IO data, which lives past the struct).
    """
    if isinstance(raw, ffi.CData):
        run = raw
        if page is None:
            page = ffi.buffer(ffi.cast("char *", run), RUN_SIZE)
    else:
        if len(raw) < RUN_SIZE:
            raise ValueError(f"kvm_run image is {len(raw)} bytes, need at least {RUN_SIZE}")
        run = ffi.from_buffer("struct kvm_run *", raw)
        page = raw
    reason = run.exit_reason
    if reason == abi.KVM_EXIT_IO:
        io = run.io
        out = io.direction == abi.KVM_EXIT_IO_OUT
        n = io.size * io.count
        off = io.data_offset
        if out:
            if off + n > len(page):
                raise ValueError(f"IO data at {off:#x}+{n} lies outside the run page")
            data = bytes(page[off:off + n])
        else:
            data = b""
        return Io(io.port, out, io.size, io.count, data, off)
    if reason == abi.KVM_EXIT_MMIO:
        m = run.mmio
        length = min(m.len, 8)
        data = bytes(ffi.buffer(m.data, length)) if m.is_write else b""
        return Mmio(m.phys_addr, bool(m.is_write), m.len, data)
    if reason == abi.KVM_EXIT_HLT:
        return Hlt()
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
