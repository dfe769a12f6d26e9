"""Turn a run.json into tables, a verdict, summary.csv and plots."""

from __future__ import annotations

import csv
import os

from ..results import save_figure
from ..tables import Grid
from ..ui import say

from . import predictions, stats
from .findings import PHASE_ORDER, analyze, findings, refresh


def _fmt_ms(ns) -> str:
    return "-" if ns is None else f"{ns / 1e6:.3f}"


def _fmt_us(ns) -> str:
    return "-" if ns is None else f"{ns / 1e3:.2f}"


def recipe_table(name: str, rec: dict, template: str) -> Grid:
    t = Grid(title=f"recipe {name}: {template}", title_justify="left",
             continued=f"recipe {name}")
    for col, j in [("N", "right"), ("boots", "right"), ("boot med ms", "right"),
                   ("boot p90 ms", "right"), ("reg. med ms", "right"), ("reg. share", "right"),
                   ("blocked share", "right"), ("per-reg us", "right"),
                   ("memslot ms", "right"), ("stall ms", "right"), ("doorbells", "center")]:
        t.add_column(col, justify=j)
    for n, row in rec["rows"].items():
        t.add_row(str(n), str(row["boots"]), _fmt_ms(row["boot"]["median"]),
                  _fmt_ms(row["boot"]["p90"]), _fmt_ms(row["registration_median_ns"]),
                  f"{row['registration_share'] * 100:.1f}%", f"{row['blocked_share'] * 100:.1f}%",
                  _fmt_us(row["per_op_median_ns"]), _fmt_ms(row["memslot_median_ns"]),
                  _fmt_ms(row["stall_ns"]), "ok" if row["doorbells_ok"] else "[red]FAIL")
    parts = []
    fit = rec["fit"]
    if fit is not None:
        parts.append(f"fit of the registration phase: reg(N) = {fit.a / 1e3:.2f} us + "
                     f"{fit.b / 1e3:.3f} us*N + {fit.c:.4f} ns*N^2 "
                     f"(RMS residual {fit.rms_residual / 1e3:.2f} us over {fit.points} N "
                     "values; the stall after it is in its own column)")
    rows = rec["rows"]
    n25 = rec["share_25_at"]
    if n25 is not None:
        text = f"registration share reaches 25% at N={n25} " \
               f"({rows[n25]['registration_share'] * 100:.1f}%"
        below = [n for n in rows if n < n25]
        if below:
            text += f"; {rows[max(below)]['registration_share'] * 100:.1f}% at N={max(below)}"
        parts.append(text + ")")
    elif rows:
        top = max(rows)
        parts.append(f"registration share stays under 25% up to N={top} "
                     f"({rows[top]['registration_share'] * 100:.1f}%)")
    parts.append("per-reg: the registration phase's wall time / N in this recipe (the "
                 "eventfds' creation included); the verdict's assign is one KVM_IOEVENTFD "
                 "alone; blocked: wall minus CPU time (waiting, mostly for grace periods)")
    if parts:
        t.caption = "; ".join(parts)
    t.caption_justify = "left"
    return t


def verdict_lines(a: dict) -> list[str]:
    v = a["verdict"]
    lines = [f"verdict: {v.text}", f"  answer: {stats.answer(v, a.get('hz'))}"]
    if v.assign_ns is not None:
        n = a.get("control_n")
        where = (f", from the control recipe (ioev:{n},eexist:{n},deassign:{n}; "
                 "--control-n)") if n else ""
        lines.append(
            f"  evidence (median single ioctl{where}): assign {v.assign_ns / 1e3:.2f} us, EEXIST "
            f"control {v.eexist_ns / 1e3:.2f} us, deassign {v.deassign_ns / 1e3:.2f} us; "
            f"assign/EEXIST = {v.assign_over_eexist:.2f} (pre-6.18 if >= "
            f"{stats.ASSIGN_OVER_EEXIST_MIN:g}), assign/deassign = {v.assign_over_deassign:.2f} "
            f"(pre-6.18 if >= {stats.ASSIGN_OVER_DEASSIGN_MIN:g})")
    lines.append(f"  {v.stall_text}")
    pred, dist = a.get("stall_prediction"), a.get("stall_distribution")
    if pred is not None and dist is not None:
        lines.append(f"  stall over boots: median {dist['median'] / 1e6:.2f} ms, p90 "
                     f"{dist['p90'] / 1e6:.2f} ms; SRCU's queueing predicts "
                     f"{pred['median_ns'] / 1e6:.2f} ms ({pred['lo_ns'] / 1e6:.2f} to "
                     f"{pred['hi_ns'] / 1e6:.2f}): 1.5 jiffies (1 to 2) less the "
                     f"{pred['gap_ns'] / 1e6:.2f} ms since the first registration")
    fp = a.get("first_deassign_prediction")
    if fp is not None:
        lines.append(f"  first deassign: waits {v.first_deassign_excess_ns / 1e6:.2f} ms; "
                     f"predicted {fp['median_ns'] / 1e6:.2f} ms ({fp['gap_ns'] / 1e6:.2f} ms "
                     "after the first assign)")
    if a["occupancy_slope_ns"] is not None:
        lines.append(f"  per-registration cost grows {a['occupancy_slope_ns']:.2f} ns per device "
                     f"already on the bus (bus array copy)")
    return lines


def overhead_line(doc: dict, a: dict) -> str | None:
    """Timing overhead per op against the cheapest op (the EEXIST control). Where the run
    has EEXIST batches (K ops between two clock reads), that op's cost is batch/K and its
    overhead 2 reads / K; older runs only have single-op samples (one read per op)."""
    clk = (doc.get("clock") or {}).get("wall_read_ns")
    v = a["verdict"]
    ops = [x for x in (v.assign_ns, v.eexist_ns, v.deassign_ns) if x]
    if not clk or not ops:
        return None
    batches = a.get("eexist_batches") or []
    if batches:
        per_op = stats.median([ns / k for ns, k in batches])
        k = int(stats.median([k for _, k in batches]))
        over = 2 * clk / k
        share = over / per_op if per_op else float("inf")
        target = "met" if share < 0.01 else "not met"
        return (f"  timing overhead per op: EEXIST (the cheapest op) timed in batches of {k}: "
                f"2 clock reads of {clk:.1f} ns per batch = {over:.2f} ns per op = "
                f"{share * 100:.2f}% of its {per_op:.0f} ns; target < 1%: {target}. "
                f"Single-op samples (the distributions, assign and deassign) carry one read "
                f"each: {clk / per_op * 100:.1f}% of EEXIST, {clk / v.assign_ns * 100:.1f}% "
                f"of assign, {clk / v.deassign_ns * 100:.1f}% of deassign")
    cheapest = min(ops)
    share = clk / cheapest
    target = "met" if share < 0.01 else "not met"
    return (f"  timing overhead per op: one clock read, {clk:.1f} ns = {share * 100:.1f}% of the "
            f"cheapest op ({cheapest / 1e3:.2f} us); target < 1%: {target}")


def render(console, doc: dict, driver: str = "c") -> dict:
    a = analyze(doc, driver)
    host = doc["host"]
    say(console, f"[bold]host[/] {host['hostname']}  kernel {host['kernel']}  "
        f"HZ={host.get('config_hz') or 'unknown'}  preemption {host['preemption']}  "
        f"backend {host['backend']}  environment {doc.get('environment', 'host')}",
        markup=True)
    clk = doc.get("clock") or {}
    if clk:
        say(console, f"clock read cost: CLOCK_MONOTONIC {clk['wall_read_ns']:.1f} ns, "
            f"CLOCK_THREAD_CPUTIME_ID {clk['cpu_read_ns']:.1f} ns "
            f"(per-op samples use the monotonic clock only)")
    for name, rec in a["recipes"].items():
        console.print(recipe_table(name, rec, doc["config"]["recipes"][name]))
    for line in verdict_lines(a):
        say(console, line)
    line = overhead_line(doc, a)
    if line:
        say(console, line)
    if doc.get("kernel_check"):
        kc = doc["kernel_check"]
        say(console, f"  kernel-check ({kc.get('path', '?')}): {kc.get('summary', kc)}")
        now = predictions.agreement(kc, a["verdict"])
        if now is not None:
            agree = now["agrees"]
            say(console, "  kernel-check and measured verdict: " +
                ("agree" if agree else "[bold red]DISAGREE[/]"), markup=True)
    if a["failures"]:
        console.print(f"[red]{len(a['failures'])} boot(s) failed[/]; first: "
                      f"{a['failures'][0]['error']}")
    if doc.get("status") != "complete":
        from ..results import run_state
        console.print(f"[yellow]run status: {run_state(doc)}[/] (partial results)",
                      highlight=False)
    return a


def n_axis(ax, ns, label: str = "ioeventfd registrations N") -> None:
    """An x axis of registration counts: symmetric log (N=0 fits), ticks at the swept N
    written as plain numbers (not 10^0)."""
    from matplotlib.ticker import FixedLocator, NullLocator
    ax.set_xscale("symlog", linthresh=1)
    ticks = sorted({int(n) for n in ns})
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(n) for n in ticks])
    ax.set_xlabel(label)


def write_csv(doc: dict, a: dict, path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["recipe", "n", "boots", "boot_min_ns", "boot_median_ns", "boot_p10_ns",
                    "boot_p90_ns", "boot_max_ns", "registration_median_ns",
                    "registration_share", "blocked_share", "per_op_median_ns",
                    "memslot_median_ns", "stall_ns", "doorbells_ok", "verdict",
                    "regressions", "run_stall_ms", "run_stall_paid_by"])
        f_ = findings(doc, a)
        run_cols = [f_["verdict"], "+".join(f_["regressions"]) or "none", f_["stall_ms"],
                    f_["stall_phase"]]
        for name, rec in a["recipes"].items():
            for n, row in rec["rows"].items():
                b = row["boot"]
                w.writerow([name, n, row["boots"], b["min"], b["median"], b["p10"], b["p90"],
                            b["max"], row["registration_median_ns"],
                            f"{row['registration_share']:.4f}", f"{row['blocked_share']:.4f}",
                            row["per_op_median_ns"], row["memslot_median_ns"], row["stall_ns"],
                            row["doorbells_ok"], *run_cols])


def plot(doc: dict, a: dict, out_dir: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    title = f"{doc['host']['hostname']} {doc['host']['kernel']}"

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rec in a["recipes"].items():
        ns = list(rec["rows"])
        med = [rec["rows"][n]["boot"]["median"] / 1e6 for n in ns]
        lo = [rec["rows"][n]["boot"]["p10"] / 1e6 for n in ns]
        hi = [rec["rows"][n]["boot"]["p90"] / 1e6 for n in ns]
        line, = ax.plot(ns, med, marker="o", label=f"{name} (median)")
        ax.fill_between(ns, lo, hi, alpha=0.2, color=line.get_color(), label=f"{name} p10-p90")
    n_axis(ax, [n for rec in a["recipes"].values() for n in rec["rows"]])
    ax.set_ylabel("boot time (ms)")
    ax.set_title(f"Boot time vs registrations\n{title}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    written += save_figure(fig, out_dir, "boot_vs_n")

    recs = list(a["recipes"].items())
    if recs:
        fig, axes = plt.subplots(1, len(recs), figsize=(6 * len(recs), 4.5), squeeze=False)
        for ax, (name, rec) in zip(axes[0], recs):
            ns = list(rec["rows"])
            bottom = [0.0] * len(ns)
            ops = [op for op in PHASE_ORDER if any(op in rec["rows"][n]["phases"] for n in ns)]
            for op in ops:
                vals = [rec["rows"][n]["phases"].get(op, 0) / 1e6 for n in ns]
                ax.bar([str(n) for n in ns], vals, bottom=bottom, label=op)
                bottom = [b + v for b, v in zip(bottom, vals)]
            ax.set_title(f"{name}: median phase times")
            ax.set_xlabel("N")
            ax.set_ylabel("ms")
            if ops:
                ax.legend(fontsize=7)
        fig.suptitle(title)
        written += save_figure(fig, out_dir, "phases")

    if a["occupancy"]:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ks = [k for k, _ in a["occupancy"]]
        vs = [v / 1e3 for _, v in a["occupancy"]]
        ax.plot(ks, vs, ".", markersize=3, label="median per-op cost")
        if a["occupancy_slope_ns"] is not None:
            a0, b0 = stats.fit_linear(ks, [v * 1e3 for v in vs])
            ax.plot(ks, [(a0 + b0 * k) / 1e3 for k in ks], "-",
                    label=f"fit: {b0:.2f} ns per device")
        ax.set_xlabel("devices already on the bus")
        ax.set_ylabel("KVM_IOEVENTFD assign (us)")
        ax.set_title(f"Per-registration cost vs bus occupancy\n{title}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        written += save_figure(fig, out_dir, "per_op_vs_occupancy")
    return written


def write_all(console, doc: dict, out_dir: str, plots: bool = True) -> dict:
    """Render to the console, write summary.csv and the plots next to run.json, and the
    findings into run.json ("analysis", recomputed: refresh)."""
    a = render(console, doc)
    if a["recipes"]:
        write_csv(doc, a, os.path.join(out_dir, "summary.csv"))
        if plots:
            plot(doc, a, out_dir)
    refresh(doc, os.path.join(out_dir, "run.json"), a)
    return a
