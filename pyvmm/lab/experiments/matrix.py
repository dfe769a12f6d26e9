"""`pyvmm lab matrix`: the same seeded sweep on several lab variants, one table.

A variant is a kernel and an optional KVM patch ('6.1', '6.1+defer-free', 'latest').
Every variant runs the same plan (same seed, same interleaved order) under the same
QEMU, so the rows differ only by the kernel or the patch. Each variant writes its own
run.json (in the matrix directory); matrix.json holds the table and is rewritten after
every variant, so an interrupted matrix keeps the rows it finished, marked as such.
"""

from __future__ import annotations

import os

from ...analysis import findings, report, stats
from ...analysis.plan import SweepConfig
from ...errors import LabError
from ...results import save_figure
from ..builds.variant import Variant
from . import jobs, kernel_lab
from .labrun import Finished
from .multi import MultiRun, run_each
from .options import LabOptions, Ui

SCHEMA = "pyvmm-lab-matrix/1"
DEFAULT_VARIANTS = ("6.1", "6.1+rebuild", "6.1+defer-free", "6.1+defer-free-expedited",
                    "latest")
SHARE_NS = (100, 300, 1000)


def run_matrix(variants: list[Variant], cfg: SweepConfig, base: LabOptions,
               ui: Ui | None = None, out_dir: str | None = None,
               workload: str | None = None, repeats: int = 3,
               also: tuple[str, int] | None = None) -> MultiRun:
    """Run every variant with the same plan (or, with `workload`, trace that VMM's
    start-up `repeats` times in each; `also`, (WORKLOAD, R): a second workload traced R
    times in the same lab boot, its row under the key "also"); returns the matrix
    document."""
    ui = ui or Ui()
    traces = [f"trace:{workload}:{repeats}"] + ([f"trace:{also[0]}:{also[1]}"] if also else [])

    def run_one(opts: LabOptions) -> Finished:
        if workload:
            return jobs.run_jobs(opts, traces, ui)
        return kernel_lab.run_lab(opts, cfg, ui)

    def row_of(v: Variant, run: Finished) -> dict:
        if workload:
            row = trace_row(v, run.doc, run.out_dir)
            if also:
                second = [r for r in run.doc["results"] if r["job"] == traces[1]]
                row["also"] = trace_row(v, {**run.doc, "results": second}, run.out_dir)
            return row
        # The run's evidence, as every row of a comparison shows it; the variant's name,
        # its patch and where its run.json lives around it.
        return {"variant": v.label, "patch": v.patch,
                **findings.run_summary(run.doc, SHARE_NS),
                "regressions": (run.doc.get("analysis") or {}).get("regressions"),
                "run": os.path.join(run.out_dir, "run.json")}

    return run_each(variants, base, ui, "matrix", SCHEMA, run_one, row_of, out_dir,
                    config=cfg.to_dict(), workload=workload,
                    trace_repeats=repeats if workload else None,
                    also=list(also) if also else None)


def trace_row(variant: Variant, doc: dict, run_dir: str) -> dict:
    """One row from a variant's traced start-ups (a lab run of trace:WORKLOAD:R): the
    medians, the longest SRCU wait and who paid it, the verdict by majority, and whether
    the static kernel-check agrees."""
    res = [r for r in doc["results"] if r["job"].startswith("trace:")]
    if not res or not res[0]["ok"]:
        raise LabError(f"the trace of {variant.label} failed: "
                       f"{res[0]['error'] if res else 'no result'}")
    runs = [r["summary"] for r in res[0]["data"]["runs"]]
    kinds = [r["behaviour"] for r in runs]
    behaviour = max(set(kinds), key=kinds.count)
    # what the regression cost, in the runs that gave the majority's verdict: every
    # registration's wait (sync), or the follow-up's (deferred)
    costs = [r["cost"] for r in runs if r["behaviour"] == behaviour and r.get("cost")]
    paid = [c["paid_by"] for c in costs]
    longest = [c["longest_ms"] for c in costs]
    hz = runs[0].get("hz")
    kc = doc.get("kernel_check") or {}
    as_sweep = "sync" if behaviour == "sync" else "deferred"
    stall_ns = (stats.median(longest) * 1e6 if behaviour == "deferred" and longest else None)
    agree = stats.kernel_check_agreement(kc, as_sweep, stall_ns) if kc else {"agrees": None}
    regs = [r.get("registrations") for r in runs if r.get("registrations") is not None]
    if behaviour == "none" and regs and stats.median(regs) == 0:
        # a VMM that registers no ioeventfd at start-up cannot show what the kernel does
        # with them: the kernel-check is neither confirmed nor contradicted
        agree = {"agrees": None, "not_exercised": True}

    def med(key):
        xs = [r[key] for r in runs if r.get(key) is not None]
        return stats.median(xs) if xs else None
    # the timer chain of the longest wait of each run (pyvmm trace --timers)
    whys = [max((w for w in r["waits"] if w.get("why")), key=lambda w: w["wait_ms"])["why"]
            for r in runs if any(w.get("why") for w in r["waits"])]
    return {
        **_init_figures(runs, behaviour),
        "variant": variant.label, "patch": variant.patch,
        "kernel": doc["host"].get("kernel"), "package": doc["host"].get("package"),
        "workload": res[0]["data"]["workload"], "runs": len(runs),
        "qemu": ((doc.get("lab") or {}).get("traced_vmm") or {}).get("version"),
        "verdict": "no registrations" if agree.get("not_exercised") else {
                    "sync": "sync-on-register", "deferred": "deferred-free follow-up",
                    "none": "no SRCU stall", "unknown": "unknown"}[behaviour],
        "not_exercised": bool(agree.get("not_exercised")),
        "behaviour": behaviour, "same_verdict": kinds.count(behaviour),
        "startup_ms": med("startup_ms"), "kvm_ioctl_ms": med("kvm_ioctl_ms"),
        "srcu_waits": med("srcu_waits"), "srcu_wait_ms": med("srcu_wait_ms"),
        "registrations": med("registrations"),
        "regression_ms": stats.median([c["wait_ms"] for c in costs]) if costs else None,
        "regression_waits": stats.median([c["waits"] for c in costs]) if costs else None,
        "longest_wait_ms": stats.median(longest) if longest else None,
        "longest_wait_jiffies": (stats.median(longest) / (1e3 / hz)) if longest and hz
        else None,
        "paid_by": max(set(paid), key=paid.count) if paid else None,
        "gp_timer_fired_after_jiffies": (stats.median([y["fired_after_jiffies"] for y in whys])
                                         if whys else None),
        "wait_end_after_gp_timer_ms": (stats.median([y["wait_end_after_fire_ms"]
                                                     for y in whys]) if whys else None),
        "hz": hz, "kernel_check": kc.get("mechanism") or kc.get("behaviour"),
        "kernel_check_summary": kc.get("summary"), "agrees": agree["agrees"],
        "run": os.path.join(run_dir, "results.json"),
    }


def _init_figures(runs: list[dict], behaviour: str) -> dict:
    """For a workload that boots a guest to its /init (linux-microvm): time to init over
    the runs (median, p90), the SRCU waits before it and their share, and every wait by
    the phase it fell in (the VMM's set-up, the guest's boot) with the ioctls that paid."""
    tti = [r["time_to_init_ms"] for r in runs if r.get("time_to_init_ms") is not None]
    if not tti:
        return {}
    by_phase: dict[str, dict] = {}
    for phase in ("VMM set-up", "guest boot", "after init"):
        counts, totals, names = [], [], set()
        for r in runs:
            ws = [w for w in r["waits"] if w.get("phase") == phase]
            counts.append(len(ws))
            totals.append(sum(w["wait_ms"] for w in ws))
            names.update(f"{w['name']} {w['what']}".strip() if w.get("what") else w["name"]
                         for w in ws if w["wait_ms"] >= 0.5)
        if any(counts):
            by_phase[phase] = {"waits": stats.median(counts), "ms": stats.median(totals),
                               "long_waits_in": sorted(names)}
    return {"time_to_init_ms": stats.median(tti),
            "time_to_init_p90_ms": stats.percentile(tti, 90), "boots": len(tti),
            "srcu_wait_to_init_ms": stats.median([r["srcu_wait_to_init_ms"] for r in runs
                                                  if r.get("srcu_wait_to_init_ms") is not None]),
            "srcu_share_of_init": stats.median([r["srcu_share_of_init"] for r in runs
                                                if r.get("srcu_share_of_init") is not None]),
            "irq_srcu_waits": stats.median([r.get("irq_srcu_waits") or 0 for r in runs]),
            "irq_srcu_wait_ms": stats.median([r.get("irq_srcu_wait_ms") or 0.0 for r in runs]),
            "waits_by_phase": by_phase}


def init_table(doc: dict):
    """The matrix of a workload that boots a guest to /init: a row per variant."""
    from ...tables import Grid
    t = Grid(title=f"pyvmm lab matrix: {doc['workload']} traced, {doc['trace_repeats']} "
                   "boot(s) per variant: time to the guest's /init and the SRCU waits in it",
             title_justify="left", continued="lab matrix (init)")
    for c, left in (("variant", True), ("verdict", True), ("time to init ms (p90)", False),
                    ("SRCU waits to init ms (share)", False),
                    ("VMM set-up: waits, ms", False), ("guest boot: waits, ms", False),
                    ("longest (jiffies), paid by", True),
                    ("irq routing (irq_srcu): waits, ms", False), ("kernel-check", True),
                    ("agree", False)):
        t.add_column(c, justify="left" if left else "right")
    for r in doc["rows"]:
        ph = r.get("waits_by_phase") or {}

        def cell(p):
            x = ph.get(p)
            return "-" if not x else f"{x['waits']:.0f}, {x['ms']:.2f}"
        longest = "-" if r["longest_wait_ms"] is None else (
            f"{r['longest_wait_ms']:.2f} ({_f(r['longest_wait_jiffies'], '{:.1f}', '?')}), "
            f"{r['paid_by'] or '?'}")
        t.add_row(r["variant"], r["verdict"],
                  f"{_f(r.get('time_to_init_ms'), '{:.1f}')} "
                  f"({_f(r.get('time_to_init_p90_ms'), '{:.1f}')})",
                  f"{_f(r.get('srcu_wait_to_init_ms'))} "
                  f"({_f(r.get('srcu_share_of_init'), '{:.1%}')})",
                  cell("VMM set-up"), cell("guest boot"), longest,
                  f"{_f(r.get('irq_srcu_waits'), '{:.0f}')}, {_f(r.get('irq_srcu_wait_ms'))}",
                  r["kernel_check"] or "-",
                  {True: "yes", False: "[bold red]NO[/]", None: "-"}[r["agrees"]])
    t.caption = ("in the lab kernel under QEMU TCG: the guest's code is emulated, so times to "
                 "init are long; waits in ms and jiffies carry over, shares do not. SRCU "
                 "waits: kvm->srcu (buses, memslots: the regression's); interrupt routing "
                 "waits for kvm->irq_srcu, another SRCU, shown apart")
    return t


def trace_table(doc: dict):
    """The matrix of traced start-ups: a row per variant."""
    from ...tables import Grid
    t = Grid(title=f"pyvmm lab matrix: {doc['workload']} traced, {doc['trace_repeats']} "
                   f"start-up(s) per variant, medians", title_justify="left",
             continued="lab matrix (trace)")
    for c, left in (("variant", True), ("kernel", True), ("verdict", True),
                    ("start-up ms", False), ("KVM ioctl ms", False),
                    ("SRCU waits (n, ms)", False),
                    ("regression ms (longest, jiffies)", False),
                    ("paid by", True), ("kernel-check", True), ("agree", False)):
        t.add_column(c, justify="left" if left else "right")
    for r in doc["rows"]:
        j = _f(r["longest_wait_jiffies"], "{:.1f}", "?")
        t.add_row(r["variant"], _short_kernel(r),
                  r["verdict"] + (f" ({r['same_verdict']}/{r['runs']})"
                                  if r["same_verdict"] != r["runs"] else ""),
                  _f(r["startup_ms"], "{:.1f}"), _f(r["kvm_ioctl_ms"], "{:.1f}"),
                  f"{_f(r['srcu_waits'], '{:.0f}')}, {_f(r['srcu_wait_ms'])}",
                  "-" if r["regression_ms"] is None else
                  f"{r['regression_ms']:.2f} ({r['longest_wait_ms']:.2f}, {j})",
                  r["paid_by"] or "-", r["kernel_check"] or "-",
                  "n/a" if r.get("not_exercised") else
                  {True: "yes", False: "[bold red]NO[/]", None: "-"}[r["agrees"]])
    qemus = sorted({r["qemu"].split(" (")[0] for r in doc["rows"] if r.get("qemu")})
    t.caption = ((f"traced: {', '.join(qemus)}. " if qemus else "")
                 + ("n/a: the VMM registered no ioeventfd during start-up, so the "
                    "kernel-check can be neither confirmed nor contradicted. "
                    if any(r.get("not_exercised") for r in doc["rows"]) else "")
                 + "in the lab kernel under QEMU TCG: every instruction is emulated, "
                 "so times are long, but grace periods run on wall-clock ticks: waits in ms and "
                 "jiffies carry over, shares of the start-up do not. regression: the "
                 "registrations' own waits (sync-on-register) or the waits behind the "
                 "grace periods they started (deferred); paid by: which ioctls")
    return t


# --- output -----------------------------------------------------------------------------

def _f(x, fmt="{:.2f}", none="-"):
    return none if x is None else fmt.format(x)


def _short_kernel(r: dict) -> str:
    k = r.get("kernel") or "?"
    return k.replace("-amd64", "")


def table(doc: dict):
    """The matrix as a table: related figures share a cell; at any width every value is
    whole (pyvmm.tables)."""
    if doc.get("workload"):
        if doc["rows"] and all(r.get("time_to_init_ms") is not None for r in doc["rows"]):
            return init_table(doc)
        return trace_table(doc)
    from ...tables import Grid
    t = Grid(title=f"pyvmm lab matrix: {len(doc['rows'])} variant(s), seed "
                    f"{doc['config']['seed']}, {doc['config']['repeats']} repeats per cell",
              title_justify="left")
    for c, left in (("variant", True), ("kernel", True), ("verdict", True),
                    (f"assign / EEXIST / deassign us, median per op at N="
                     f"{doc['config'].get('control_n', '?')}", False),
                    ("reg. share N=" + "/".join(map(str, SHARE_NS)), False),
                    ("stall ms (jiffies), p90, predicted; paid by", False),
                    ("first deassign +ms", False),
                    ("boot ms N=0 -> max", False), ("kernel-check", True), ("agree", False)):
        t.add_column(c, justify="left" if left else "right",
                     no_wrap=c in ("variant", "verdict", "kernel"))
    for r in doc["rows"]:
        boots = r["boot_ms"]
        nmax = max(boots, key=int) if boots else None
        stall = "-" if r["stall_ms"] is None else (
            f"{r['stall_ms']:.2f} ({_f(r['stall_jiffies'], '{:.1f}', '?')}), "
            f"p90 {_f(r.get('stall_p90_ms'))}, predicted {_f(r.get('stall_predicted_ms'))} "
            f"{r['stall_phase'] or ''}".rstrip())
        shares = " / ".join(_f(r["reg_share"].get(str(n)), "{:.1%}") for n in SHARE_NS)
        boot = ("-" if nmax is None else
                f"{_f(boots.get('0'), '{:.1f}')} -> {boots[nmax]:.1f}")
        t.add_row(r["variant"], _short_kernel(r), r["verdict"],
                  f"{_f(r['assign_us'])} / {_f(r['eexist_us'])} / {_f(r['deassign_us'])}",
                  shares, stall, _f(r["first_deassign_excess_ms"]), boot,
                  r["kernel_check"] or "-",
                  {True: "yes", False: "[bold red]NO[/]", None: "-"}[r["agrees"]])
    shares = {r.get("share_recipe") for r in doc["rows"]}
    ns = sorted({int(n) for r in doc["rows"] for n in r["boot_ms"]})
    t.caption = (f"reg. share and boot medians from recipe "
                 f"{', '.join(sorted(s for s in shares if s))} (max N = {ns[-1] if ns else '-'}); "
                 "per-op costs from the control recipe; stall: the step after the "
                 "registrations that grew most at the smallest N > 0 against N = 0 (median "
                 "over boots, p90), and what the SRCU code predicts from HZ and the time "
                 "since the first registration (docs/lab.md)")
    t.caption_justify = "left"
    return t


def plot(doc: dict, out_dir: str) -> list[str]:
    if doc.get("workload"):
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in doc["rows"]:
        ns = sorted(int(n) for n in r["boot_ms"])
        if not ns:
            continue
        ax.plot(ns, [r["boot_ms"][str(n)] for n in ns], "o-", label=r["variant"])
    report.n_axis(ax, [int(n) for r in doc["rows"] for n in r["boot_ms"]])
    ax.set_yscale("log")
    ax.set_ylabel("boot median (ms, QEMU TCG)")
    ax.set_title("boot vs N, one line per variant (same plan, same emulator)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, out_dir, "matrix_boot_vs_n")


def json_rows(doc: dict) -> dict:
    """The table as one JSON object (what `--json` prints)."""
    if doc.get("workload"):
        return {"schema": doc["schema"], "status": doc["status"],
                "workload": doc["workload"], "rows": doc["rows"], "failed": doc["failed"]}
    keep = ("variant", "kernel", "patch", "verdict", "assign_us", "eexist_us", "deassign_us",
            "per_op_n", "per_op_us",
            "stall_ms", "stall_jiffies", "stall_phase", "stall_p90_ms", "stall_predicted_ms",
            "stall_predicted_range_ms", "stall_gap_ms", "hz", "first_deassign_excess_ms",
            "first_deassign_predicted_ms",
            "reg_share", "boot_ms", "kernel_check", "kernel_check_summary", "agrees",
            "regressions", "run")
    return {"schema": doc["schema"], "status": doc["status"], "seed": doc["config"]["seed"],
            "rows": [{k: r.get(k) for k in keep} for r in doc["rows"]],
            "failed": doc["failed"]}
