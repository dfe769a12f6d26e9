"""Vcpu: one vCPU fd and its mmap'ed kvm_run page."""

from __future__ import annotations

import errno
import mmap as _mmap
import signal
import threading

from . import abi, layout
from .fd import FdOwner
from .abi import ffi
from ..errors import KvmError, PyvmmError
from .exits import REASON_IO, REASON_IO_AT, Exit, Interrupted, Io, decode, decode_page
from .kicker import KICK_SIGNAL
from .x86 import long_mode_sregs_patch, write_long_mode_tables

_KVM_RUN = abi.KVM_RUN
_KVM_EXIT_IO = abi.KVM_EXIT_IO
_reason_io = REASON_IO.unpack_from
_new = object.__new__
_EINTR = errno.EINTR
_ioctl_val = abi.ioctl_val
_get_ident = threading.get_ident

REG_NAMES = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10",
             "r11", "r12", "r13", "r14", "r15", "rip", "rflags"]


class Vcpu(FdOwner):
    """A vCPU fd. run() returns typed exits decoded from kvm_run."""

    kind = "vCPU fd"

    def __init__(self, vm, fd: int, vcpu_id: int, mmap_size: int):
        self.fd = fd                    # FdOwner's one field, set without a super() call
        self.vm = vm
        self.id = vcpu_id
        self.mmap_size = mmap_size
        address = abi.mmap(mmap_size, _mmap.PROT_READ | _mmap.PROT_WRITE, _mmap.MAP_SHARED,
                           fd, 0)
        if address < 0:
            self._close_fd()
            raise KvmError("mmap(vcpu fd)", -address, "cannot map the kvm_run page")
        self._map = address
        self.run_struct = ffi.cast("struct kvm_run *", address)
        self._page = ffi.buffer(self.run_struct, mmap_size)
        self.thread_id: int | None = None

    # --- registers ------------------------------------------------------------------
    def get_regs(self):
        """KVM_GET_REGS: returns a cffi `struct kvm_regs *`."""
        regs = ffi.new("struct kvm_regs *")
        self._ioctl("KVM_GET_REGS", regs)
        return regs

    def set_regs(self, regs) -> None:
        """KVM_SET_REGS."""
        self._ioctl("KVM_SET_REGS", regs)

    def xen_set_vcpu_info(self, gpa: int) -> None:
        """KVM_XEN_VCPU_SET_ATTR (VCPU_INFO): the guest page KVM uses as this vCPU's
        struct vcpu_info; in-kernel event channel delivery needs it (KVM_CAP_XEN_HVM)."""
        attr = ffi.new("struct kvm_xen_vcpu_attr *")
        attr.type = abi.KVM_XEN_VCPU_ATTR_TYPE_VCPU_INFO
        attr.u.gpa = gpa
        self._ioctl("KVM_XEN_VCPU_SET_ATTR", attr)

    def get_sregs(self):
        """KVM_GET_SREGS: returns a cffi `struct kvm_sregs *`."""
        sregs = ffi.new("struct kvm_sregs *")
        self._ioctl("KVM_GET_SREGS", sregs)
        return sregs

    def set_sregs(self, sregs) -> None:
        """KVM_SET_SREGS."""
        self._ioctl("KVM_SET_SREGS", sregs, hint=_sregs_hint)

    def regs_dict(self) -> dict[str, int]:
        r = self.get_regs()
        return {n: getattr(r, n) for n in REG_NAMES}

    # --- mode set-up -------------------------------------------------------------------
    def setup_real_mode(self, entry: int = layout.CODE_GPA) -> None:
        """Start in real mode at `entry` (CS = entry >> 4, IP = 0)."""
        if entry % 16 or entry >= 1 << 20:
            raise PyvmmError(f"real-mode entry {entry:#x} must be 16-byte aligned, below 1 MiB")
        sregs = self.get_sregs()
        sregs.cs.base, sregs.cs.selector = entry, entry >> 4
        for seg in (sregs.ds, sregs.es, sregs.ss):
            seg.base, seg.selector = 0, 0
        self.set_sregs(sregs)
        regs = ffi.new("struct kvm_regs *")
        regs.rip, regs.rflags, regs.rsp = 0, 2, layout.PARAM_GPA - 0x10
        self.set_regs(regs)

    def set_cpuid(self, cpuid) -> None:
        """KVM_SET_CPUID2 (a `struct kvm_cpuid2 *`, e.g. Kvm.get_supported_cpuid()). Some
        kernels refuse 64-bit sregs until the vCPU's CPUID advertises long mode."""
        self._ioctl("KVM_SET_CPUID2", cpuid,
                    hint="set CPUID before the first KVM_RUN, with entries KVM supports")

    def setup_long_mode(self, entry: int = layout.CODE_GPA, write_tables: bool = True) -> None:
        """Enter 64-bit mode at `entry` with identity paging of the low 4 GiB.

        Writes the GDT and page tables into guest memory (once per VM is enough:
        pass write_tables=False for further vCPUs).
        """
        if write_tables:
            write_long_mode_tables(self.vm.write_guest)
        self.set_cpuid(self.vm.kvm.get_supported_cpuid())
        sregs = self.get_sregs()
        buf = ffi.buffer(sregs)
        for offset, data in long_mode_sregs_patch():
            buf[offset:offset + len(data)] = data
        self.set_sregs(sregs)
        regs = ffi.new("struct kvm_regs *")
        regs.rip, regs.rflags, regs.rsp = entry, 2, layout.STACK_TOP
        self.set_regs(regs)

    # --- running ------------------------------------------------------------------------
    def try_run(self) -> int:
        """Raw KVM_RUN: returns the errno (0 on success); last_exit() decodes kvm_run."""
        return self._try_ioctl("KVM_RUN")[1]

    def last_exit(self) -> Exit:
        """Decode what kvm_run holds now (after try_run, including a failed one: an EFAULT
        from KVM_RUN may come with a memory-fault exit)."""
        return decode(self.run_struct, self._page)

    def run(self) -> Exit:
        """KVM_RUN once and decode the exit. EINTR becomes an Interrupted exit. Port
        I/O, the exit a boot makes most, is decoded here (as exits.decode_page does)."""
        self.thread_id = _get_ident()
        r = _ioctl_val(self.fd, _KVM_RUN, 0)
        if r < 0:
            if r == -_EINTR:
                self.run_struct.immediate_exit = 0
                return Interrupted()
            self._live_fd()
            raise KvmError("KVM_RUN", -r, _run_hint(-r))
        page = self._page
        reason, direction, size, port, count, off = _reason_io(page, REASON_IO_AT)
        if reason == _KVM_EXIT_IO:
            # Built field by field in this frame: an Io without a second Python frame
            # per exit (what Io(...) would cost on the boot's hottest path).
            io = _new(Io)
            if direction:
                end = off + size * count
                if end > len(page):
                    return decode_page(page)        # raises: data outside the page
                io.is_write, io.data = True, page[off:end]
            else:
                io.is_write, io.data = False, b""
            io.port, io.size, io.count, io.data_offset = port, size, count, off
            return io
        return decode_page(page)

    def kick(self) -> None:
        """Make the current or next KVM_RUN return with EINTR (used by timeouts)."""
        if self._map is None:
            return
        self.run_struct.immediate_exit = 1
        tid = self.thread_id
        if tid is not None and signal.getsignal(KICK_SIGNAL) not in (signal.SIG_DFL, None):
            try:
                signal.pthread_kill(tid, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    def set_io_in_data(self, exit, value: int) -> None:
        """Answer an IN exit: the value KVM hands to the guest on re-entry."""
        n = exit.size * exit.count
        self._page[exit.data_offset:exit.data_offset + n] = (
            (value & ((1 << (8 * exit.size)) - 1)).to_bytes(exit.size, "little") * exit.count)

    def set_mmio_read_data(self, value: int, length: int) -> None:
        """Answer an MMIO read exit."""
        data = (value & ((1 << (8 * min(length, 8))) - 1)).to_bytes(8, "little")
        ffi.memmove(self.run_struct.mmio.data, data, 8)

    # --- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        if self._map is not None:
            self._page = None
            self.run_struct = None
            abi.munmap(self._map, self.mmap_size)
            self._map = None
        self._close_fd()


def _sregs_hint(err: int) -> str:
    return "the segment/control register state is invalid" if err == errno.EINVAL else ""


def _run_hint(err: int) -> str:
    if err == errno.EFAULT:
        return "the guest touched memory that no slot backs, or the run page is gone"
    if err == errno.ENOEXEC:
        return "the vCPU state is invalid for entry (check sregs)"
    if err == errno.EINVAL:
        return "KVM refused to run this vCPU (registers or mode invalid)"
    return ""
