"""`pyvmm stress --xen`: the Xen event-channel seed, an ABBA deadlock between kvm->lock
and kvm->srcu in KVM's Xen emulation (6.1 has it; the xen-lock patch and upstream since
Jan 2023 do not).

One vCPU runs the xenloop guest, which sends an event channel in a loop (EVTCHNOP_send
through vmmcall); KVM handles each send in the kernel, on the vCPU thread, inside a
kvm->srcu read section, and delivers it through the shared_info page. Two workers run
beside it:
  - the invalidator drops the host page behind shared_info (madvise MADV_DONTNEED), so
    KVM's cached mapping of it is invalidated and the next send takes the slow path,
    which on 6.1 takes kvm->lock;
  - the filter worker calls KVM_X86_SET_MSR_FILTER, which takes kvm->lock and waits in
    synchronize_srcu(&kvm->srcu) while holding it.
If the vCPU blocks on kvm->lock while the filter worker waits for the vCPU's srcu read
section, neither returns: the watchdog reports both threads with what the kernel says
they are doing (state, wchan, syscall, kernel stack). The threads stay stuck in the
kernel; the caller decides what to do with the process (the lab powers the guest off).
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

from ..vmm import abi, layout
from ..latency import latency_summary
from ..errors import PyvmmError
from ..vmm.exits import Interrupted, Io, Unknown
from ..hostinfo import process_facts
from ..vmm.kvm import Kvm
from . import OpTracker, Watchdog

MADV_DONTNEED = 4
KVM_EXIT_XEN = 34
XEN_FLAGS = abi.KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL | abi.KVM_XEN_HVM_CONFIG_EVTCHN_SEND


@dataclass
class XenStressConfig:
    duration_s: float = 10.0
    seed: int = 1
    bound_s: float = 5.0


@dataclass
class XenStressResult:
    config: XenStressConfig
    skipped: str | None = None
    hang: dict | None = None
    hang_after_s: float | None = None
    elapsed_s: float = 0.0
    sends: int = 0
    invalidations: int = 0
    filter_calls: int = 0
    hypercall_results: dict = field(default_factory=dict)
    ops: dict = field(default_factory=dict)
    process: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"config": self.config.__dict__, "skipped": self.skipped, "hang": self.hang,
                "hang_after_s": self.hang_after_s, "elapsed_s": round(self.elapsed_s, 3),
                "sends": self.sends, "invalidations": self.invalidations,
                "filter_calls": self.filter_calls,
                "hypercall_results": self.hypercall_results, "ops": self.ops, "process": self.process}


def supported() -> str | None:
    """None when this kernel can run the Xen seed, else why not."""
    with Kvm() as kvm:
        have = kvm.check_extension(abi.KVM_CAP_XEN_HVM)
        if not have:
            return "no KVM_CAP_XEN_HVM (KVM built without CONFIG_KVM_XEN)"
        if (have & XEN_FLAGS) != XEN_FLAGS:
            return (f"KVM_CAP_XEN_HVM is {have:#x}: no in-kernel EVTCHNOP_send "
                    "(KVM_XEN_HVM_CONFIG_EVTCHN_SEND)")
        if not kvm.check_extension(abi.KVM_CAP_X86_MSR_FILTER):
            return "no KVM_CAP_X86_MSR_FILTER"
    return None


def run(cfg: XenStressConfig, on_hang=None) -> XenStressResult:
    res = XenStressResult(cfg)
    why = supported()
    if why:
        res.skipped = why
        return res
    from ..vmm.kicker import install_kick_handler
    install_kick_handler()
    res.process["start"] = process_facts()
    tracker = OpTracker()
    stop = threading.Event()
    failures: list[str] = []
    counts = {"sends": 0, "invalidations": 0, "filter": 0}
    results: dict[int, int] = {}      # hypercall return values the guest reported
    kvm = Kvm()
    vm = kvm.create_vm()
    ram = vm.add_ram_with_guest("xenloop")
    vm.xen_hvm_config(XEN_FLAGS)
    vm.xen_set_long_mode(True)
    vm.xen_set_shared_info(layout.XEN_SHINFO_GPA)
    vcpu = vm.create_vcpu(0)
    vcpu.setup_long_mode()
    vcpu.xen_set_vcpu_info(layout.XEN_VCPU_INFO_GPA)
    vm.xen_bind_evtchn(layout.XEN_SEND_PORT, layout.XEN_DELIVER_PORT, vcpu=0)
    page = ram.memory.host_addr + layout.XEN_SHINFO_GPA

    def guard(fn):
        def body():
            try:
                fn()
            except BaseException as e:
                failures.append(f"{threading.current_thread().name}: {e}")
                stop.set()
        return body

    def vcpu_loop():
        while not stop.is_set():
            with tracker.op("KVM_RUN (EVTCHNOP_send hypercalls)", "vcpu 0"):
                ex = vcpu.run()
            if isinstance(ex, Io):
                if ex.port == layout.MARKER_PORT and ex.value == layout.MARK_LOOP:
                    counts["sends"] += layout.XEN_SENDS_PER_MARK
                elif ex.port == layout.DATA_PORT:
                    v = ex.value - (1 << 32) if ex.value >= 1 << 31 else ex.value
                    results[v] = results.get(v, 0) + 1
            elif isinstance(ex, Unknown) and ex.reason == KVM_EXIT_XEN:
                raise PyvmmError("KVM left an EVTCHNOP_send to userspace (KVM_EXIT_XEN): "
                                 "the event channel is not handled in the kernel")
            elif not isinstance(ex, Interrupted):
                raise PyvmmError(f"xenloop guest: unexpected exit {ex!r}")

    def invalidator():
        rng = random.Random(f"{cfg.seed}:invalidate")
        while not stop.is_set():
            with tracker.op("madvise(MADV_DONTNEED) of shared_info",
                            f"gpa {layout.XEN_SHINFO_GPA:#x}"):
                if abi.madvise(page, 4096, MADV_DONTNEED) != 0:
                    raise PyvmmError("madvise(MADV_DONTNEED) of the shared_info page failed")
            counts["invalidations"] += 1
            time.sleep(rng.random() * 0.002)

    def filterer():
        rng = random.Random(f"{cfg.seed}:filter")
        while not stop.is_set():
            with tracker.op("KVM_X86_SET_MSR_FILTER", "default allow, no ranges"):
                vm.set_msr_filter()
            counts["filter"] += 1
            time.sleep(rng.random() * 0.002)

    t0 = time.monotonic()

    def hang(report):
        res.hang = report
        # When the first of the stuck calls began, counted from the start of the run.
        began = max(st["elapsed_s"] for st in report["stuck"])
        res.hang_after_s = round(time.monotonic() - t0 - began, 3)
        stop.set()
        if on_hang:
            on_hang(report)
    threads = [threading.Thread(target=guard(f), name=n, daemon=True)
               for f, n in ((vcpu_loop, "xen-vcpu-0"), (invalidator, "shinfo-invalidator"),
                            (filterer, "msr-filter"))]
    dog = Watchdog(tracker, cfg.bound_s, hang)
    dog.start()
    for t in threads:
        t.start()
    while not stop.is_set() and time.monotonic() - t0 < cfg.duration_s:
        time.sleep(0.05)
    stop.set()
    if res.hang is None:
        vcpu.kick()
        for t in threads:
            t.join(cfg.bound_s)
    dog.stop.set()
    res.elapsed_s = time.monotonic() - t0
    res.sends, res.invalidations, res.filter_calls = (counts["sends"], counts["invalidations"],
                                                      counts["filter"])
    res.hypercall_results = {str(k): v for k, v in sorted(results.items())}
    res.ops = {name: latency_summary(xs.samples, xs.count, xs.max)
               for name, xs in tracker.lat.items() if xs}
    res.process["end"] = process_facts()
    if res.hang is None:
        vcpu.close()
        vm.close()
        kvm.close()
        if failures:
            raise PyvmmError("xen stress worker failed: " + "; ".join(failures))
    # On a hang the stuck threads keep the VM: it is left to the process's end.
    return res
