"""Vcpu: one vCPU fd and its mmap'ed kvm_run page."""

from __future__ import annotations

import errno
import functools
import mmap as _mmap
import signal
import struct
import threading
import time

from . import abi, layout
from ._fd import FdOwner
from .abi import ffi
from .errors import KvmError, PyvmmError
from .exits import REASON_IO, REASON_IO_AT, Exit, Interrupted, Io, decode, decode_page

_KVM_RUN = abi.KVM_RUN
_KVM_EXIT_IO = abi.KVM_EXIT_IO
_reason_io = REASON_IO.unpack_from
_new = object.__new__
_EINTR = errno.EINTR
_ioctl_val = abi.ioctl_val
_get_ident = threading.get_ident

KICK_SIGNAL = signal.SIGUSR1

# The 64-bit entry's GDT, selectors and control bits come from layout (protocol.inc).
GDT_CODE64, GDT_DATA = layout.GDT_CODE64, layout.GDT_DATA
SEL_CODE, SEL_DATA = layout.SEL_CODE, layout.SEL_DATA

REG_NAMES = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10",
             "r11", "r12", "r13", "r14", "r15", "rip", "rflags"]


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


def install_kick_handler() -> bool:
    """Make KICK_SIGNAL interrupt KVM_RUN without killing the process.

    Python can only install handlers from the main thread; returns False elsewhere
    (kick() then relies on immediate_exit, checked at the next entry).
    """
    if signal.getsignal(KICK_SIGNAL) not in (signal.SIG_DFL, None):
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(KICK_SIGNAL, lambda *_: None)
    signal.siginterrupt(KICK_SIGNAL, True)
    return True


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


class _KickService:
    """One thread for the whole process that kicks a vCPU out of KVM_RUN once its time is
    up (then every 10 ms until cancelled), instead of a watchdog thread per boot or check.
    Use kick_after()."""

    def __init__(self):
        self.cond = threading.Condition()
        self.armed: dict[int, list] = {}     # id -> [deadline, vcpu or None]
        self.next_id = 0
        self.wake_at = 0.0                   # when the thread wakes next, unless notified
        self.thread = threading.Thread(target=self._loop, daemon=True, name="pyvmm-kicker")
        self.thread.start()

    def arm(self, timeout: float, vcpu=None) -> "Kick":
        with self.cond:
            self.next_id += 1
            deadline = time.monotonic() + timeout
            entry = self.armed[self.next_id] = [deadline, vcpu, False]
            if deadline < self.wake_at:
                # Wake the thread only when it would sleep past this deadline: a boot
                # that arms a 10 s deadline every few ms then costs the thread nothing.
                self.cond.notify()
            return Kick(self, self.next_id, entry)

    def _loop(self):
        with self.cond:
            while True:
                now = time.monotonic()
                due = [e for e in self.armed.values() if e[0] <= now]
                for e in due:
                    if e[1] is not None:
                        e[1].kick()
                        e[2] = True
                    e[0] = now + 0.01
                wait = min((e[0] for e in self.armed.values()), default=now + 3600) - now
                self.wake_at = now + max(wait, 0.001)
                self.cond.wait(max(wait, 0.001))


class Kick:
    """One armed deadline: set `vcpu` (if not given to kick_after), read `fired`, and
    cancel() when the work is done; no kick comes after cancel() returns."""

    def __init__(self, service: _KickService, kid: int, entry: list):
        self.service, self.kid, self._entry = service, kid, entry
        self.fired = False

    @property
    def vcpu(self):
        return self._entry[1]

    @vcpu.setter
    def vcpu(self, v):
        # One store into the armed entry: atomic under the GIL, and the kicker thread
        # reads it under its lock, so it sees the old vCPU or the new one. No lock here:
        # this is set inside a boot's timed run phase.
        self._entry[1] = v

    def cancel(self):
        with self.service.cond:
            e = self.service.armed.pop(self.kid, None)
            if e is not None:
                self.fired = self.fired or e[2]


_KICKS: _KickService | None = None


def kick_after(timeout: float, vcpu=None) -> Kick:
    """Kick `vcpu` (or the one set on the returned Kick) out of KVM_RUN once `timeout`
    seconds have passed, and every 10 ms after, until cancelled. Call
    install_kick_handler() first (from the main thread)."""
    global _KICKS
    if _KICKS is None:
        _KICKS = _KickService()
    return _KICKS.arm(timeout, vcpu)
