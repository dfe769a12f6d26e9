"""`pyvmm compare`: runs side by side, per (recipe, N) cell, with the permutation test
and the change rule (pyvmm.analysis.stats), the growth over each run's smallest N, the
verdict evidence of each run and a plot."""

from __future__ import annotations

import os

from ..tables import Grid

from ..analysis import findings, report, stats
from ..analysis.plan import load_run
from ..errors import PyvmmError
from ..results import partial_lines
from ..ui import console


def compare_docs(a: dict, b: dict) -> list[dict]:
    """Rows of (recipe, N, median A, median B, ratio B/A, p-value) for cells in both."""
    ca, cb = findings.group(a), findings.group(b)
    rows = []
    for key in sorted(set(ca) & set(cb)):
        xa = [r["boot_wall_ns"] for r in ca[key]]
        xb = [r["boot_wall_ns"] for r in cb[key]]
        ma, mb = stats.median(xa), stats.median(xb)
        reg_a = findings.cell_summary(ca[key])["registration_share"]
        reg_b = findings.cell_summary(cb[key])["registration_share"]
        rows.append({"recipe": key[0], "n": key[1], "median_a": ma, "median_b": mb,
                     "ratio": mb / ma if ma else float("nan"),
                     "p_value": stats.permutation_pvalue(xa, xb),
                     "reg_share_a": reg_a, "reg_share_b": reg_b})
    # Growth: each run's boot median against its own smallest N of the same recipe, so
    # runs in different environments (host vs TCG) can be set side by side.
    for r in rows:
        first = min((x for x in rows if x["recipe"] == r["recipe"]), key=lambda x: x["n"])
        r["growth_a"] = r["median_a"] / first["median_a"] if first["median_a"] else None
        r["growth_b"] = r["median_b"] / first["median_b"] if first["median_b"] else None
        r["base_n"] = first["n"]
    return rows


def behaviour_rows(doc: dict) -> dict[str, str]:
    """The verdict evidence of one run as printable values."""
    v = findings.analyze(doc)["verdict"]

    def us(x):
        return "-" if x is None else f"{x / 1e3:.2f} us"

    def ratio(x):
        return "-" if x is None else f"{x:.2f}"
    kc = doc.get("kernel_check") or {}
    return {
        "verdict": {"sync": "waits for a grace period", "deferred": "deferred free"}.get(
            v.behaviour, v.behaviour),
        "assign per op (median)": us(v.assign_ns), "EEXIST per op (median)": us(v.eexist_ns),
        "deassign per op (median)": us(v.deassign_ns),
        "assign / EEXIST": ratio(v.assign_over_eexist),
        "assign / deassign": ratio(v.assign_over_deassign),
        "post-registration stall": "-" if v.stall_ns is None else f"{v.stall_ns / 1e6:.2f} ms",
        "post-registration stall paid by": v.stall_phase or "-",
        "kernel-check": kc.get("mechanism") or {
            "sync": "calls synchronize_srcu_expedited",
            "deferred": "no synchronize_srcu_expedited"}.get(kc.get("behaviour"), "not run"),
    }


def run_label(doc: dict) -> str:
    lab = doc.get("lab") or {}
    name = lab.get("variant") or doc["host"]["kernel"]
    return f"{name} ({doc.get('environment', 'host')})"


def change_summary(rows: list[dict], min_change: float) -> str:
    """How many cells changed by the rule, and the geometric mean of B / A."""
    calls = [stats.change_call(r["ratio"], r["p_value"], min_change) for r in rows]
    changed = [c for c in calls if c not in ("no change", "no data")]
    gm = stats.geometric_mean(r["ratio"] for r in rows)
    gm_text = "-" if gm is None else f"{gm:.3f}"
    return (f"{len(changed)} of {len(rows)} cells changed (p < {stats.CHANGE_P_MAX:g} and at "
            f"least {min_change * 100:g}%); geometric mean of B / A over the cells {gm_text}")


def compare_many(docs: list[dict], paths: list[str], out: str | None,
                 min_change: float = stats.CHANGE_MIN) -> int:
    """More than two runs: for each run, the sweep cells against the first run's, and
    the verdict evidence with a row per run."""
    base = docs[0]
    t = Grid(title=f"compare {len(docs)} runs against the first: {run_label(base)}",
             title_justify="left", keys=3, continued="compare")
    for col in ("run", "recipe", "N", "boot med ms", "vs first", "p-value", "change", "growth",
                "reg. share"):
        t.add_column(col, justify="left" if col in ("run", "recipe") else "right")
    all_rows = []
    for i, doc in enumerate(docs):
        rows = compare_docs(base, doc)
        if not rows:
            raise PyvmmError(f"{paths[i]} shares no (recipe, N) cell with {paths[0]}")
        all_rows.append(rows)
        for r in rows:
            t.add_row(run_label(doc) if r is rows[0] else "", r["recipe"], str(r["n"]),
                      f"{r['median_b'] / 1e6:.3f}", "-" if i == 0 else f"{r['ratio']:.2f}x",
                      "-" if i == 0 else f"{r['p_value']:.4f}",
                      "-" if i == 0 else stats.change_call(r["ratio"], r["p_value"],
                                                           min_change),
                      "-" if r["growth_b"] is None else f"{r['growth_b']:.2f}x",
                      f"{r['reg_share_b'] * 100:.1f}%")
        t.add_section()
    envs = {d.get("environment", "host") for d in docs}
    t.caption = ("growth: boot median over the same run's median at the recipe's smallest N"
                 + ("; the runs come from different environments: 'vs first' mostly measures "
                    "the emulation, compare growth and the behaviour table" if len(envs) > 1
                    else ""))
    t.caption_justify = "left"
    console.print(t)
    for doc, rows in zip(docs[1:], all_rows[1:]):
        console.print(f"{run_label(doc)} vs {run_label(base)}: "
                      f"{change_summary(rows, min_change)}", highlight=False)
    bt = Grid(title="behaviour, a row per run", title_justify="left",
              continued="behaviour")
    evidence = [behaviour_rows(d) for d in docs]
    bt.add_column("run")
    for k in evidence[0]:
        bt.add_column(k, justify="left" if k in ("verdict", "kernel-check") else "right")
    for d, ev in zip(docs, evidence):
        bt.add_row(run_label(d), *ev.values())
    console.print(bt)
    out = out or (paths[-1] if os.path.isdir(paths[-1]) else os.path.dirname(paths[-1]))
    _compare_plot_many(all_rows, [run_label(d) for d in docs], out)
    console.print(f"plot: {os.path.join(out, 'compare.png')}", highlight=False)
    return 0


def cmd_compare(args) -> int:
    if len(args.runs) < 2:
        raise PyvmmError("compare needs at least two runs (the first is the baseline)")
    if not 0 <= args.min_change < 100:
        raise PyvmmError(f"--min-change {args.min_change:g}: give a percentage from 0 to 100")
    min_change = args.min_change / 100
    docs = [load_run(p) for p in args.runs]
    if len(args.runs) > 2:
        rc = compare_many(docs, args.runs, args.out, min_change)
        partial_lines(console, docs, args.runs)
        return rc
    args.a, args.b = args.runs
    a, b = docs
    rows = compare_docs(a, b)
    if not rows:
        raise PyvmmError("the two runs share no (recipe, N) cell to compare")
    name_a, name_b = run_label(a), run_label(b)
    t = Grid(title=f"compare A = {name_a}  vs  B = {name_b}", title_justify="left", keys=2,
             continued="compare A vs B")
    for col in ("recipe", "N", "A boot med ms", "B boot med ms", "B / A", "p-value", "change",
                "A growth", "B growth", "A reg. share", "B reg. share"):
        t.add_column(col, justify="left" if col == "recipe" else "right")

    def growth(x):
        return "-" if x is None else f"{x:.2f}x"
    for r in rows:
        t.add_row(r["recipe"], str(r["n"]), f"{r['median_a'] / 1e6:.3f}",
                  f"{r['median_b'] / 1e6:.3f}", f"{r['ratio']:.2f}", f"{r['p_value']:.4f}",
                  stats.change_call(r["ratio"], r["p_value"], min_change),
                  growth(r["growth_a"]), growth(r["growth_b"]),
                  f"{r['reg_share_a'] * 100:.1f}%", f"{r['reg_share_b'] * 100:.1f}%")
    t.caption = "growth: boot median over the same run's median at the recipe's smallest N"
    if a.get("environment", "host") != b.get("environment", "host"):
        t.caption += (f". A and B ran in different environments ({a.get('environment', 'host')}"
                      f" vs {b.get('environment', 'host')}): B / A mostly measures the "
                      "emulation; compare growth, shares and the behaviour table")
    t.caption_justify = "left"
    console.print(t)
    console.print(change_summary(rows, min_change), highlight=False)
    ba, bb = behaviour_rows(a), behaviour_rows(b)
    bt = Grid(title="behaviour side by side", title_justify="left")
    for col in ("", "A", "B"):
        bt.add_column(col)
    for k in ba:
        bt.add_row(k, ba[k], bb[k])
    console.print(bt)
    for label, doc in (("A", a), ("B", b)):
        an = findings.analyze(doc)
        console.print(f"{label}: {an['verdict'].text}; {an['verdict'].stall_text}",
                      highlight=False)
    out = args.out or (args.b if os.path.isdir(args.b) else os.path.dirname(args.b))
    _compare_plot_many([[dict(r, growth_b=r["growth_a"]) for r in rows], rows],
                       [f"A {name_a}", f"B {name_b}"], out)
    console.print(f"side-by-side plot: {os.path.join(out, 'compare.png')}", highlight=False)
    partial_lines(console, docs, args.runs)
    return 0


def _compare_plot_many(all_rows, names, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recipes = sorted({r["recipe"] for rows in all_rows for r in rows})
    fig, axes = plt.subplots(1, len(recipes), figsize=(6 * len(recipes), 4.5), squeeze=False)
    for ax, rname in zip(axes[0], recipes):
        for rows, name in zip(all_rows, names):
            rr = [r for r in rows if r["recipe"] == rname]
            if not rr:
                continue
            ax.plot([r["n"] for r in rr], [r["growth_b"] or float("nan") for r in rr], "o-",
                    label=name)
        report.n_axis(ax, [r["n"] for rows in all_rows for r in rows if r["recipe"] == rname],
                      "registrations N")
        ax.set_ylabel("boot median / boot median at the smallest N")
        ax.set_title(rname)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(out, exist_ok=True)
    for ext in ("png", "svg"):
        fig.savefig(os.path.join(out, f"compare.{ext}"), dpi=110)
    plt.close(fig)
