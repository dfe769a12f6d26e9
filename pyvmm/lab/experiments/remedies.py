"""`pyvmm lab remedies`: every candidate remedy for the fix's follow-up on one base (7.3),
beside the kernel before the fix (6.1), at each HZ and each emulated CPU count, every
figure from several lab boots with the spread between them.

A cell is (HZ, CPUs, lab boot k). Each cell runs two lab matrices over the five
variants, all whole-kernel builds at that HZ so they share one config: the seeded sweep
(registration cost, the registrant's CPU time, the stall and who paid it) and QEMU's
start-up traced (the SRCU wait its ioeventfd probe pays). Lab boot k uses seed + k, so
the lab boots differ in plan and in where the kernel's ticks fall, and the spread
between them is the spread a reader should expect from one more. Two CPUs and more run
under multi-threaded TCG (a host thread per emulated CPU) in a newer QEMU; one CPU runs
under the same QEMU, single-threaded. Every cell's matrices stay in the run directory;
`--resume DIR` reuses the cells DIR finished, so an interrupted report goes on where it
stopped. remedies.json holds the rows; remedies.md the tables and the answers.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace

from ...analysis import stats
from ...analysis.plan import SweepConfig
from ...errors import LabError
from ...results import envelope, finishing, new_run_dir, write_json_atomic
from ..builds import kcheck
from ..arch import X86_64, Arch
from ..builds.variant import Variant, parse_variant
from . import ready
from .matrix import run_matrix
from .multi import check_variants
from .options import LabOptions, Ui

SCHEMA = "pyvmm-lab-remedies/1"
# (base variant, short name, what it does): built at each HZ as BASE@hzN
REMEDIES = (
    ("6.1", "before the fix", "every registration waits (synchronize_srcu_expedited)"),
    ("7.3", "the fix", "call_srcu: registration cheap, the next synchronous SRCU step waits"),
    ("7.3+srcu-expedited", "the RFC", "call_srcu_expedited() for the replaced bus"),
    ("7.3+srcu-expedite-current", "expedite current",
     "call_srcu, then srcu_expedite_current() on the grace period it started"),
    ("7.3+srcu-kick", "the kick",
     "call_srcu; an expedited waiter runs a pending grace period's work at once"),
)
DEFAULT_HZ = (100, 250, 1000)
DEFAULT_SMP = (1, 2)
DEFAULT_NS = (0, 1, 32)
DEFAULT_EMULATOR = "debian:trixie"
TRACE_WORKLOAD = "qemu-microvm:0"
# --linux-guest R: the lab's Linux guest booted to /init by the same QEMU, R times, in
# the trace's lab boot (two virtio-blk devices of one queue each, as docs/linux-guest.md)
LINUX_WORKLOAD = "linux-microvm:2x1"


@dataclass(frozen=True)
class Cell:
    hz: int
    smp: int
    boot: int

    @property
    def key(self) -> str:
        return f"hz{self.hz}-smp{self.smp}-b{self.boot}"


def variants_at(hz: int, arch: Arch = X86_64) -> list[Variant]:
    return [parse_variant(f"{base}@hz{hz}", arch=arch) for base, _, _ in REMEDIES]


def cells(hzs, smps, lab_boots: int) -> list[Cell]:
    """Lab boot 1 of every (HZ, CPUs) first, then boot 2...: an interrupted report has
    every configuration once before it has any twice."""
    return [Cell(hz, smp, k) for k in range(1, lab_boots + 1) for hz in hzs for smp in smps]


def check(hzs, smps, lab_boots: int, trace_repeats: int, linux_guest: int = 0,
          arch: Arch = X86_64) -> None:
    if not hzs:
        raise LabError("--hz is empty: give HZ values, e.g. 100,250,1000")
    for hz in hzs:
        variants_at(hz)                 # an HZ the builds do not know fails here
    bad = [s for s in smps if s not in (1, 2, 4)]
    if not smps or bad:
        raise LabError(f"--smp {','.join(map(str, smps))}: give CPU counts among 1, 2, 4")
    if lab_boots < 1:
        raise LabError(f"--lab-boots {lab_boots}: give at least 1 (3 to see the spread)")
    if trace_repeats < 0:
        raise LabError(f"--trace-repeats {trace_repeats}: give 0 (no trace) or more")
    if arch.cross_prefix and trace_repeats:
        raise LabError(f"lab remedies --arch {arch.debian}: the QEMU start-up trace runs "
                       "pyvmm inside the lab kernel, which needs a Python runtime of the "
                       "lab's architecture: give --trace-repeats 0 (the sweep alone)")
    if linux_guest < 0 or (linux_guest and not trace_repeats):
        raise LabError(f"--linux-guest {linux_guest}: give 0 (none) or more, with "
                       "--trace-repeats 1 or more (the guest boots in the trace's lab boot)")


def options_for(base: LabOptions, smp: int) -> LabOptions:
    """More than one CPU runs multi-threaded TCG: for x86 under a Debian suite's QEMU
    (the emulator), for arm64 under this host's qemu-system-aarch64, where it is QEMU's
    own default for an aarch64 guest."""
    return replace(base, smp=smp, mttcg=smp > 1)


def _resumed_config(out_dir: str, cfg: SweepConfig, traces: dict | None = None) \
        -> SweepConfig:
    """The sweep settings of the run being resumed: its seed, and a refusal when the
    rest differ, the traces' settings (`traces`) among them (its cells would not
    compare with the new ones)."""
    path = os.path.join(out_dir, "remedies.json")
    if not os.path.isdir(out_dir):
        raise LabError(f"--resume {out_dir}: no such directory (give a remedies run's "
                       "directory, results/remedies-<time>)")
    try:
        with open(path) as f:
            whole = json.load(f)
        old = whole["config"]
    except (OSError, ValueError, KeyError):
        raise LabError(f"--resume {out_dir}: no remedies.json there (give a remedies run's "
                       "directory)") from None
    cfg = replace(cfg, seed=old["seed"])
    new = cfg.to_dict()
    diff = [k for k in new if k in old and old[k] != new[k]]
    for k, v in (traces or {}).items():
        if whole.get(k, 0) != v:
            old[k], new[k] = whole.get(k, 0), v
            diff.append(k)
    if diff:
        raise LabError(f"--resume {out_dir}: that run used other settings ("
                       + ", ".join(f"{k} {old[k]} here {new[k]}" for k in diff)
                       + "): give the same options, or start a new run")
    return cfg


def _finished(path: str) -> dict | None:
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return doc if doc.get("status") == "complete" else None


def build_all(hzs, ui: Ui, install: bool = True, arch: Arch = X86_64) -> list[dict]:
    """Every variant's whole kernel at every HZ, built (or found in the cache) before the
    first lab boot, so that the cells run back to back."""
    out = []
    todo = [v for hz in hzs for v in variants_at(hz, arch)]
    for i, v in enumerate(todo):
        ui.stage(f"kernel build {i + 1}/{len(todo)} ({v.label})")
        cached, secs = ready.build_kernel(v, ui, install)
        ui.log(f"kernel {v.label}: " + ("cached" if cached else f"built in {secs:.0f} s"))
        out.append({"variant": v.label, "cached": cached, "s": round(secs, 1)})
    return out


def run_remedies(hzs, smps, lab_boots: int, cfg: SweepConfig, base: LabOptions,
                 ui: Ui | None = None, out_dir: str | None = None,
                 trace_repeats: int = 3, build_only: bool = False,
                 linux_guest: int = 0) -> tuple[dict, str]:
    """Every kernel built, then every cell (reusing the ones `out_dir` already finished);
    returns the document and its directory. The document is rewritten after every
    matrix. `build_only`: the kernels, no cell. `linux_guest` R: the lab's Linux guest
    booted R times in each trace's lab boot too."""
    ui = ui or Ui()
    arch = base.variant.arch
    check(hzs, smps, lab_boots, trace_repeats, linux_guest, arch)
    for hz in hzs:
        for smp in smps:
            check_variants(variants_at(hz, arch), options_for(base, smp), ui)
    if out_dir:
        cfg = _resumed_config(out_dir, cfg, {"trace_repeats": trace_repeats,
                                             "linux_guest": linux_guest})
    out_dir = out_dir or new_run_dir(base.out, "remedies")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "remedies.json")
    doc = envelope(SCHEMA, None, status="running", finished=None, hz=list(hzs),
                   smp=list(smps), lab_boots=lab_boots, emulator=base.emulator,
                   arch=arch.debian,
                   trace_workload=TRACE_WORKLOAD if trace_repeats else None,
                   trace_repeats=trace_repeats, linux_guest=linux_guest,
                   linux_workload=LINUX_WORKLOAD if linux_guest else None,
                   config=cfg.to_dict(),
                   remedies=[{"variant": b, "name": n, "what": w} for b, n, w in REMEDIES],
                   cells=[], rows=[], timings={})

    def save():
        doc["rows"] = rows(doc["cells"])
        write_json_atomic(path, doc)
    todo = [] if build_only else cells(hzs, smps, lab_boots)
    with finishing(doc, save, doc["timings"], time.monotonic()):
        t = time.monotonic()
        doc["builds"] = build_all(hzs, ui, base.install, arch)
        doc["timings"]["builds_s"] = round(time.monotonic() - t, 1)
        save()
        for i, c in enumerate(todo):
            kcs: dict[str, dict] = {}       # variant -> its kernel-check, from the sweep
            opts = options_for(base, c.smp)
            entry = {"hz": c.hz, "smp": c.smp, "boot": c.boot,
                     "tcg": "multi-threaded" if opts.mttcg else "single-threaded"}
            doc["cells"].append(entry)
            for kind in ("sweep", "trace") if trace_repeats else ("sweep",):
                d = os.path.join(out_dir, c.key, kind)
                m = os.path.join(d, "matrix.json")
                done = _finished(m)
                if done is None:
                    ui.log(f"[{i + 1}/{len(todo)}] {c.key} {kind}")
                    seeded = replace(cfg, seed=(cfg.seed + c.boot) & 0xFFFFFFFF)
                    run = run_matrix(variants_at(c.hz, arch), seeded, opts, ui, out_dir=d,
                                     workload=TRACE_WORKLOAD if kind == "trace" else None,
                                     repeats=trace_repeats,
                                     also=((LINUX_WORKLOAD, linux_guest)
                                           if linux_guest and kind == "trace" else None))
                    done = run.doc
                else:
                    ui.log(f"[{i + 1}/{len(todo)}] {c.key} {kind}: reused")
                entry[kind] = os.path.relpath(m, out_dir)
                entry[f"{kind}_rows"] = [_cell_row(r, kind, out_dir, kcs)
                                         for r in done["rows"]]
                entry[f"{kind}_failed"] = done.get("failed", [])
                save()
        failed = any(c.get(f"{k}_failed") for c in doc["cells"] for k in ("sweep", "trace"))
        doc["status"] = ("failed" if failed else "built" if build_only else "complete")
    return doc, out_dir


# --- the figures of one lab boot ---------------------------------------------------------

def registration_times(run_json: str) -> dict:
    """From a sweep's run.json: the registrant's wall and CPU time per registration in the
    control recipe (its ioeventfd phase over its count; CLOCK_THREAD_CPUTIME_ID of the
    registering thread), medians and means over the boots."""
    with open(run_json) as f:
        return _registration_times(json.load(f))


def _registration_times(doc: dict) -> dict:
    wall, cpu = [], []
    for s in doc["samples"]:
        r = s.get("result") or {}
        if s.get("recipe") != "control" or not r.get("ok"):
            continue
        for p in r["phases"]:
            if p["op"] == "ioev" and p["count"]:
                wall.append(p["wall_ns"] / p["count"] / 1e3)
                cpu.append(p["cpu_ns"] / p["count"] / 1e3)
    if not wall:
        return {}
    return {"reg_wall_us": stats.median(wall), "reg_cpu_us": stats.median(cpu),
            "reg_cpu_mean_us": sum(cpu) / len(cpu)}


def _agrees(kc: dict | None, behaviour: str | None, stall_ms: float | None,
            first_deassign_ms: float | None = None):
    """Measured against today's kernel-check and agreement rule (kcheck.refreshed: a run
    written before a prediction was corrected is judged by the corrected one)."""
    if not kc or behaviour is None:
        return None
    as_sweep = "sync" if behaviour == "sync" else "deferred"
    return stats.kernel_check_agreement(
        kcheck.refreshed(kc), as_sweep, None if stall_ms is None else stall_ms * 1e6,
        None if first_deassign_ms is None else first_deassign_ms * 1e6)["agrees"]


def _cell_row(r: dict, kind: str, out_dir: str, kcs: dict) -> dict:
    """One variant's figures from one matrix of a cell. `kcs`: the kernel-checks the
    cell's sweep read (the sweep runs first; the trace boots the same builds)."""
    base = r["variant"].split("@", 1)[0].split(":")[-1]      # arm64:7.3@hz250 -> 7.3
    if kind == "trace":
        out = {"variant": base, "behaviour": r.get("behaviour"),
               "agrees": _trace_agrees(r, kcs.get(base)),
               "qemu_wait_ms": r.get("regression_ms") or 0.0,
               "qemu_paid_by": r.get("paid_by"), "qemu_srcu_ms": r.get("srcu_wait_ms"),
               "qemu_startup_ms": r.get("startup_ms"), "qemu": r.get("qemu")}
        if r.get("also"):
            out.update(_linux_row(r["also"], kcs.get(base)))
            if out.pop("linux_agrees") is False:
                out["agrees"] = False
        return out
    a = (r.get("per_op_us") or {}).get("assign") or {}
    run_json = r["run"] if os.path.isabs(r["run"]) else os.path.join(out_dir, r["run"])
    with open(run_json) as f:
        run = json.load(f)
    kc = run.get("kernel_check")
    agrees = r.get("agrees")
    if kc:
        kcs[base] = kc
        an = run.get("analysis") or {}
        measured = {"sync-on-register": "sync", "deferred-free": "deferred"}.get(
            an.get("verdict"))
        if measured:
            agrees = _agrees(kc, measured, an.get("stall_ms"),
                             an.get("first_deassign_excess_ms"))
    return {"variant": base, "verdict": r.get("verdict"), "agrees": agrees,
            "kernel_check": r.get("kernel_check"),
            "assign_us": a.get("median"), "assign_mean_us": a.get("mean"),
            "assign_p90_us": a.get("p90"), "eexist_us": r.get("eexist_us"),
            "stall_ms": r.get("stall_ms") or 0.0, "stalled": r.get("stall_ms") is not None,
            "stall_jiffies": r.get("stall_jiffies") or 0.0, "stall_phase": r.get("stall_phase"),
            **_registration_times(run)}


def _linux_row(g: dict, kc: dict | None) -> dict:
    """The Linux guest's boots in a trace's lab boot: the regression's wait and who paid
    it, every SRCU wait before /init, time to init, and agreement with kernel-check."""
    init = g.get("time_to_init_ms")
    return {"linux_wait_ms": g.get("regression_ms") or 0.0, "linux_paid_by": g.get("paid_by"),
            "linux_srcu_to_init_ms": g.get("srcu_wait_to_init_ms"),
            "linux_init_s": None if init is None else init / 1e3,
            "linux_agrees": _trace_agrees(g, kc)}


def _trace_agrees(r: dict, kc: dict | None):
    """A traced start-up's row (matrix.trace_row) judged again against the kernel-check
    the cell's sweep read, by today's rule; the row's own word when there is none (or it
    had nothing to compare: a VMM that registered no ioeventfd)."""
    if r.get("agrees") is None or not kc:
        return r.get("agrees")
    stall = r.get("longest_wait_ms") if r.get("behaviour") == "deferred" else None
    return _agrees(kc, r.get("behaviour"), stall)


# --- rows: one per (remedy, HZ, CPUs), over the lab boots --------------------------------

SPREAD_KEYS = ("assign_us", "assign_mean_us", "assign_p90_us", "eexist_us", "reg_wall_us",
               "reg_cpu_us", "reg_cpu_mean_us", "stall_ms", "stall_jiffies",
               "qemu_wait_ms", "qemu_srcu_ms", "linux_wait_ms", "linux_srcu_to_init_ms",
               "linux_init_s")


def spread(xs: list[float]) -> dict | None:
    """The median of the lab boots' figures, and their least and greatest."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"median": stats.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def rows(cells_: list[dict]) -> list[dict]:
    out = []
    keys = sorted({(c["hz"], c["smp"]) for c in cells_})
    for base, name, _ in REMEDIES:
        for hz, smp in keys:
            mine = [c for c in cells_ if (c["hz"], c["smp"]) == (hz, smp)]
            sweep = [r for c in mine for r in c.get("sweep_rows", []) if r["variant"] == base]
            trace = [r for c in mine for r in c.get("trace_rows", []) if r["variant"] == base]
            if not sweep and not trace:
                continue
            row = {"variant": base, "name": name, "hz": hz, "smp": smp,
                   "tcg": mine[0]["tcg"], "lab_boots": len(sweep),
                   "trace_lab_boots": len(trace),
                   "verdicts": sorted({r["verdict"] for r in sweep if r.get("verdict")}),
                   "stalled_boots": sum(1 for r in sweep if r["stalled"]),
                   "stall_phase": next((r["stall_phase"] for r in sweep if r["stalled"]), None),
                   "qemu_paid_by": next((r["qemu_paid_by"] for r in trace
                                         if r.get("qemu_paid_by")), None),
                   "qemu_behaviours": sorted({r["behaviour"] for r in trace
                                              if r.get("behaviour")}),
                   "linux_paid_by": next((r["linux_paid_by"] for r in trace
                                          if r.get("linux_paid_by")), None),
                   "kernel_check": next((r["kernel_check"] for r in sweep), None),
                   "agrees": all(r.get("agrees") is not False for r in sweep + trace)}
            for k in SPREAD_KEYS:
                row[k] = spread([r.get(k) for r in sweep + trace if k in r])
            out.append(row)
    return out
