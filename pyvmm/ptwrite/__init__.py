"""The ptwrite workload (`pyvmm bench ptwrite`, and the lab job `ptwrite:N`): what a guest write to its own page tables costs under shadow
paging, against an ordinary data write, alone and with a second vCPU faulting pages.

The ptwrite guest reports on the data port when its page tables are live (1), when its
PTE writes (2), PDE writes (3) and data writes (4) are done. The VMM takes the time and
a KVM stats snapshot (VM and vCPU 0) at each report, so each phase gets a per-write cost
and its own stats deltas. See guests/ptwrite.S.
"""

from __future__ import annotations

import struct
import threading
import time

from ..vmm import layout
from ..errors import PyvmmError
from ..vmm.exits import Hlt, Interrupted, Io
from ..vmm.kvm import Kvm
from ..vmm.kvmstats import StatsReader, diff
from ..latency import median

PHASES = ("pte", "pde", "data")
STATS = ("mmu_pte_write", "mmu_flooded", "mmu_shadow_zapped", "mmu_pde_zapped",
         "mmu_cache_miss", "mmu_unsync", "insn_emulation", "exits", "pf_fixed", "pf_taken",
         "remote_tlb_flush", "tlb_flush", "invlpg")


def _until_data(vcpu, want: int, limit: int = 1_000_000) -> None:
    for _ in range(limit):
        ex = vcpu.run()
        if isinstance(ex, Io) and ex.port == layout.DATA_PORT:
            if ex.value != want:
                raise PyvmmError(f"ptwrite guest reported {ex.value}, expected {want}")
            return
        if isinstance(ex, Io):
            continue
        raise PyvmmError(f"ptwrite guest: unexpected exit {ex!r} (waiting for {want})")
    raise PyvmmError(f"ptwrite guest never reported {want}")


def _pick(delta: dict) -> dict:
    return {k: delta[k] for k in STATS if k in delta and isinstance(delta[k], int)}


def run_once(count: int, second_vcpu: bool) -> dict:
    """One boot: per-write ns of each phase and the stats deltas of each phase."""
    if count < 1:
        raise PyvmmError("--count must be at least 1")
    from ..vmm.kicker import install_kick_handler
    install_kick_handler()
    with Kvm() as kvm, kvm.create_vm() as vm:
        vm.add_ram_with_guest("ptwrite")
        vm.write_guest(layout.PARAM_GPA, struct.pack("<QQ", layout.PARAM_MAGIC, count))
        v0 = vm.create_vcpu()
        v0.setup_long_mode()
        _until_data(v0, 1)                      # the guest's own page tables are live
        toucher = None
        stop = threading.Event()
        passes = [0]
        if second_vcpu:
            v1 = vm.create_vcpu()
            v1.setup_long_mode(entry=layout.CODE_GPA + layout.PTW_TOUCH_OFFSET,
                               write_tables=False)
            sregs = v1.get_sregs()
            sregs.cr3 = layout.PTW_PML4_GPA
            v1.set_sregs(sregs)
            failure = []

            def touch():
                try:
                    while not stop.is_set():
                        ex = v1.run()
                        if isinstance(ex, Io) and ex.value == layout.MARK_LOOP:
                            passes[0] += 1
                        elif not isinstance(ex, (Io, Interrupted)):
                            raise PyvmmError(f"toucher vCPU: unexpected exit {ex!r}")
                except BaseException as e:
                    failure.append(e)
            toucher = threading.Thread(target=touch, daemon=True, name="toucher")
            toucher.start()
            while passes[0] < 2 and toucher.is_alive():    # let it reach steady state
                time.sleep(0.001)
        vm_stats, cpu_stats = StatsReader.open(vm), StatsReader.open(v0)
        t_stats = StatsReader.open(v1) if toucher is not None else None

        passes_at = []

        def snap():
            passes_at.append(passes[0])
            return (vm_stats.read(), cpu_stats.read(), t_stats.read() if t_stats else None)
        try:
            snaps, times = [], []
            for want in (2, 3, 4):
                snaps.append(snap())
                t0 = time.monotonic_ns()
                _until_data(v0, want)
                times.append(time.monotonic_ns() - t0)
            snaps.append(snap())
            ex = v0.run()
            while isinstance(ex, Io):
                ex = v0.run()
            if not isinstance(ex, Hlt):
                raise PyvmmError(f"ptwrite guest did not halt: {ex!r}")
        finally:
            if toucher is not None:
                stop.set()
                v1.kick()
                toucher.join(5)
            vm_stats.close()
            cpu_stats.close()
            if t_stats:
                t_stats.close()
        out = {"count": count, "second_vcpu": second_vcpu, "toucher_passes": passes[0]}
        for i, phase in enumerate(PHASES):
            d = _pick(diff(snaps[i][0], snaps[i + 1][0], vm_stats.layout))
            d.update(_pick(diff(snaps[i][1], snaps[i + 1][1], cpu_stats.layout)))
            out[phase] = {"wall_ns": times[i], "per_write_ns": times[i] / count, "stats": d}
            if t_stats:
                out[phase]["toucher_stats"] = _pick(diff(snaps[i][2], snaps[i + 1][2],
                                                         t_stats.layout))
                # Passes the second vCPU reported while this phase ran (the guest's own
                # count, so a reader can tell a quiet phase from one that was too short).
                out[phase]["toucher_passes"] = passes_at[i + 1] - passes_at[i]
        return out


def run(count: int = 2000, repeats: int = 5, progress=None) -> dict:
    """Both configurations, interleaved, `repeats` boots each; medians per phase."""
    if repeats < 1:
        raise PyvmmError("--repeats must be at least 1")
    raw = {False: [], True: []}
    total = 2 * repeats
    for i in range(repeats):
        for second in (False, True):
            raw[second].append(run_once(count, second))
            if progress:
                progress(len(raw[False]) + len(raw[True]), total)
    summary = {}
    for second, boots in raw.items():
        key = "with second vCPU" if second else "alone"
        summary[key] = {}
        for phase in PHASES:
            stats = {}
            for name in boots[0][phase]["stats"]:
                stats[name] = median([b[phase]["stats"].get(name, 0) for b in boots])
            summary[key][phase] = {
                "per_write_ns": median([b[phase]["per_write_ns"] for b in boots]),
                "stats": stats}
            if "toucher_stats" in boots[0][phase]:
                summary[key][phase]["toucher_stats"] = {
                    name: median([b[phase]["toucher_stats"].get(name, 0) for b in boots])
                    for name in boots[0][phase]["toucher_stats"]}
        summary[key]["toucher_passes"] = median([b["toucher_passes"] for b in boots])
    return {"count": count, "repeats": repeats, "summary": summary, "boots": raw}
