"""Turn a run.json into tables, a verdict, summary.csv and plots."""

from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict

from ..results import save_figure
from ..tables import Grid
from ..ui import say

from . import stats

PHASE_ORDER = ["vm", "mem", "vcpu", "gic", "ioev", "eexist", "deassign", "run", "memslot"]


def _phase(res: dict, op: str, index: int = 0):
    found = [p for p in res["phases"] if p["op"] == op]
    return found[index] if len(found) > index else None


def group(doc: dict, driver: str = "c") -> dict:
    """{(recipe, n): [result, ...]} of successful boots for one driver."""
    cells = defaultdict(list)
    for s in doc["samples"]:
        if s.get("driver", "c") == driver and s["result"]["ok"]:
            cells[(s["recipe"], s["n"])].append(s["result"])
    return cells


def cell_summary(results: list[dict]) -> dict:
    boot = [r["boot_wall_ns"] for r in results]
    reg = [(_phase(r, "ioev") or {"wall_ns": 0})["wall_ns"] for r in results]
    share = [g / b for g, b in zip(reg, boot) if b > 0]
    blocked = [max(0, r["boot_wall_ns"] - r["boot_cpu_ns"]) / r["boot_wall_ns"]
               for r in results if r["boot_wall_ns"] > 0]
    per_op = [x for r in results for x in (_phase(r, "ioev") or {"samples": []})["samples"]]
    memslot = [p["samples"][0] for r in results
               if (p := _phase(r, "memslot")) is not None and p["samples"]]
    phases = {}
    for op in PHASE_ORDER + ["teardown"]:
        vals = [sum(p["wall_ns"] for p in r["phases"] if p["op"] == op) for r in results]
        if any(vals):
            phases[op] = stats.median(vals)
    doorbells_ok = all(r["doorbells_completed"] == r["doorbells_expected"]
                       and r["doorbell_mmio_exits"] == 0 for r in results)
    return {
        "boots": len(results),
        "boot": stats.summarize(boot),
        "registration_median_ns": stats.median(reg),
        "registration_share": stats.median(share) if share else 0.0,
        "blocked_share": stats.median(blocked) if blocked else 0.0,
        "per_op_median_ns": stats.median(per_op) if per_op else None,
        "memslot_median_ns": stats.median(memslot) if memslot else None,
        "memslot_samples": memslot,
        "phases": phases,
        "doorbells_ok": doorbells_ok,
        "placement": sorted({(r["cpu_start"], r["cpu_end"]) for r in results}),
    }


def after_registration(res: dict) -> list[str]:
    """The steps of a boot that come after its first registration step, in order."""
    ops = [p["op"] for p in res["phases"]]
    return ops[ops.index("ioev") + 1:] if "ioev" in ops else []


def gap_to(res: dict, step: str) -> float | None:
    """Wall time (ns) of a boot from its first registration to the step `step` after
    them: the registration phase and every step between."""
    ops = [p["op"] for p in res["phases"]]
    if "ioev" not in ops:
        return None
    i = ops.index("ioev")
    j = next((k for k in range(i + 1, len(ops)) if ops[k] == step), None)
    if j is None:
        return None
    return float(sum(p["wall_ns"] for p in res["phases"][i:j]))


def stall_samples(cells: dict, recipes: list[str], n1: int | None) -> tuple[dict, dict]:
    """Per-step wall times (ns), one per boot, of the steps that may pay a grace period
    left by the registrations: at N=n1 and at N=0, keyed 'recipe/step', for every sweep
    recipe in which the step follows the registrations."""
    after: dict[str, list] = defaultdict(list)
    base: dict[str, list] = defaultdict(list)
    if n1 is None:
        return after, base
    for rname in recipes:
        with_regs, without = cells.get((rname, n1), []), cells.get((rname, 0), [])
        if not with_regs or not without:
            continue
        steps = {op for op in after_registration(with_regs[0]) if op in stats.STALL_PHASES}
        for op in steps:
            for res, into in ((with_regs, after), (without, base)):
                for r in res:
                    found = [p for p in r["phases"] if p["op"] == op]
                    if found:
                        into[f"{rname}/{op}"].append(found[0]["wall_ns"])
    return after, base


def analyze(doc: dict, driver: str = "c") -> dict:
    """Everything the report shows, computed from the samples alone."""
    cells = group(doc, driver)
    hz = doc["host"].get("config_hz")
    recipes = {}
    for rname in doc["config"]["recipes"]:
        if rname == "control":
            continue
        ns = sorted(n for (r, n) in cells if r == rname)
        rows = {n: cell_summary(cells[(rname, n)]) for n in ns}
        base = rows.get(0, {}).get("memslot_median_ns")
        for n, row in rows.items():
            m = row["memslot_median_ns"]
            row["stall_ns"] = (m - base) if (m is not None and base is not None and n) else None
        fit = None
        if len(ns) >= 3:
            try:
                # The registration phase alone: smooth in N. Boot totals jump by the
                # post-registration stall at the first N > 0, which a polynomial cannot
                # describe; the stall is reported on its own.
                fit = stats.fit_quadratic(ns, [rows[n]["registration_median_ns"] for n in ns])
            except ValueError:
                fit = None
        crossing = next((n for n in ns if rows[n]["registration_share"] >= 0.25), None)
        recipes[rname] = {"rows": rows, "fit": fit, "share_25_at": crossing}
    # Verdict from the control recipe; stall from the sweep recipes (N>0 vs N=0).
    ctrl = [r for (name, n), rs in cells.items() if name == "control" for r in rs]
    assign = [x for r in ctrl for x in (_phase(r, "ioev") or {"samples": []})["samples"]]
    eexist = [x for r in ctrl for x in (_phase(r, "eexist") or {"samples": []})["samples"]]
    deassign = [x for r in ctrl for x in (_phase(r, "deassign") or {"samples": []})["samples"]]
    # The stall right after registering: the smallest N > 0 (with many registrations the
    # grace period has partly elapsed by the time a later step comes), step by step.
    positive = sorted({n for rec in recipes.values() for n in rec["rows"] if n > 0})
    after, base = stall_samples(cells, [r for r in recipes], positive[0] if positive else None)
    per_boot = [(_phase(r, "deassign") or {"samples": []})["samples"] for r in ctrl]
    verdict = stats.verdict(assign, eexist, deassign, hz=hz, phases_after=after,
                            phases_base=base, deassigns_per_boot=per_boot)
    stall_dist = prediction = None
    if verdict.stall_phase is not None and positive:
        key = (f"{verdict.stall_recipe}/" if verdict.stall_recipe else "") + verdict.stall_phase
        b = stats.median(base[key])
        stall_dist = stats.summarize([x - b for x in after[key]])
        gaps = [gap_to(r, verdict.stall_phase)
                for r in cells.get((verdict.stall_recipe, positive[0]), [])]
        prediction = stats.predict_stall(hz, gaps)
    first_prediction = None
    if verdict.first_deassign_excess_ns is not None and \
            verdict.first_deassign_excess_ns >= stats.STALL_MIN_NS:
        first_prediction = stats.predict_stall(hz, [gap_to(r, "deassign") for r in ctrl])
    # Per-op cost against bus occupancy (position of the registration in its boot).
    occupancy = defaultdict(list)
    for (rname, n), rs in cells.items():
        if rname == "control" or n < 10:
            continue
        for r in rs:
            for k, x in enumerate((_phase(r, "ioev") or {"samples": []})["samples"]):
                occupancy[k].append(x)
    occ = sorted((k, stats.median(v)) for k, v in occupancy.items())
    slope = None
    if len(occ) >= 10:
        _, slope = stats.fit_linear([k for k, _ in occ], [v for _, v in occ])
    batches = [(p["batch_ns"], p["batch_ops"]) for p in (_phase(r, "eexist") for r in ctrl)
               if p and p.get("batch_ops")]
    return {"recipes": recipes, "verdict": verdict, "occupancy": occ,
            "stall_distribution": stall_dist, "stall_prediction": prediction,
            "first_deassign_prediction": first_prediction,
            "occupancy_slope_ns": slope, "hz": hz, "failures": doc.get("failures", []),
            "eexist_batches": batches, "control_n": doc["config"].get("control_n")}


def run_summary(doc: dict, share_ns=(100, 300, 1000), a: dict | None = None) -> dict:
    """A finished run in one flat row, as a comparison of runs (the lab matrix) shows
    it: the kernel, the verdict and its per-op evidence, the stall in ms and jiffies and
    the step that paid it, the registration share at `share_ns` and the boot medians of
    the first sweep recipe, the kernel-check and whether it agrees."""
    a = a or analyze(doc)
    v = a["verdict"]
    hz = a["hz"]
    recipes = [r for r in doc["config"]["recipes"] if r != "control"]
    first = a["recipes"][recipes[0]]["rows"] if recipes else {}
    kc = doc.get("kernel_check") or {}
    lab = doc.get("lab") or {}
    return {
        "kernel": doc["host"].get("kernel"),
        "package": doc["host"].get("package"),
        "verdict": stats.BEHAVIOUR_NAMES.get(v.behaviour, v.behaviour),
        "assign_us": None if v.assign_ns is None else v.assign_ns / 1e3,
        "eexist_us": None if v.eexist_ns is None else v.eexist_ns / 1e3,
        "deassign_us": None if v.deassign_ns is None else v.deassign_ns / 1e3,
        # the *_us above are medians of single-op samples at N=per_op_n; the mean and p90
        # of the same samples, for a reader who compares with strace -T or total/N
        "per_op_n": a["control_n"],
        "per_op_us": {op: {"median": st["median"] / 1e3, "mean": st["mean"] / 1e3,
                           "p90": st["p90"] / 1e3, "n": st["n"]}
                      for op, st in (v.per_op or {}).items()},
        "stall_ms": None if v.stall_ns is None else v.stall_ns / 1e6,
        "stall_jiffies": (None if v.stall_ns is None or not hz else v.stall_ns / (1e9 / hz)),
        "stall_phase": v.stall_phase,
        # the stall's spread over boots (the step's time minus its median with no
        # registrations), and what the SRCU code predicts for it (stats.predict_stall)
        "stall_p90_ms": (None if a["stall_distribution"] is None
                         else a["stall_distribution"]["p90"] / 1e6),
        "stall_predicted_ms": (None if a["stall_prediction"] is None
                               else a["stall_prediction"]["median_ns"] / 1e6),
        "stall_predicted_range_ms": (None if a["stall_prediction"] is None else
                                     [a["stall_prediction"]["lo_ns"] / 1e6,
                                      a["stall_prediction"]["hi_ns"] / 1e6]),
        "stall_gap_ms": (None if a["stall_prediction"] is None
                         else a["stall_prediction"]["gap_ns"] / 1e6),
        "first_deassign_predicted_ms": (None if a["first_deassign_prediction"] is None else
                                        a["first_deassign_prediction"]["median_ns"] / 1e6),
        "first_deassign_excess_ms": (None if v.first_deassign_excess_ns is None
                                     else v.first_deassign_excess_ns / 1e6),
        "share_recipe": recipes[0] if recipes else None,
        "reg_share": {str(n): first[n]["registration_share"] for n in share_ns if n in first},
        "boot_ms": {str(n): first[n]["boot"]["median"] / 1e6 for n in sorted(first)},
        "hz": hz,
        "kernel_check": kc.get("mechanism") or kc.get("behaviour"),
        "kernel_check_summary": kc.get("summary"),
        "agrees": kc.get("agrees"),
        "modules_cached": (lab.get("timings") or {}).get("modules_cached"),
    }


# Bumped when what the analysis computes changes: a run.json whose "analysis" carries
# another version (or other values) is rewritten by `pyvmm report`.
ANALYSIS_VERSION = 1


def findings(doc: dict, a: dict | None = None) -> dict:
    """What a run found, for machines: run_summary's row, and the answer in one line,
    the regressions present ('sync-on-register', 'stall'), the ratios behind the verdict
    and the step that paid the stall in words. Stored in run.json as "analysis", printed
    by `pyvmm bench --json`, read by the fleet. Always recomputed from the samples."""
    a = a or analyze(doc)
    v = a["verdict"]
    row = run_summary(doc, a=a)
    ok = [s for s in doc.get("samples", []) if s.get("result", {}).get("ok")]
    return _finite({"version": ANALYSIS_VERSION, "boots": len(ok),
            "failed_boots": len(doc.get("samples", [])) - len(ok),
            "verdict": row.pop("verdict"), "verdict_text": v.text,
            "answer": stats.answer(v, a["hz"]), "regressions": stats.regressions(v),
            "assign_over_eexist": v.assign_over_eexist,
            "assign_over_deassign": v.assign_over_deassign,
            "stall_paid_by": stats.STALL_PHASES.get(v.stall_phase) if v.stall_phase else None,
            "stall_recipe": v.stall_recipe,
            "occupancy_slope_ns": a["occupancy_slope_ns"], **row})


def _finite(x):
    """JSON without NaN or Infinity (run.json's reader refuses them): those become None."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def refresh(doc: dict, path: str | None = None, a: dict | None = None) -> tuple[dict, bool]:
    """The run's findings recomputed; when `path` is given and the stored ones differ
    (an older analysis, or none), run.json is rewritten with them. Returns (findings,
    whether the stored ones changed)."""
    new = findings(doc, a)
    old = doc.get("analysis")
    changed = json.loads(json.dumps(new)) != old
    if changed:
        doc["analysis"] = new
        if path is not None and os.path.isfile(path):
            from ..results import write_json_atomic
            write_json_atomic(path, {k: v for k, v in doc.items() if not k.startswith("_")})
    return new, changed


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
        if a["verdict"].behaviour in ("sync", "deferred") and "behaviour" in kc:
            agree = kc.get("agrees")
            if agree is None:
                agree = kc["behaviour"] == a["verdict"].behaviour
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
