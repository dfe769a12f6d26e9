"""The Python VMM against the real /dev/kvm."""

import errno
import os
import struct

import pytest

from pyvmm import Kvm
from pyvmm.vmm import layout
from pyvmm import recipe as rmod
from pyvmm.drivers import runner as pyrunner
from pyvmm.errors import (GuestError, GuestTimeout, KvmError, KvmUnavailable, PyvmmError,
                          ResourceLimit, UnexpectedExit)
from pyvmm.vmm.exits import Hlt, Io, Mmio
from pyvmm.vmm import guests

pytestmark = pytest.mark.kvm


def boot(text, **kw):
    return pyrunner.boot(rmod.parse(text), **kw)


def test_hello_real_mode_prints_exact_line():
    res = boot("vm,mem,vcpu:1,run", guest="hello")
    assert res["serial"] == "Hello from a pyvmm real-mode guest\n"
    assert res["halted"] and [m for m, _ in res["events"]] == [layout.MARK_START,
                                                               layout.MARK_DONE]


def test_doorbell_long_mode_registers_after_hlt(vm):
    vm.add_memory(0, layout.RAM_SIZE)
    vm.write_guest(layout.CODE_GPA, guests.load("doorbell"))
    vm.write_guest(layout.PARAM_GPA, struct.pack("<QQ", layout.PARAM_MAGIC, 0))
    v = vm.create_vcpu()
    v.setup_long_mode()
    markers = []
    while True:
        ex = v.run()
        if isinstance(ex, Io) and ex.port == layout.MARKER_PORT:
            markers.append(ex.value)
        elif isinstance(ex, Mmio):
            assert not ex.is_write and ex.addr == layout.BAR_GPA
            v.set_mmio_read_data(layout.UNMAPPED_READ, ex.length)
        elif isinstance(ex, Hlt):
            break
    assert markers == [1, 2, 3, 4, 0x7F]
    regs = v.get_regs()
    # rip sits just past the hlt; rax holds the DONE marker; rsi walked 0 doorbells.
    assert regs.rax & 0xFF == layout.MARK_DONE
    assert regs.rsi == layout.PARAM_GPA + layout.PARAM_ADDRS_OFF
    assert regs.rcx == 0 and regs.rdi == layout.BAR_GPA
    sregs = v.get_sregs()
    assert sregs.efer & (1 << 10) and sregs.cs.l == 1


def _doorbell_vm(vm, addrs):
    vm.add_memory(0, layout.RAM_SIZE)
    vm.write_guest(layout.CODE_GPA, guests.load("doorbell"))
    vm.write_guest(layout.PARAM_GPA,
                   struct.pack(f"<QQ{len(addrs)}Q", layout.PARAM_MAGIC, len(addrs), *addrs))
    v = vm.create_vcpu()
    v.setup_long_mode()
    return v


def _run_collect(v):
    """Run to HLT; return the doorbell MMIO writes that reached userspace."""
    writes = []
    while True:
        ex = v.run()
        if isinstance(ex, Mmio):
            if ex.is_write:
                writes.append((ex.addr, ex.value))
            else:
                v.set_mmio_read_data(layout.UNMAPPED_READ, ex.length)
        elif isinstance(ex, Hlt):
            return writes


@pytest.mark.parametrize("length", [0, 4])
def test_mmio_ioeventfd_completes_in_kernel(vm, length):
    addrs = [layout.DOORBELL_BASE + 8 * i for i in range(5)]
    v = _doorbell_vm(vm, addrs)
    fds = [vm.ioeventfd(a, length) for a in addrs]
    assert _run_collect(v) == []
    assert [f.count() for f in fds] == [1] * 5


def test_datamatch_only_fires_on_matching_value(vm):
    a = layout.DOORBELL_BASE
    v = _doorbell_vm(vm, [a])
    miss = vm.ioeventfd(a, 4, datamatch=2)      # the guest writes 1
    writes = _run_collect(v)
    assert writes == [(a, 1)] and miss.count() == 0
    hit = vm.ioeventfd(a + 8, 4, datamatch=1)
    v2 = vm.create_vcpu()
    vm.write_guest(layout.PARAM_GPA, struct.pack("<QQQ", layout.PARAM_MAGIC, 1, a + 8))
    v2.setup_long_mode(write_tables=False)
    assert _run_collect(v2) == [] and hit.count() == 1


def test_pio_ioeventfd_absorbs_port_writes(vm):
    # The marker port is an ordinary PIO port: bind an ioeventfd to it with datamatch on
    # the 'probe' marker, and that one OUT never reaches userspace.
    v = _doorbell_vm(vm, [])
    io = vm.ioeventfd(layout.MARKER_PORT, 1, pio=True, datamatch=layout.MARK_PROBE)
    seen = []
    while True:
        ex = v.run()
        if isinstance(ex, Io) and ex.port == layout.MARKER_PORT:
            seen.append(ex.value)
        elif isinstance(ex, Mmio):
            v.set_mmio_read_data(0, ex.length)
        elif isinstance(ex, Hlt):
            break
    assert layout.MARK_PROBE not in seen and layout.MARK_START in seen
    assert io.count() == 1


def test_deassign_makes_the_write_exit_again(vm):
    a = layout.DOORBELL_BASE
    v = _doorbell_vm(vm, [a])
    io = vm.ioeventfd(a, 4)
    io.deassign()
    assert _run_collect(v) == [(a, 1)]
    assert io.count() == 0
    with pytest.raises(KvmError, match="ENOENT"):
        vm._ioeventfd_ioctl(io.efd, a, 4, False, None, deassign=True)


def test_duplicate_ioeventfd_is_eexist(vm):
    vm.ioeventfd(layout.DOORBELL_BASE, 4)
    with pytest.raises(KvmError) as e:
        vm.ioeventfd(layout.DOORBELL_BASE, 4)
    assert e.value.errno == errno.EEXIST
    assert "already covers MMIO 0xd0000000 len 4" in str(e.value)
    assert len(vm.ioeventfds) == 1   # the failed attempt's eventfd was closed


def test_invalid_ioeventfd_length(vm):
    with pytest.raises(KvmError, match="length 3 is invalid: use 0, 1, 2, 4 or 8"):
        vm.ioeventfd(layout.DOORBELL_BASE, 3)


def test_raw_tier_returns_errno(vm):
    efd = os.eventfd(0)
    try:
        assert vm.try_ioeventfd(efd, layout.DOORBELL_BASE, 3) == errno.EINVAL
        assert vm.try_set_user_memory_region(0, 0x1001, 0x1000, 0) == errno.EINVAL
    finally:
        os.close(efd)


def test_memory_slot_errors(vm):
    vm.add_memory(0, layout.RAM_SIZE)
    with pytest.raises(KvmError, match="overlaps slot 0") as e:
        vm.add_memory(0x100000, 0x200000)
    assert e.value.errno == errno.EEXIST
    with pytest.raises(KvmError, match="page-aligned"):
        vm.add_memory(0x300800, 0x1000)
    with pytest.raises(PyvmmError, match="size 0"):
        vm.add_memory(0x400000, 0)
    # The kernel's own answer to a zero-sized region for an unknown slot:
    assert vm.try_set_user_memory_region(7, 0x400000, 0, 0) == errno.EINVAL
    assert set(vm.slots) == {0}


def test_slot_move_delete_and_flags(vm):
    s = vm.add_memory(0x400000, 0x200000)
    s.memory.write(0, b"pattern!")
    vm.move_slot(s.slot, 0x800000)
    assert vm.read_guest(0x800000, 8) == b"pattern!"
    vm.set_slot_flags(s.slot, 1)     # dirty logging on
    vm.set_slot_flags(s.slot, 0)
    vm.delete_slot(s.slot)
    assert s.slot not in vm.slots and not s.memory.closed   # memory outlives the slot
    vm.add_memory(0x800000, 0x200000, memory=s.memory)      # re-map the same memory
    assert vm.read_guest(0x800000, 8) == b"pattern!"


def test_user_memory_region2(vm):
    s = vm.add_memory(0, layout.RAM_SIZE, v2=True)
    assert s.slot == 0
    with pytest.raises(KvmError, match="KVM_SET_USER_MEMORY_REGION2"):
        vm.add_memory(0, 0x1000, v2=True, slot=1)


def test_missing_kvm_device():
    with pytest.raises(KvmUnavailable, match="does not exist"):
        Kvm("/dev/nonexistent-kvm")


def test_kvm_without_permission(tmp_path):
    # Root bypasses file modes, so drop to 'nobody' in a child process to see EACCES.
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            Kvm()
            msg = "opened"
        except KvmUnavailable as e:
            msg = str(e)
        except Exception as e:  # noqa: BLE001
            msg = f"other: {e!r}"
        os.write(w, msg.encode())
        os._exit(0)
    os.close(w)
    msg = os.read(r, 4096).decode()
    os.close(r)
    os.waitpid(pid, 0)
    if msg == "opened":
        pytest.skip("/dev/kvm is world-accessible here")
    assert "permission denied" in msg and "kvm' group" in msg


def test_timeout_stops_a_spinning_guest():
    with pytest.raises(GuestTimeout, match=r"within 0.3 s; stopped at rip 0x1000[0-9a-f]") as e:
        boot("vm,mem,vcpu:1,run", guest="spin", timeout=0.3)
    assert "last marker start" in str(e.value)


def test_triple_fault_reports_shutdown_with_registers():
    with pytest.raises(UnexpectedExit, match="KVM_EXIT_SHUTDOWN") as e:
        boot("vm,mem,vcpu:1,run", guest="triple")
    assert e.value.regs and "rip" in e.value.regs


def test_internal_error_reports_suberror():
    with pytest.raises(UnexpectedExit, match="KVM_EXIT_INTERNAL_ERROR suberror 1 "
                                             r"\(EMULATION\)"):
        boot("vm,mem,vcpu:1,run", guest="mmiofetch")


def test_unknown_guest_name():
    with pytest.raises(GuestError, match="unknown guest 'nope'"):
        guests.info("nope")


def test_too_many_ioeventfds_for_rlimit():
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard))
    try:
        with pytest.raises(ResourceLimit, match="RLIMIT_NOFILE soft limit 128.*ulimit -n"):
            boot("vm,mem,ioev:500,vcpu:1,run")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_failed_boot_leaves_nothing_open():
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(UnexpectedExit):
        boot("vm,mem,ioev:20,vcpu:2,run", guest="triple")
    assert len(os.listdir("/proc/self/fd")) == before


def _rss_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_thousand_boots_leak_no_fds_or_memory():
    rec = rmod.parse("vm,mem,ioev:4,vcpu:1,run:rung,memslot,run")
    for _ in range(50):                       # settle allocator and caches first
        pyrunner.boot(rec, timeout=None)
    fds0, rss0 = len(os.listdir("/proc/self/fd")), _rss_kb()
    for _ in range(1000):
        res = pyrunner.boot(rec, timeout=None)
    assert res["doorbells_completed"] == 4
    fds1, rss1 = len(os.listdir("/proc/self/fd")), _rss_kb()
    assert fds1 == fds0
    assert rss1 - rss0 < 8 * 1024, f"RSS grew by {rss1 - rss0} KiB over 1000 boots"


@pytest.fixture
def gmem(vm):
    """Skip with the reason unless guest_memfd with mmap|init-shared flags is available."""
    from pyvmm.vmm import abi
    if not vm.check_extension(abi.KVM_CAP_GUEST_MEMFD):
        pytest.skip("requires KVM_CAP_GUEST_MEMFD")
    if vm.check_extension(abi.KVM_CAP_GUEST_MEMFD_FLAGS) & 3 != 3:
        pytest.skip("requires guest_memfd flags mmap|init-shared (KVM_CAP_GUEST_MEMFD_FLAGS)")
    return vm


def test_boot_from_guest_memfd(gmem):
    res = boot("vm,mem,ioev:5,vcpu:1,run:rung,memslot,run", memory="gmem")
    assert res["doorbells_completed"] == 5 and res["doorbell_mmio_exits"] == 0
    assert res["bar_value"] == layout.BAR_PATTERN
    hello = boot("vm,mem,vcpu:1,run", guest="hello", memory="gmem")
    assert hello["serial"] == "Hello from a pyvmm real-mode guest\n"


def test_guest_memfd_bad_flags_are_explained(gmem):
    vm = gmem
    with pytest.raises(KvmError, match="flags 0x80 include bits this host does not support"):
        vm.create_guest_memfd(layout.RAM_SIZE, 0x80)
    with pytest.raises(KvmError, match="multiple of the page size"):
        vm.create_guest_memfd(12345, 0)
