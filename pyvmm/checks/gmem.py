"""`pyvmm check guest-memfd`: guest_memfd lifecycle cases, each with a stated expectation.

Every case builds a fresh VM whose vCPU runs the readloop guest from ordinary RAM, with
a guest_memfd (flags mmap | init-shared) holding PROBE_PATTERN bound at PROBE_GPA, and
reports what KVM returned. The expected outcomes follow the guest_memfd design: a
binding does not keep the file open (the file pins the VM, not the other way round), so
when the last reference to the file goes away KVM invalidates the binding, and the
guest's next access to that range cannot reach the freed memory; while a mapping or fd keeps the file alive, the slot keeps working. On this
project's 6.18 host the invalidated range reads as MMIO. docs/checks.md lists every case.
"""

from __future__ import annotations

import errno
import threading
import time
from dataclasses import dataclass, field

from ..vmm import abi, layout
from ..errors import CheckSkipped, KvmError, PyvmmError  # noqa: F401 (CheckSkipped re-exported)
from ..vmm.exits import Io, MemoryFault, Mmio
from ..vmm.memory import GuestMemory
from .races import SENTINEL, CheckError, long_mode_vm

GMEM_SIZE = 0x200000
FLAGS_MMAP, FLAGS_INIT_SHARED = 1, 2


@dataclass
class Case:
    name: str
    expected: str
    observed: list[str] = field(default_factory=list)
    ok: bool = True
    elapsed_s: float = 0.0

    def see(self, text: str, ok: bool = True) -> None:
        self.observed.append(text)
        self.ok = self.ok and ok

    def to_dict(self) -> dict:
        return {"case": self.name, "expected": self.expected, "observed": self.observed,
                "ok": self.ok, "elapsed_s": round(self.elapsed_s, 4)}


def supported() -> str | None:
    """None when the check can run here, else the reason it cannot."""
    from ..vmm.kvm import Kvm
    with Kvm() as kvm, kvm.create_vm() as vm:
        if not vm.check_extension(abi.KVM_CAP_GUEST_MEMFD):
            return "no KVM_CAP_GUEST_MEMFD"
        flags = vm.check_extension(abi.KVM_CAP_GUEST_MEMFD_FLAGS)
        if flags & 3 != 3:
            return (f"guest_memfd flags {flags:#x} lack mmap|init-shared (0x3), which the cases "
                    "use to fill the memory from userspace")
        if not vm.check_extension(abi.KVM_CAP_USER_MEMORY2):
            return "no KVM_CAP_USER_MEMORY2"
    return None


class Probe:
    """Drives readloop one access at a time: probe(k) returns the outcomes of k reads
    ('memory', 'mmio', 'corrupt:<value>', or 'efault', 'error:<errno>')."""

    def __init__(self, vcpu):
        self.vcpu = vcpu
        self.pending_read = False

    def step(self) -> str | None:
        err = self.vcpu.try_run()
        if err:
            kind = "efault" if err == errno.EFAULT else f"error:{errno.errorcode.get(err, err)}"
            ex = self.vcpu.last_exit()
            if isinstance(ex, MemoryFault):
                kind += f" (memory fault at {ex.gpa:#x})"
            return kind
        ex = self.vcpu.last_exit()
        if isinstance(ex, Mmio) and not ex.is_write:
            self.vcpu.set_mmio_read_data(SENTINEL, ex.length)
            self.pending_read = True
            return "mmio"
        if isinstance(ex, Io) and ex.port == layout.DATA_PORT:
            if self.pending_read:
                self.pending_read = False
                return None
            return "memory" if ex.value == layout.PROBE_PATTERN else f"corrupt:{ex.value:#x}"
        if isinstance(ex, (Io, Mmio)):
            return None
        return f"exit:{type(ex).__name__}"

    def reads(self, k: int) -> list[str]:
        out: list[str] = []
        guard = 0
        while len(out) < k:
            guard += 1
            if guard > 20 * k + 20:
                raise CheckError("readloop made no progress")
            r = self.step()
            if r is None:
                continue
            out.append(r)
            if r.startswith(("efault", "error", "exit")):
                break
        return out


def _summary(outcomes: list[str]) -> str:
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o] = counts.get(o, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in counts.items()) or "nothing"


class _Env:
    """A VM running readloop, with a filled guest_memfd ready to bind at PROBE_GPA."""

    def __init__(self):
        self.kvm, self.vm, self.vcpu = long_mode_vm("readloop")
        self.gmem = self.vm.create_guest_memfd(GMEM_SIZE, FLAGS_MMAP | FLAGS_INIT_SHARED)
        self.mem = GuestMemory(GMEM_SIZE, fd=self.gmem.fd)
        self.mem.write(0, layout.PROBE_PATTERN.to_bytes(4, "little"))
        self.vm.memories.append(self.mem)
        self.probe = Probe(self.vcpu)

    def bind(self, gpa: int = layout.PROBE_GPA, slot: int | None = None):
        return self.vm.add_memory(gpa, GMEM_SIZE, memory=self.mem, slot=slot,
                                  guest_memfd=self.gmem, guest_memfd_offset=0)

    def close(self):
        self.vcpu.close()
        self.vm.close()
        self.kvm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _expect(case: Case, what: str, outcomes: list[str], want: str) -> None:
    ok = bool(outcomes) and all(o.startswith(want) for o in outcomes)
    case.see(f"{what}: {_summary(outcomes)}", ok)


def case_close_fd_keep_mapping(reads: int) -> Case:
    c = Case("close-fd-while-bound",
             "close() of the guest_memfd fd succeeds while the slot uses it; the VMM's "
             "mapping still holds the file, so the guest keeps reading the pattern")
    with _Env() as env:
        env.bind()
        _expect(c, "reads before close", env.probe.reads(reads), "memory")
        env.gmem.close()
        c.see("close(guest_memfd fd): ok")
        _expect(c, "reads after close", env.probe.reads(reads), "memory")
    return c


def case_last_reference_gone(reads: int) -> Case:
    c = Case("last-reference-gone-while-bound",
             "closing the fd and unmapping the last mapping while the slot is bound "
             "invalidates the binding: no guest read returns the freed contents; each access "
             "exits to userspace (as MMIO, or as KVM_RUN failing with EFAULT and a memory-"
             "fault exit), and nothing hangs")
    with _Env() as env:
        env.bind()
        _expect(c, "reads before", env.probe.reads(reads), "memory")
        env.gmem.close()
        env.vm.memories.remove(env.mem)
        env.mem.close()
        c.see("close(fd) and munmap: ok")
        after = env.probe.reads(reads)
        stale = [o for o in after if o == "memory" or o.startswith("corrupt")]
        c.see(f"reads after: {_summary(after)}", bool(after) and not stale)
    return c


def case_delete_then_close(reads: int) -> Case:
    c = Case("delete-slot-then-close",
             "deleting the slot succeeds and the range becomes MMIO; closing the fd "
             "afterwards succeeds and changes nothing for the guest")
    with _Env() as env:
        s = env.bind()
        _expect(c, "reads while bound", env.probe.reads(reads), "memory")
        env.vm.delete_slot(s.slot)
        c.see("delete slot: ok")
        _expect(c, "reads after delete", env.probe.reads(reads), "mmio")
        env.gmem.close()
        c.see("close(guest_memfd fd): ok")
        _expect(c, "reads after close", env.probe.reads(reads), "mmio")
    return c


def case_rebind(reads: int) -> Case:
    c = Case("rebind-same-range",
             "binding the same guest_memfd range to a second slot while the first holds it "
             "fails with EINVAL (pyvmm names the slot holding it); after deleting the first "
             "slot the range binds to a new slot, and the guest reads the same contents "
             "through it")
    with _Env() as env:
        first = env.bind()
        other = env.vm.free_slot()
        try:
            env.vm.add_memory(layout.PROBE_ALT_GPA, GMEM_SIZE, memory=env.mem, slot=other,
                              guest_memfd=env.gmem, guest_memfd_offset=0)
            c.see("second binding of the same range: accepted (expected EINVAL)", False)
            env.vm.delete_slot(other)
        except KvmError as e:
            c.see(f"second binding of the same range: {e.errno_name}: {e.hint}",
                  e.errno == errno.EINVAL and f"bound to slot {first.slot}" in e.hint)
        env.vm.delete_slot(first.slot)
        c.see("delete the first slot: ok")
        env.bind(slot=other)
        c.see(f"bind the range to slot {other}: ok")
        _expect(c, "reads through the new slot", env.probe.reads(reads), "memory")
    return c


def case_delete_while_running(reads: int) -> Case:
    c = Case("delete-slot-while-vcpu-runs",
             "deleting the slot while the vCPU thread is inside its read loop returns 0 "
             "within the bound; the vCPU's later reads exit as MMIO; nothing hangs")
    with _Env() as env:
        s = env.bind()
        outcomes: list[str] = []
        stop = threading.Event()
        failure: list[BaseException] = []

        def vcpu_thread():
            try:
                while not stop.is_set():
                    outcomes.extend(env.probe.reads(1))
            except BaseException as e:
                failure.append(e)
        t = threading.Thread(target=vcpu_thread, daemon=True)
        t.start()
        while len(outcomes) < reads and t.is_alive():
            time.sleep(0.001)
        started = len(outcomes)
        t0 = time.monotonic()
        env.vm.delete_slot(s.slot)
        dt = time.monotonic() - t0
        c.see(f"delete slot with the vCPU running: ok in {dt * 1e3:.2f} ms", dt < 5.0)
        mark = len(outcomes)
        deadline = time.monotonic() + 5.0
        while len(outcomes) < mark + reads and t.is_alive() and time.monotonic() < deadline:
            time.sleep(0.001)
        stop.set()
        t.join(timeout=5.0)
        if t.is_alive():
            env.vcpu.kick()
            t.join(timeout=5.0)
        c.see("vCPU thread finished", not t.is_alive() and not failure)
        if failure:
            c.see(f"vCPU thread failed: {failure[0]}", False)
        # One read may be in flight at each boundary; reads while the delete ran may see
        # either side, so they are only counted.
        before, during, after = (outcomes[:max(1, started - 1)], outcomes[started:mark + 1],
                                 outcomes[mark + 1:])
        _expect(c, "reads done before the delete began", before, "memory")
        c.see(f"reads while the delete ran (either outcome allowed): {_summary(during)}")
        _expect(c, "reads begun after the delete returned", after, "mmio")
    return c


def case_invalid_create() -> Case:
    c = Case("invalid-create",
             "KVM_CREATE_GUEST_MEMFD rejects unknown flags, size 0 and a size that is not a "
             "multiple of the page size with EINVAL, and pyvmm names the bad argument")
    from ..vmm.kvm import Kvm
    with Kvm() as kvm, kvm.create_vm() as vm:
        for size, flags, what in ((GMEM_SIZE, 1 << 31, "flags 0x80000000"),
                                  (0, 0, "size 0"), (4097, 0, "size 4097")):
            try:
                g = vm.create_guest_memfd(size, flags)
                g.close()
                c.see(f"{what}: accepted (expected EINVAL)", False)
            except KvmError as e:
                c.see(f"{what}: {e.errno_name}: {e.hint}", e.errno == errno.EINVAL and
                      bool(e.hint))
    return c


CASES = [case_close_fd_keep_mapping, case_last_reference_gone, case_delete_then_close,
         case_rebind, case_delete_while_running]


def run_cases(reads: int = 50, progress=None) -> list[Case]:
    reason = supported()
    if reason:
        raise CheckSkipped(reason)
    out = []
    fns = CASES + [lambda reads: case_invalid_create()]
    for i, fn in enumerate(fns):
        t0 = time.monotonic()
        try:
            case = fn(reads)
        except PyvmmError as e:
            case = Case(getattr(fn, "__name__", "case"), "runs to the end")
            case.see(f"error: {e}", False)
        case.elapsed_s = time.monotonic() - t0
        out.append(case)
        if progress:
            progress(i + 1, len(fns))
    return out

