"""Vm: one VM fd, its memory slots, ioeventfds (the objects: ioeventfd.py) and vCPUs."""

from __future__ import annotations

import errno
import os
import resource
import time

from . import abi
from .fd import FdOwner
from .abi import ffi
from ..errors import KvmError, PyvmmError, ResourceLimit
from .ioeventfd import Ioeventfd, ioeventfd_arg, ioeventfd_hint
from .memory import PAGE_SIZE, GuestMemory, MemorySlot
from .vcpu import Vcpu
from .vm_x86 import X86VmIoctls

_mono = time.monotonic_ns
_ioctl = abi.ioctl
_KVM_IOEVENTFD = abi.KVM_IOEVENTFD
_KVM_SET_USER_MEMORY_REGION = abi.KVM_SET_USER_MEMORY_REGION
_KVM_SET_USER_MEMORY_REGION2 = abi.KVM_SET_USER_MEMORY_REGION2
_eventfd = os.eventfd


def _drop(_value) -> None:
    pass

_EFD_FLAGS = os.EFD_NONBLOCK | os.EFD_CLOEXEC


class GuestMemfd(FdOwner):
    """A guest_memfd file (KVM_CREATE_GUEST_MEMFD)."""

    kind = "guest_memfd"

    def __init__(self, fd: int, size: int, flags: int):
        super().__init__(fd)
        self.size = size
        self.flags = flags


def check_nofile(needed: int, what: str) -> None:
    """Fail early, and clearly, when `needed` more fds would exceed RLIMIT_NOFILE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    if in_use + needed > soft:
        raise ResourceLimit(
            f"{what} needs {needed} more file descriptors but only {soft - in_use} are free "
            f"(RLIMIT_NOFILE soft limit {soft}, hard {hard}, {in_use} open): raise it with "
            f"'ulimit -n {in_use + needed + 64}' (or LimitNOFILE= in a systemd unit)")


class Vm(X86VmIoctls, FdOwner):
    """A VM fd. Close order: vCPUs, then the VM fd, then guest memory and eventfds."""

    kind = "VM fd"

    def __init__(self, kvm, fd: int):
        self.fd = fd                    # FdOwner's one field, set without a super() call
        self.kvm = kvm
        self.slots: dict[int, MemorySlot] = {}
        self.memories: list[GuestMemory] = []
        self.vcpus: list = []
        self._ioeventfds: set[Ioeventfd] = set()
        self.guest_memfds: list[GuestMemfd] = []
        self.last_ioeventfd_ns = 0   # duration of the last KVM_IOEVENTFD ioctl alone
        self.last_memslot_ns = 0     # ... and of the last KVM_SET_USER_MEMORY_REGION(2)

    # --- capabilities -------------------------------------------------------------
    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (answers for this VM's type)."""
        ret, err = self._try_ioctl("KVM_CHECK_EXTENSION", cap)
        return 0 if err else ret

    # --- memory slots -------------------------------------------------------------
    def _slot_hint(self, slot: int, gpa: int, size: int, uaddr: int, flags: int,
                   gmem_fd: int | None = None, gmem_off: int = 0):
        def hint(err: int) -> str:
            if err == errno.EINVAL and gmem_fd is not None and size:
                for s in self.slots.values():
                    if (s.slot != slot and s.guest_memfd == gmem_fd
                            and gmem_off < s.guest_memfd_offset + s.size
                            and s.guest_memfd_offset < gmem_off + size):
                        return (f"guest_memfd range {gmem_off:#x}+{size:#x} is already bound "
                                f"to slot {s.slot}: a range binds to one slot at a time; "
                                "delete that slot first")
                g = next((g for g in self.guest_memfds if g.fd == gmem_fd), None)
                if g is not None and gmem_off + size > g.size:
                    return (f"guest_memfd offset {gmem_off:#x}+{size:#x} runs past its size "
                            f"{g.size:#x}")
                if gmem_off % PAGE_SIZE:
                    return f"guest_memfd offset {gmem_off:#x} must be page-aligned"
            if err == errno.EEXIST:
                for s in self.slots.values():
                    if s.slot != slot and gpa < s.end and s.gpa < gpa + size:
                        return (f"slot {slot} at {gpa:#x}+{size:#x} overlaps slot {s.slot} "
                                f"at {s.gpa:#x}+{s.size:#x}: pick a free range")
                return f"slot {slot} at {gpa:#x}+{size:#x} overlaps an existing slot"
            if err == errno.EINVAL:
                if size == 0 and slot not in self.slots:
                    return f"slot {slot} does not exist, so a zero-sized region cannot delete it"
                if gpa % PAGE_SIZE or size % PAGE_SIZE or uaddr % PAGE_SIZE:
                    return (f"gpa {gpa:#x}, size {size:#x} and host address {uaddr:#x} must "
                            f"all be page-aligned ({PAGE_SIZE:#x})")
                if flags & ~(abi.KVM_MEM_LOG_DIRTY_PAGES | abi.KVM_MEM_READONLY
                             | abi.KVM_MEM_GUEST_MEMFD):
                    return f"unknown flags {flags:#x}"
                if slot in self.slots and self.slots[slot].size != size:
                    return "an existing slot can be moved or re-flagged but not resized"
                return "the kernel rejected the region (slot number, flags or size)"
            if err == errno.EFAULT:
                return f"host address {uaddr:#x}+{size:#x} is not mapped in this process"
            return ""
        return hint

    def try_set_user_memory_region(self, slot: int, gpa: int, size: int, uaddr: int,
                                   flags: int = 0) -> int:
        """Raw KVM_SET_USER_MEMORY_REGION: returns the errno (0 on success)."""
        region = ffi.new("struct kvm_userspace_memory_region *",
                         (slot, flags, gpa, size, uaddr))
        return self._try_ioctl("KVM_SET_USER_MEMORY_REGION", region)[1]

    def set_user_memory_region(self, slot: int, gpa: int, size: int, uaddr: int,
                               flags: int = 0) -> None:
        """KVM_SET_USER_MEMORY_REGION (KVM_CAP_USER_MEMORY). Size 0 deletes the slot.
        last_memslot_ns is the duration of the ioctl alone."""
        region = ffi.new("struct kvm_userspace_memory_region *",
                         (slot, flags, gpa, size, uaddr))
        fd = self.fd
        if fd < 0:
            self._live_fd()
        t = _mono()
        r = _ioctl(fd, _KVM_SET_USER_MEMORY_REGION, region)
        self.last_memslot_ns = _mono() - t
        if r < 0:
            raise KvmError("KVM_SET_USER_MEMORY_REGION", -r,
                           self._slot_hint(slot, gpa, size, uaddr, flags)(-r))

    def try_set_user_memory_region2(self, slot: int, gpa: int, size: int, uaddr: int,
                                    flags: int = 0, guest_memfd: int = 0,
                                    guest_memfd_offset: int = 0) -> int:
        """Raw KVM_SET_USER_MEMORY_REGION2: returns the errno (0 on success)."""
        region = self._region2(slot, gpa, size, uaddr, flags, guest_memfd, guest_memfd_offset)
        return self._try_ioctl("KVM_SET_USER_MEMORY_REGION2", region)[1]

    def set_user_memory_region2(self, slot: int, gpa: int, size: int, uaddr: int,
                                flags: int = 0, guest_memfd: int = 0,
                                guest_memfd_offset: int = 0) -> None:
        """KVM_SET_USER_MEMORY_REGION2 (KVM_CAP_USER_MEMORY2): v1 plus guest_memfd binding."""
        region = self._region2(slot, gpa, size, uaddr, flags, guest_memfd, guest_memfd_offset)
        gmem = guest_memfd if flags & abi.KVM_MEM_GUEST_MEMFD else None
        fd = self._live_fd()
        t = _mono()
        r = _ioctl(fd, _KVM_SET_USER_MEMORY_REGION2, region)
        self.last_memslot_ns = _mono() - t
        if r < 0:
            raise KvmError("KVM_SET_USER_MEMORY_REGION2", -r,
                           self._slot_hint(slot, gpa, size, uaddr, flags, gmem,
                                           guest_memfd_offset)(-r))

    @staticmethod
    def _region2(slot, gpa, size, uaddr, flags, guest_memfd, guest_memfd_offset):
        r = ffi.new("struct kvm_userspace_memory_region2 *")
        r.slot, r.flags, r.guest_phys_addr, r.memory_size = slot, flags, gpa, size
        r.userspace_addr, r.guest_memfd_offset, r.guest_memfd = (
            uaddr, guest_memfd_offset, guest_memfd)
        return r

    def _apply_slot(self, s: MemorySlot, v2: bool) -> None:
        uaddr = s.memory.host_addr + s.offset
        if v2 or s.guest_memfd is not None:
            self.set_user_memory_region2(s.slot, s.gpa, s.size, uaddr, s.flags,
                                         s.guest_memfd or 0, s.guest_memfd_offset)
        else:
            self.set_user_memory_region(s.slot, s.gpa, s.size, uaddr, s.flags)

    def free_slot(self) -> int:
        n = 0
        while n in self.slots:
            n += 1
        return n

    def add_memory(self, gpa: int, size: int, flags: int = 0, slot: int | None = None,
                   memory: GuestMemory | None = None, offset: int = 0,
                   v2: bool = False, guest_memfd: GuestMemfd | None = None,
                   guest_memfd_offset: int = 0) -> MemorySlot:
        """Map guest memory at `gpa`. Allocates anonymous memory unless `memory` is given.

        The memory belongs to the VM from then on and outlives the slot.
        """
        if size == 0:
            raise PyvmmError(f"memory slot at {gpa:#x} has size 0: give a positive, "
                             f"page-aligned size (size 0 means 'delete' to KVM)")
        slot = self.free_slot() if slot is None else slot
        if slot in self.slots:
            raise PyvmmError(f"memory slot {slot} is already in use at "
                             f"{self.slots[slot].gpa:#x}: delete it first or pick another")
        own = memory is None
        if own:
            alloc = size if size % PAGE_SIZE == 0 else size + PAGE_SIZE - size % PAGE_SIZE
            memory = GuestMemory(alloc)
        if guest_memfd is None:
            s = MemorySlot(slot, gpa, size, memory, flags, offset)
        else:
            s = MemorySlot(slot, gpa, size, memory, flags | abi.KVM_MEM_GUEST_MEMFD, offset,
                           guest_memfd.fd, guest_memfd_offset)
        try:
            if v2 or guest_memfd is not None:
                self._apply_slot(s, True)
            else:
                self.set_user_memory_region(slot, gpa, size, memory.host_addr + offset, flags)
        except Exception:
            if own:
                memory.close()
            raise
        if memory not in self.memories:
            self.memories.append(memory)
        self.slots[slot] = s
        return s

    def add_ram_with_guest(self, guest: str) -> MemorySlot:
        """RAM at 0 (layout.RAM_SIZE) holding the named guest image at CODE_GPA: what the
        64-bit check, stress and ptwrite guests start from."""
        from . import guests, layout
        ram = self.add_memory(0, layout.RAM_SIZE)
        self.write_guest(layout.CODE_GPA, guests.load(guest))
        return ram

    def delete_slot(self, slot: int) -> None:
        """Delete a slot (KVM_SET_USER_MEMORY_REGION with size 0). Memory stays mapped."""
        s = self.slots.get(slot)
        if s is None:
            raise PyvmmError(f"memory slot {slot} does not exist")
        if s.guest_memfd is not None:
            self.set_user_memory_region2(slot, s.gpa, 0, s.memory.host_addr + s.offset,
                                         s.flags, s.guest_memfd, s.guest_memfd_offset)
        else:
            self.set_user_memory_region(slot, s.gpa, 0, s.memory.host_addr + s.offset, s.flags)
        del self.slots[slot]

    def _update_slot(self, slot: int, **changes) -> None:
        """Re-issue a slot with some fields changed; bookkeeping changes only on success."""
        s = self.slots.get(slot)
        if s is None:
            raise PyvmmError(f"memory slot {slot} does not exist")
        new = s.replace(**changes)
        self._apply_slot(new, new.guest_memfd is not None)
        self.slots[slot] = new

    def move_slot(self, slot: int, new_gpa: int) -> None:
        """Move a slot to a new guest address (KVM_MR_MOVE)."""
        self._update_slot(slot, gpa=new_gpa)

    def set_slot_flags(self, slot: int, flags: int) -> None:
        """Change a slot's flags (dirty logging; KVM_MR_FLAGS_ONLY)."""
        self._update_slot(slot, flags=flags)

    def slot_at(self, gpa: int, length: int = 1) -> MemorySlot:
        for s in self.slots.values():
            if s.contains(gpa, length):
                return s
        raise PyvmmError(f"guest address {gpa:#x}+{length:#x} is not backed by a memory slot")

    def write_guest(self, gpa: int, data: bytes) -> None:
        s = self.slot_at(gpa, len(data))
        s.memory.write(s.offset + gpa - s.gpa, data)

    def read_guest(self, gpa: int, length: int) -> bytes:
        s = self.slot_at(gpa, length)
        return s.memory.read(s.offset + gpa - s.gpa, length)

    def get_dirty_log(self, slot: int) -> bytes:
        """KVM_GET_DIRTY_LOG: one bit per page of the slot, set for pages written since
        the last call (the slot needs KVM_MEM_LOG_DIRTY_PAGES)."""
        s = self.slots.get(slot)
        if s is None:
            raise PyvmmError(f"memory slot {slot} does not exist")
        pages = (s.size + PAGE_SIZE - 1) // PAGE_SIZE
        nbytes = ((pages + 63) // 64) * 8
        bitmap = ffi.new("uint8_t[]", nbytes)
        arg = ffi.new("struct kvm_dirty_log *")
        arg.slot, arg.dirty_bitmap = slot, bitmap

        def hint(err: int) -> str:
            if err == errno.ENOENT:
                return f"slot {slot} does not log dirty pages: set KVM_MEM_LOG_DIRTY_PAGES"
            return ""
        self._ioctl("KVM_GET_DIRTY_LOG", arg, hint=hint)
        return bytes(ffi.buffer(bitmap, nbytes))

    def coalesced_mmio(self, addr: int, size: int, register: bool = True,
                       pio: bool = False) -> None:
        """KVM_(UN)REGISTER_COALESCED_MMIO: guest writes to the zone are queued in the
        ring instead of exiting (KVM_CAP_COALESCED_MMIO)."""
        zone = ffi.new("struct kvm_coalesced_mmio_zone *")
        zone.addr, zone.size, zone.pio = addr, size, int(pio)
        name = "KVM_REGISTER_COALESCED_MMIO" if register else "KVM_UNREGISTER_COALESCED_MMIO"

        def hint(err: int) -> str:
            if err == errno.ENOBUFS:
                return "too many coalesced MMIO zones (KVM allows 100)"
            if err == errno.ENOENT:
                return f"no coalesced zone registered at {addr:#x}"
            return ""
        self._ioctl(name, zone, hint=hint)

    # --- guest_memfd -----------------------------------------------------------------
    def create_guest_memfd(self, size: int, flags: int = 0) -> GuestMemfd:
        """KVM_CREATE_GUEST_MEMFD (KVM_CAP_GUEST_MEMFD)."""
        if not self.check_extension(abi.KVM_CAP_GUEST_MEMFD):
            raise PyvmmError("guest_memfd needs KVM_CAP_GUEST_MEMFD, which this host lacks")
        arg = ffi.new("struct kvm_create_guest_memfd *")
        arg.size, arg.flags = size, flags
        supported = self.check_extension(abi.KVM_CAP_GUEST_MEMFD_FLAGS)

        def hint(err: int) -> str:
            if err == errno.EINVAL:
                if flags & ~supported:
                    return (f"flags {flags:#x} include bits this host does not support "
                            f"(supported: {supported:#x})")
                return f"size {size:#x} must be a positive multiple of the page size"
            return ""
        fd = self._ioctl("KVM_CREATE_GUEST_MEMFD", arg, hint=hint)
        g = GuestMemfd(fd, size, flags)
        self.guest_memfds.append(g)
        return g

    # --- ioeventfds -------------------------------------------------------------------
    def _ioeventfd_ioctl(self, efd: int, addr: int, length: int, pio: bool,
                         datamatch: int | None, deassign: bool) -> None:
        arg = ioeventfd_arg(efd, addr, length, pio, datamatch, deassign)
        fd = self._live_fd()
        t = _mono()
        r = _ioctl(fd, _KVM_IOEVENTFD, arg)
        self.last_ioeventfd_ns = _mono() - t
        if r < 0:
            raise KvmError("KVM_IOEVENTFD", -r,
                           ioeventfd_hint(-r, addr, length, pio, datamatch))

    def try_ioeventfd(self, efd: int, addr: int, length: int, pio: bool = False,
                      datamatch: int | None = None, deassign: bool = False) -> int:
        """Raw KVM_IOEVENTFD: returns the errno (0 on success)."""
        arg = ioeventfd_arg(efd, addr, length, pio, datamatch, deassign)
        return self._try_ioctl("KVM_IOEVENTFD", arg)[1]

    def ioeventfd(self, addr: int, length: int = 4, pio: bool = False,
                  datamatch: int | None = None) -> Ioeventfd:
        """Bind a new eventfd to `addr` (KVM_IOEVENTFD, KVM_CAP_IOEVENTFD).

        Guest writes there complete in the kernel and increment the eventfd counter.
        """
        try:
            efd = _eventfd(0, _EFD_FLAGS)
        except OSError as e:
            raise self._eventfd_error(e) from None
        try:
            self._ioeventfd_ioctl(efd, addr, length, pio, datamatch, deassign=False)
        except Exception:
            os.close(efd)
            raise
        io = Ioeventfd(self, efd, addr, length, pio, datamatch)
        self._ioeventfds.add(io)
        return io

    def assign_ioeventfds(self, addrs, length: int = 4, pio: bool = False,
                          samples: list | None = None) -> list[Ioeventfd]:
        """A burst of registrations (what a VMM does while it sets up its devices): for
        each address a new eventfd and a KVM_IOEVENTFD assign, in order. With `samples`,
        the duration of each ioctl alone is appended to it. On a failure the eventfd of
        the failed one is closed and KvmError raised; those assigned before it stay."""
        fd = self._live_fd()
        arg = ioeventfd_arg(-1, 0, length, pio, None, False)
        out: list[Ioeventfd] = []
        mono, ioctl, req, eventfd, flags = _mono, _ioctl, _KVM_IOEVENTFD, _eventfd, _EFD_FLAGS
        new = object.__new__
        sample = samples.append if samples is not None else _drop
        try:
            for addr in addrs:
                try:
                    efd = eventfd(0, flags)
                except OSError as e:
                    raise self._eventfd_error(e) from None
                arg.addr = addr
                arg.fd = efd
                t = mono()
                r = ioctl(fd, req, arg)
                sample(mono() - t)
                if r < 0:
                    os.close(efd)
                    raise KvmError("KVM_IOEVENTFD", -r,
                                   ioeventfd_hint(-r, addr, length, pio, None))
                # Ioeventfd(self, efd, addr, length, pio, None), field by field in this
                # frame: one Python frame less per registration of the burst.
                io = new(Ioeventfd)
                io.vm, io.efd, io.addr, io.length, io.pio = self, efd, addr, length, pio
                io.datamatch, io.assigned = None, True
                out.append(io)
        finally:
            self._ioeventfds.update(out)     # what was assigned is owned, failure or not
        return out

    def _eventfd_error(self, e: OSError) -> Exception:
        if e.errno in (errno.EMFILE, errno.ENFILE):
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            return ResourceLimit(
                f"eventfd() failed: {errno.errorcode[e.errno]}: out of file descriptors "
                f"after {len(self._ioeventfds)} ioeventfds (RLIMIT_NOFILE soft {soft}, "
                f"hard {hard}): raise it with 'ulimit -n'")
        return e

    @property
    def ioeventfds(self) -> list[Ioeventfd]:
        return sorted(self._ioeventfds, key=lambda i: (i.pio, i.addr))

    # --- vCPUs ------------------------------------------------------------------------
    def create_vcpu(self, vcpu_id: int | None = None):
        """KVM_CREATE_VCPU. Maps the vCPU's kvm_run page."""
        vcpu_id = len(self.vcpus) if vcpu_id is None else vcpu_id
        fd = self._ioctl("KVM_CREATE_VCPU", vcpu_id, hint=self._vcpu_hint(vcpu_id))
        vcpu = Vcpu(self, fd, vcpu_id, self.kvm.get_vcpu_mmap_size())
        self.vcpus.append(vcpu)
        return vcpu

    def _vcpu_hint(self, vcpu_id: int):
        def hint(err: int) -> str:
            if err == errno.EEXIST:
                return f"vCPU {vcpu_id} already exists"
            if err == errno.EINVAL:
                return (f"vCPU id {vcpu_id} is out of range (max vcpus "
                        f"{self.check_extension(abi.KVM_CAP_MAX_VCPUS)})")
            return ""
        return hint

    # --- lifetime ---------------------------------------------------------------------
    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vcpus = []
        self._close_fd()
        for io in list(self._ioeventfds):
            io.close()
        for g in self.guest_memfds:
            g.close()
        self.guest_memfds = []
        for m in self.memories:
            m.close()
        self.memories = []
        self.slots = {}
