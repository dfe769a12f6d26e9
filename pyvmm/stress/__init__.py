"""`pyvmm stress`: concurrent ioctls on one VM, with a hang watchdog.

K vCPU threads run the stressloop guest while one thread per kind of operation mutates
the VM: ioeventfd assign/deassign on the doorbells the guests ring, memslot add, move,
delete, dirty-logging toggles and dirty-log reads at the address the guests read,
coalesced-MMIO zone register/unregister where the guests write, creation of extra
vCPUs, and binary-stats reads. The paths taken are the ones whose lock order (kvm->lock,
slots_lock, kvm->srcu, vcpu->mutex) has been broken before.

Every ioctl goes through OpTracker, which records what each thread is inside. The
watchdog reports any call that has not returned within the bound: thread, operation,
arguments, elapsed time, and the kernel's view of that thread (/proc/self/task/TID:
wchan, syscall, stack where readable).

Each worker draws its operations from random.Random(f"{seed}:{worker}"), so the same
seed gives every worker the same sequence of operations (their interleaving is up to
the scheduler).
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

from ..vmm import abi, layout
from ..latency import Latencies, latency_summary  # noqa: F401 (Latencies re-exported)
from ..errors import KvmError, PyvmmError
from ..hostinfo import process_facts
from ..vmm.exits import Interrupted, Mmio
from ..vmm.kvm import Kvm
from ..vmm.kvmstats import StatsReader

DOORBELLS = 16
PROBE_SIZE = 0x10000          # 16 pages, so the dirty log has something to say
SENTINEL = 0x5E5E5E5E
SEQUENCE_KEPT = 200


def task_facts(tid: int) -> dict:
    """What the kernel says a thread of this process is doing."""
    out = {}
    for name in ("wchan", "syscall", "stack", "stat"):
        try:
            with open(f"/proc/self/task/{tid}/{name}") as f:
                out[name] = f.read().strip()
        except OSError as e:
            out[name] = f"unreadable: {e.strerror}"
    if "stat" in out and not out["stat"].startswith("unreadable"):
        # state is the field after the parenthesised command name
        out["state"] = out["stat"].rsplit(")", 1)[-1].split()[0]
    return out


@dataclass
class Current:
    op: str
    args: str
    t0: float
    native_id: int
    thread: str


class OpTracker:
    """Times every operation and remembers what each thread is inside right now."""

    def __init__(self):
        self.current: dict[int, Current] = {}
        self.lat: dict[str, Latencies] = {}
        self.errors: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def op(self, name: str, args: str = ""):
        me = threading.current_thread()
        cur = Current(name, args, time.monotonic(), threading.get_native_id(), me.name)
        self.current[me.ident] = cur
        t0 = time.monotonic_ns()
        try:
            yield
        except KvmError as e:
            with self.lock:
                self.errors[name][e.errno_name] += 1
        finally:
            dt = time.monotonic_ns() - t0
            self.current.pop(me.ident, None)
            with self.lock:
                lat = self.lat.get(name)
                if lat is None:
                    lat = self.lat[name] = Latencies(name)
                lat.append(dt)

    def overdue(self, bound_s: float) -> list[Current]:
        now = time.monotonic()
        return [c for c in list(self.current.values()) if now - c.t0 > bound_s]


class Watchdog(threading.Thread):
    """Calls on_hang(report) once when an operation outlives `bound_s`.

    The report waits until every call still in progress has outlived the bound too, or
    one more `bound_s` has passed: the two sides of a deadlock start their calls at
    different times (a KVM_RUN may have begun well before the ioctl that then takes the
    lock it needs), and a report taken at the first overdue call would name one side."""

    def __init__(self, tracker: OpTracker, bound_s: float, on_hang):
        super().__init__(daemon=True, name="pyvmm-watchdog")
        self.tracker, self.bound_s, self.on_hang = tracker, bound_s, on_hang
        self.stop = threading.Event()
        self.report: dict | None = None

    def run(self):
        while not self.stop.wait(min(0.2, self.bound_s / 4)):
            if self.tracker.overdue(self.bound_s):
                self._settle()
                if self.stop.is_set():      # the run ended while it waited
                    return
                late = self.tracker.overdue(self.bound_s)
                if not late:        # it returned while the others were waited for
                    continue
                now = time.monotonic()
                self.report = {
                    "bound_s": self.bound_s,
                    "stuck": [{"thread": c.thread, "tid": c.native_id, "operation": c.op,
                               "arguments": c.args, "elapsed_s": round(now - c.t0, 3),
                               "kernel": task_facts(c.native_id)} for c in late],
                    "in_progress": [{"thread": c.thread, "operation": c.op,
                                     "elapsed_s": round(now - c.t0, 3)}
                                    for c in list(self.tracker.current.values())],
                }
                self.on_hang(self.report)
                return

    def _settle(self) -> None:
        until = time.monotonic() + self.bound_s
        while time.monotonic() < until and not self.stop.is_set():
            now = time.monotonic()
            if all(now - c.t0 > self.bound_s for c in list(self.tracker.current.values())):
                return
            time.sleep(0.05)


@dataclass
class StressConfig:
    duration_s: float = 10.0
    seed: int = 1
    vcpus: int = 2
    extra_vcpus: int = 6
    bound_s: float = 10.0
    # Keep going past duration_s until every worker has logged this many steps and every
    # expected operation has run at least once (0: stop at duration_s). This lets a test
    # synchronise on work done rather than on how fast the host runs; it is capped at
    # EXTRA_CAP_S more seconds.
    min_each: int = 0


EXTRA_CAP_S = 120.0


@dataclass
class StressResult:
    config: StressConfig
    elapsed_s: float = 0.0
    ops: dict = field(default_factory=dict)
    sequences: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)
    hang: dict | None = None
    guest_exits: dict = field(default_factory=dict)
    # Open fds, RSS and threads of this process before and after (hostinfo.process_facts).
    process: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"config": self.config.__dict__, "elapsed_s": round(self.elapsed_s, 3),
                "process": self.process,
                "ops": self.ops, "skipped": self.skipped, "hang": self.hang,
                "guest_exits": self.guest_exits,
                "sequences": {k: v[:50] for k, v in self.sequences.items()}}


class Stress:
    def __init__(self, cfg: StressConfig, on_hang=None):
        if cfg.vcpus < 1 or cfg.duration_s <= 0 or cfg.bound_s <= 0 or cfg.extra_vcpus < 0:
            raise PyvmmError("stress needs --vcpus >= 1, --duration > 0, --bound > 0 and "
                             "--extra-vcpus >= 0")
        self.cfg = cfg
        self.tracker = OpTracker()
        self.stop = threading.Event()
        self.on_hang = on_hang
        self.sequences: dict[str, list[str]] = {}
        self.exits: dict[str, int] = defaultdict(int)
        self.failures: list[str] = []

    # --- workers ---------------------------------------------------------------------
    def _rng(self, worker: str) -> random.Random:
        self.sequences[worker] = []
        return random.Random(f"{self.cfg.seed}:{worker}")

    def _note(self, worker: str, what: str) -> None:
        seq = self.sequences[worker]
        if len(seq) < SEQUENCE_KEPT:
            seq.append(what)

    def _vcpu_worker(self, vcpu):
        t = self.tracker
        while not self.stop.is_set():
            with t.op("KVM_RUN", f"vcpu {vcpu.id}"):
                ex = vcpu.run()
            kind = type(ex).__name__
            if isinstance(ex, Mmio):
                kind = "MMIO write" if ex.is_write else "MMIO read"
                if not ex.is_write:
                    vcpu.set_mmio_read_data(SENTINEL, ex.length)
            elif isinstance(ex, Interrupted):
                continue
            elif kind not in ("Io",):
                raise PyvmmError(f"vCPU {vcpu.id}: unexpected exit {ex!r}")
            self.exits[kind] += 1

    def _ioeventfd_worker(self, vm, efds):
        rng, t = self._rng("ioeventfd"), self.tracker
        assigned = [False] * DOORBELLS
        while not self.stop.is_set():
            i = rng.randrange(DOORBELLS)
            addr = layout.DOORBELL_BASE + i * layout.DOORBELL_STRIDE
            name = "KVM_IOEVENTFD deassign" if assigned[i] else "KVM_IOEVENTFD assign"
            self._note("ioeventfd", f"{name.split()[-1]} {i}")
            with t.op(name, f"doorbell {i} at {addr:#x}, eventfd {efds[i]}"):
                err = vm.try_ioeventfd(efds[i], addr, 4, deassign=assigned[i])
                if err:
                    raise KvmError("KVM_IOEVENTFD", err)
                assigned[i] = not assigned[i]
        for i in range(DOORBELLS):
            if assigned[i]:
                vm.try_ioeventfd(efds[i], layout.DOORBELL_BASE + i * layout.DOORBELL_STRIDE,
                                 4, deassign=True)

    def _memslot_worker(self, vm, mem):
        rng, t = self._rng("memslot"), self.tracker
        slot = vm.free_slot()
        present, logging, gpa = False, False, layout.PROBE_GPA
        while not self.stop.is_set():
            if not present:
                choice = "add"
            else:
                choice = rng.choice(["move", "delete", "dirty-log toggle", "get dirty log",
                                     "get dirty log"])
                if choice == "get dirty log" and not logging:
                    choice = "dirty-log toggle"
            self._note("memslot", choice)
            if choice == "add":
                flags = abi.KVM_MEM_LOG_DIRTY_PAGES if rng.random() < 0.5 else 0
                with t.op("KVM_SET_USER_MEMORY_REGION add",
                          f"slot {slot} at {gpa:#x}+{PROBE_SIZE:#x} flags {flags:#x}"):
                    vm.add_memory(gpa, PROBE_SIZE, flags=flags, slot=slot, memory=mem)
                    present, logging = True, bool(flags)
            elif choice == "move":
                new = layout.PROBE_ALT_GPA if gpa == layout.PROBE_GPA else layout.PROBE_GPA
                with t.op("KVM_SET_USER_MEMORY_REGION move",
                          f"slot {slot} {gpa:#x} -> {new:#x}"):
                    vm.move_slot(slot, new)
                    gpa = new
            elif choice == "delete":
                with t.op("KVM_SET_USER_MEMORY_REGION delete", f"slot {slot} at {gpa:#x}"):
                    vm.delete_slot(slot)
                    present = False
            elif choice == "dirty-log toggle":
                flags = 0 if logging else abi.KVM_MEM_LOG_DIRTY_PAGES
                with t.op("KVM_SET_USER_MEMORY_REGION dirty-log toggle",
                          f"slot {slot} flags {flags:#x}"):
                    vm.set_slot_flags(slot, flags)
                    logging = bool(flags)
            else:
                with t.op("KVM_GET_DIRTY_LOG", f"slot {slot}"):
                    vm.get_dirty_log(slot)

    def _coalesced_worker(self, vm):
        rng, t = self._rng("coalesced"), self.tracker
        registered = 0          # size of the registered zone, 0 when none
        while not self.stop.is_set():
            size = registered or rng.choice([0x1000, 0x2000])
            name = ("KVM_UNREGISTER_COALESCED_MMIO" if registered
                    else "KVM_REGISTER_COALESCED_MMIO")
            self._note("coalesced", name.split("_")[1].lower())
            with t.op(name, f"zone {layout.COALESCED_GPA:#x}+{size:#x}"):
                vm.coalesced_mmio(layout.COALESCED_GPA, size, register=not registered)
                registered = 0 if registered else size
            time.sleep(rng.random() * 0.0005)
        if registered:
            vm.coalesced_mmio(layout.COALESCED_GPA, registered, register=False)

    def _vcpu_creator(self, vm, readers):
        rng, t = self._rng("vcpu-create"), self.tracker
        made = 0
        while not self.stop.is_set():
            if made < self.cfg.extra_vcpus:
                self._note("vcpu-create", "create")
                with t.op("KVM_CREATE_VCPU", f"id {self.cfg.vcpus + made}"):
                    v = vm.create_vcpu(self.cfg.vcpus + made)
                    made += 1
                with t.op("KVM_GET_STATS_FD (vcpu)", f"vcpu {v.id}"):
                    readers.append(StatsReader.open(v))
            else:
                self._note("vcpu-create", "stats")
                r = rng.choice(readers)
                with t.op("stats read (vcpu)", "pread of the stats data"):
                    r.read()
            time.sleep(rng.random() * 0.002)

    def _stats_worker(self, vm_stats):
        rng, t = self._rng("stats"), self.tracker
        while not self.stop.is_set():
            self._note("stats", "read")
            with t.op("stats read (vm)", "pread of the stats data"):
                vm_stats.read()
            time.sleep(rng.random() * 0.001)

    def _guard(self, fn, *args):
        def run():
            try:
                fn(*args)
            except BaseException as e:       # reported, and ends the run
                self.failures.append(f"{threading.current_thread().name}: {e}")
                self.stop.set()
        return run

    # --- driver ---------------------------------------------------------------------------
    def run(self, progress=None) -> StressResult:
        cfg = self.cfg
        res = StressResult(cfg)
        res.process["start"] = process_facts()
        from ..vmm.kicker import install_kick_handler
        install_kick_handler()
        with Kvm() as kvm:
            if not kvm.check_extension(abi.KVM_CAP_XEN_HVM):
                res.skipped.append("Xen HVM event channels: skipped: no KVM_CAP_XEN_HVM")
            else:
                res.skipped.append("Xen HVM event channels: not in this run: use "
                                   "pyvmm stress --xen")
            vm = kvm.create_vm()
            try:
                vm.add_ram_with_guest("stressloop")
                vcpus = []
                for i in range(cfg.vcpus):
                    v = vm.create_vcpu(i)
                    v.setup_long_mode(write_tables=(i == 0))
                    vcpus.append(v)
                from ..vmm.memory import GuestMemory
                mem = GuestMemory(PROBE_SIZE)
                vm.memories.append(mem)
                efds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(DOORBELLS)]
                vm_stats = StatsReader.open(vm)
                readers: list = []
                workers = [threading.Thread(target=self._guard(self._vcpu_worker, v),
                                            name=f"vcpu-{v.id}", daemon=True)
                           for v in vcpus]
                workers += [
                    threading.Thread(target=self._guard(self._ioeventfd_worker, vm, efds),
                                     name="ioeventfd", daemon=True),
                    threading.Thread(target=self._guard(self._memslot_worker, vm, mem),
                                     name="memslot", daemon=True),
                    threading.Thread(target=self._guard(self._coalesced_worker, vm),
                                     name="coalesced", daemon=True),
                    threading.Thread(target=self._guard(self._vcpu_creator, vm, readers),
                                     name="vcpu-create", daemon=True),
                    threading.Thread(target=self._guard(self._stats_worker, vm_stats),
                                     name="stats", daemon=True)]

                def hang(report):
                    res.hang = report
                    self.stop.set()
                    if self.on_hang:
                        self.on_hang(report)
                dog = Watchdog(self.tracker, cfg.bound_s, hang)
                dog.start()
                t0 = time.monotonic()
                for w in workers:
                    w.start()
                end = t0 + cfg.duration_s
                cap = end + EXTRA_CAP_S
                while not self.stop.is_set() and (time.monotonic() < end
                                                  or not self._enough(cap)):
                    time.sleep(0.1)
                    if progress:
                        progress(min(time.monotonic() - t0, cfg.duration_s), cfg.duration_s)
                self.stop.set()
                if res.hang is None:
                    for v in vcpus:
                        v.kick()
                    for w in workers:
                        w.join(timeout=cfg.bound_s)
                        if w.is_alive():
                            for v in vcpus:
                                v.kick()
                dog.stop.set()
                res.elapsed_s = time.monotonic() - t0
                if res.hang is not None:
                    # Threads are stuck in the kernel: leave the VM to the process exit.
                    res.ops = self._op_table(res.elapsed_s)
                    return res
                for r in readers:
                    r.close()
                vm_stats.close()
                for fd in efds:
                    os.close(fd)
            finally:
                if res.hang is None:
                    vm.close()
        res.process["end"] = process_facts()
        if self.failures:
            raise PyvmmError("stress worker failed: " + "; ".join(self.failures))
        res.ops = self._op_table(res.elapsed_s)
        res.sequences = self.sequences
        res.guest_exits = dict(self.exits)
        return res

    def _enough(self, cap: float) -> bool:
        """True when min_each is met (or unset), or the cap has passed."""
        n = self.cfg.min_each
        if n <= 0 or time.monotonic() >= cap:
            return True
        if any(len(seq) < n for seq in list(self.sequences.values())):
            return False
        lat = self.tracker.lat
        return all(lat.get(op) for op in EXPECTED_OPS)

    def _op_table(self, elapsed: float) -> dict:
        out = {}
        for name, xs in sorted(self.tracker.lat.items()):
            if not xs:
                continue
            out[name] = {**latency_summary(xs.samples, xs.count, xs.max),
                         "per_s": xs.count / elapsed if elapsed else 0.0,
                         "errors": dict(self.tracker.errors.get(name, {}))}
        return out


# The operation kinds a full run must show (Xen only where the capability exists).
EXPECTED_OPS = ("KVM_RUN", "KVM_IOEVENTFD assign", "KVM_IOEVENTFD deassign",
                "KVM_SET_USER_MEMORY_REGION add", "KVM_SET_USER_MEMORY_REGION move",
                "KVM_SET_USER_MEMORY_REGION delete",
                "KVM_SET_USER_MEMORY_REGION dirty-log toggle", "KVM_GET_DIRTY_LOG",
                "KVM_REGISTER_COALESCED_MMIO", "KVM_UNREGISTER_COALESCED_MMIO",
                "KVM_CREATE_VCPU", "KVM_GET_STATS_FD (vcpu)", "stats read (vm)",
                "stats read (vcpu)")
