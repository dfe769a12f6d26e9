"""The two concurrency checks: ioeventfd-ordering and memslot-coherence.

Both run a check guest on vCPU 0 in the calling thread and a mutator in a second thread
that publishes a sequence number around every ioctl (see attribution.py). The vCPU loop
records (start, end, exit, value, eventfd count) per KVM_RUN; the records are judged at
the end. A watchdog kicks the vCPU if a KVM_RUN outlives the duration bound.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from dataclasses import dataclass, field

from ..vmm import layout
from ..latency import latency_summary
from ..errors import CheckError, PyvmmError  # noqa: F401 (CheckError re-exported)
from ..vmm.exits import Interrupted, Io, Mmio
from ..vmm.kvm import Kvm
from ..vmm.kvmstats import StatsReader, diff, interesting
from . import attribution as attr

SENTINEL = 0x5E5E5E5E
PATTERN = layout.PROBE_PATTERN
PROBE_SLOT_SIZE = 0x1000


@dataclass
class CheckResult:
    name: str
    iterations: int = 0
    runs: int = 0
    elapsed_s: float = 0.0
    stopped_by: str = ""
    verdict: attr.Verdict | None = None
    latencies: dict = field(default_factory=dict)      # op name -> [ns]
    stats: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def violations(self) -> int:
        return len(self.verdict.violations) if self.verdict else 0

    def latency_summary(self) -> dict:
        out = {}
        for name, xs in self.latencies.items():
            if xs:
                out[name] = latency_summary(xs)
        return out

    def to_dict(self) -> dict:
        return {"check": self.name, "iterations": self.iterations, "kvm_runs": self.runs,
                "elapsed_s": round(self.elapsed_s, 3), "stopped_by": self.stopped_by,
                "violations": self.violations,
                "verdict": self.verdict.to_dict() if self.verdict else None,
                "latency": self.latency_summary(), "stats": self.stats, **self.extra}


class Mutator(threading.Thread):
    """Runs ops[k % len(ops)] for k = 0, 1, ... and publishes seq = 2k+1 before and
    2k+2 after each. Stops after the op in flight when `stop` is set."""

    def __init__(self, ops: list, names: list[str], pause_s: float = 0.0):
        super().__init__(daemon=True, name="pyvmm-mutator")
        self.ops, self.names, self.pause_s = ops, names, pause_s
        self.seq = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.latencies: dict[str, list[int]] = {n: [] for n in dict.fromkeys(names)}

    def run(self) -> None:
        k = 0
        try:
            while not self.stop.is_set():
                i = k % len(self.ops)
                self.seq = 2 * k + 1
                t0 = time.monotonic_ns()
                self.ops[i]()
                dt = time.monotonic_ns() - t0
                self.seq = 2 * k + 2
                self.latencies[self.names[i]].append(dt)
                k += 1
                if self.pause_s:
                    time.sleep(self.pause_s)
        except BaseException as e:     # reported by the vCPU side, never swallowed
            self.error = e


def long_mode_vm(guest: str):
    """A new Kvm, VM and vCPU 0 in long mode at the start of `guest`."""
    kvm = Kvm()
    try:
        vm = kvm.create_vm()
        vm.add_ram_with_guest(guest)
        vcpu = vm.create_vcpu()
        vcpu.setup_long_mode()
    except BaseException:
        kvm.close()
        raise
    return kvm, vm, vcpu


def _classify(ex) -> tuple[str, int]:
    if isinstance(ex, Mmio):
        return ("mmio-write" if ex.is_write else "mmio-read"), ex.addr
    if isinstance(ex, Io) and ex.is_write:
        if ex.port == layout.DATA_PORT:
            return "pio-data", ex.value
        if ex.port == layout.MARKER_PORT:
            return ("pio-marker" if ex.value == layout.MARK_LOOP else "pio-start"), ex.value
    if isinstance(ex, Interrupted):
        return "interrupted", 0
    return type(ex).__name__.lower(), 0


def _vcpu_loop(vcpu, mutator: Mutator, iterations: int, duration_s: float, progress,
               efd: int | None = None, on_mmio_read=None) -> tuple[list, int, str]:
    from ..vmm.kicker import install_kick_handler, kick_after
    install_kick_handler()
    runs: list[attr.Run] = []
    done = 0
    deadline = time.monotonic() + duration_s
    stopped_by = "iterations"
    dog = kick_after(deadline + 1.0 - time.monotonic(), vcpu)
    last_report = 0.0
    try:
        while done < iterations:
            if mutator.error is not None:
                stopped_by = "mutator error"
                break
            now = time.monotonic()
            if now >= deadline:
                stopped_by = "duration"
                break
            start = mutator.seq
            ex = vcpu.run()
            end = mutator.seq
            kind, value = _classify(ex)
            signals = 0
            if efd is not None:
                try:
                    signals = os.eventfd_read(efd)
                except BlockingIOError:
                    signals = 0
            if kind == "mmio-read" and on_mmio_read:
                on_mmio_read(ex)
            elif kind == "interrupted":
                if time.monotonic() >= deadline:
                    stopped_by = "duration"
                    break
                continue
            elif kind not in ("mmio-write", "pio-data", "pio-marker", "pio-start"):
                raise CheckError(f"unexpected exit from the check guest: {ex!r} "
                                 f"(rip {vcpu.get_regs().rip:#x})")
            runs.append(attr.Run(start, end, kind, value, signals))
            if kind == "pio-marker":
                done += 1
            if progress and now - last_report > 0.2:
                progress(done, iterations)
                last_report = now
    finally:
        dog.cancel()
    if progress:
        progress(done, iterations)
    return runs, done, stopped_by


def _stats_snapshot(owner):
    try:
        return StatsReader.open(owner)
    except PyvmmError:
        return None


def _run_with_mutator(name, vcpu, vm, ops, op_names, iterations, duration_s, progress,
                      efd=None, on_mmio_read=None, pause_s=0.0) -> tuple[CheckResult, list]:
    res = CheckResult(name)
    vm_stats, vcpu_stats = _stats_snapshot(vm), _stats_snapshot(vcpu)
    before = (vm_stats.read() if vm_stats else None, vcpu_stats.read() if vcpu_stats else None)
    mut = Mutator(ops, op_names, pause_s)
    t0 = time.monotonic()
    mut.start()
    try:
        runs, done, stopped = _vcpu_loop(vcpu, mut, iterations, duration_s, progress, efd,
                                         on_mmio_read)
    finally:
        mut.stop.set()
        mut.join(timeout=30)
    res.elapsed_s = time.monotonic() - t0
    if mut.is_alive():
        raise CheckError("the mutator thread did not finish within 30 s of being stopped "
                         f"(stuck in {op_names[(mut.seq - 1) // 2 % len(op_names)]}?)")
    if mut.error is not None:
        raise CheckError(f"the mutator failed: {mut.error}") from mut.error
    res.iterations, res.runs, res.stopped_by = done, len(runs), stopped
    res.latencies = mut.latencies
    res.extra["operations"] = mut.seq // 2
    for label, reader, snap in (("vm", vm_stats, before[0]), ("vcpu", vcpu_stats, before[1])):
        if reader and snap is not None:
            res.stats[label] = interesting(diff(snap, reader.read(), reader.layout))
            reader.close()
    return res, runs


DEFAULT_HOLD_S = 0.0005


def ioeventfd_ordering(iterations: int = 100_000, duration_s: float = 60.0,
                       progress=None, hold_s: float = DEFAULT_HOLD_S) -> CheckResult:
    """See docs/checks.md: assign/deassign one MMIO ioeventfd on the doorbell the guest
    keeps writing; every settled write must be absorbed (assigned) or exit (not)."""
    kvm, vm, vcpu = long_mode_vm("ringloop")
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    addr = layout.DOORBELL_BASE
    try:
        def op(deassign):
            def f():
                err = vm.try_ioeventfd(efd, addr, 4, deassign=deassign)
                if err:
                    raise CheckError(f"KVM_IOEVENTFD {'deassign' if deassign else 'assign'} "
                                     f"failed: {errno.errorcode.get(err, err)}")
            return f
        res, runs = _run_with_mutator("ioeventfd-ordering", vcpu, vm, [op(False), op(True)],
                                ["assign", "deassign"], iterations, duration_s, progress,
                                efd=efd, pause_s=hold_s)
        if vm.try_ioeventfd(efd, addr, 4, deassign=True) not in (0, errno.ENOENT):
            raise CheckError("could not deassign the doorbell at the end")
    finally:
        vcpu.close()
        vm.close()
        kvm.close()
        os.close(efd)
    res.verdict = attr.judge_ordering(runs)
    return res


def memslot_coherence(iterations: int = 100_000, duration_s: float = 60.0,
                      progress=None, hold_s: float = DEFAULT_HOLD_S) -> CheckResult:
    """See docs/checks.md: a slot at PROBE_GPA is added read-write, deleted, added
    read-only, moved away and back, deleted, over and over, while the guest reads and
    writes PROBE_GPA; every settled access must match the slot state."""
    from ..vmm.abi import KVM_CAP_READONLY_MEM, KVM_MEM_READONLY
    from ..vmm.memory import GuestMemory
    kvm, vm, vcpu = long_mode_vm("readloop")
    if not kvm.check_extension(KVM_CAP_READONLY_MEM):
        for owner in (vcpu, vm, kvm):
            owner.close()
        raise CheckError("KVM_CAP_READONLY_MEM is missing: the read-only half of the check "
                         "cannot run")
    mem = GuestMemory(PROBE_SLOT_SIZE)
    mem.write(0, PATTERN.to_bytes(4, "little"))
    vm.memories.append(mem)
    slot_id = vm.free_slot()
    probe, alt = layout.PROBE_GPA, layout.PROBE_ALT_GPA
    try:
        ops = [lambda: vm.add_memory(probe, PROBE_SLOT_SIZE, slot=slot_id, memory=mem),
               lambda: vm.delete_slot(slot_id),
               lambda: vm.add_memory(probe, PROBE_SLOT_SIZE, flags=KVM_MEM_READONLY,
                                     slot=slot_id, memory=mem),
               lambda: vm.move_slot(slot_id, alt),
               lambda: vm.move_slot(slot_id, probe),
               lambda: vm.delete_slot(slot_id)]

        def answer(ex):
            vcpu.set_mmio_read_data(SENTINEL, ex.length)
        res, runs = _run_with_mutator("memslot-coherence", vcpu, vm, ops, attr.COHERENCE_OP_NAMES,
                                iterations, duration_s, progress, on_mmio_read=answer,
                                pause_s=hold_s)
        corrupted = mem.read(0, 4) != PATTERN.to_bytes(4, "little")
    finally:
        vcpu.close()
        vm.close()
        kvm.close()
    res.verdict = attr.judge_coherence(runs, PATTERN, SENTINEL)
    res.extra["pattern_intact"] = not corrupted
    return res
