"""`pyvmm compare FLEET_A FLEET_B`: two fleet runs (before and after a kernel rollout),
host by host and kernel group by kernel group, with the rule `pyvmm compare` uses for
runs: a change is called only when the permutation test gives p < 0.01 and the medians
differ by at least --min-change.

Per host present in both: the kernel before and after, the verdict before and after, the
stall (per-boot samples of the step that paid it, against its own runs' boots with no
registration), the assign per op (the control recipe's samples), and the boots of every
cell both runs share as one geometric mean of ratios. Per kernel group (the kernel of
run B): the same figures over its hosts' medians."""

from __future__ import annotations

import json
import os

from ..analysis import findings, stats
from ..analysis.plan import load_run
from ..errors import PyvmmError
from ..ui import console, say


def is_fleet(path: str) -> bool:
    p = os.path.join(path, "fleet.json") if os.path.isdir(path) else path
    if not os.path.basename(p) == "fleet.json" or not os.path.isfile(p):
        return False
    try:
        with open(p) as f:
            return json.load(f).get("schema", "").startswith("pyvmm.fleet/")
    except (OSError, ValueError):
        return False


def load(path: str) -> dict:
    p = os.path.join(path, "fleet.json") if os.path.isdir(path) else path
    try:
        with open(p) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise PyvmmError(f"{path}: not a readable fleet.json ({e})") from None
    if not doc.get("schema", "").startswith("pyvmm.fleet/"):
        raise PyvmmError(f"{path}: not a fleet run (schema {doc.get('schema')})")
    doc["_dir"] = os.path.dirname(os.path.abspath(p))
    return doc


def _bench(row: dict, base: str) -> dict | None:
    run = ((row.get("jobs") or {}).get("bench") or {}).get("run")
    path = os.path.join(base, run) if run else None
    return load_run(path) if path and os.path.exists(path) else None


def _samples(doc: dict) -> dict:
    """Per-boot stall samples (the stall step minus its no-registration median) and the
    control recipe's assign samples."""
    a = findings.analyze(doc)
    v = a["verdict"]
    out = {"stall": [], "assign": [], "verdict": findings.findings(doc, a)["verdict"],
           "stall_ms": None if v.stall_ns is None else v.stall_ns / 1e6}
    cells = findings.group(doc)
    ctrl = [r for (name, _), rs in cells.items() if name == "control" for r in rs]
    out["assign"] = [x for r in ctrl for p in r["phases"] if p["op"] == "ioev"
                     for x in p["samples"]]
    recipes = [r for r in doc["config"]["recipes"] if r != "control"]
    ns = sorted({n for (name, n) in cells if name in recipes and n > 0})
    if ns:
        after, base = findings.stall_samples(cells, recipes, ns[0])
        key = None
        if v.stall_phase:
            key = (f"{v.stall_recipe}/" if v.stall_recipe else "") + v.stall_phase
        else:
            key = next((k for k in after if k.endswith("memslot") and base.get(k)), None)
        if key and after.get(key) and base.get(key):
            b = stats.median(base[key])
            out["stall"] = [x - b for x in after[key]]
    return out


def compare_hosts(a: dict, b: dict, min_change: float) -> list[dict]:
    """`a` and `b` carry "_dir", where their fleet.json lies."""
    """A row per host present in both fleet runs with a bench in each."""
    rows_a = {r["host"]: r for r in a["rows"]}
    out = []
    for rb in b["rows"]:
        ra = rows_a.get(rb["host"])
        if ra is None:
            continue
        da, db = _bench(ra, a["_dir"]), _bench(rb, b["_dir"])
        row = {"host": rb["host"], "kernel_a": ra.get("kernel"), "kernel_b": rb.get("kernel"),
               "verdict_a": ra.get("verdict"), "verdict_b": rb.get("verdict"),
               "stall_a_ms": ra.get("stall_ms"), "stall_b_ms": rb.get("stall_ms"),
               "stall_change": None, "assign_change": None, "boot_ratio": None,
               "boot_changes": None}
        if da is None or db is None:
            row["note"] = "no bench in " + ("both" if da is None and db is None else
                                            "A" if da is None else "B")
            out.append(row)
            continue
        sa, sb = _samples(da), _samples(db)
        for key, label in (("stall", "stall_change"), ("assign", "assign_change")):
            if sa[key] and sb[key]:
                ma, mb = stats.median(sa[key]), stats.median(sb[key])
                p = stats.permutation_pvalue(sa[key], sb[key])
                scale = max(abs(ma), 1e5 if key == "stall" else 1.0)  # 0.1 ms floor
                ratio = (scale + (mb - ma)) / scale
                row[label] = {"a": ma, "b": mb, "p": p,
                              "call": stats.change_call(ratio, p, min_change)}
        from ..bench.compare import compare_docs
        cells = compare_docs(da, db)
        ratios = [c["ratio"] for c in cells if c["ratio"] == c["ratio"]]
        row["boot_ratio"] = stats.geometric_mean(ratios)
        row["boot_changes"] = sum(1 for c in cells if stats.change_call(
            c["ratio"], c["p_value"], min_change) not in ("no change", "no data"))
        row["cells"] = len(cells)
        out.append(row)
    return out


def by_kernel(rows: list[dict]) -> list[dict]:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["kernel_b"] or "?", []).append(r)
    out = []
    for k, rs in groups.items():
        sa = [r["stall_a_ms"] for r in rs if r["stall_a_ms"] is not None]
        sb = [r["stall_b_ms"] for r in rs if r["stall_b_ms"] is not None]
        calls = [((r.get("stall_change") or {}).get("call")) for r in rs]
        out.append({"kernel_b": k, "hosts": len(rs),
                    "kernels_a": sorted({r["kernel_a"] or "?" for r in rs}),
                    "verdicts_a": sorted({r["verdict_a"] or "-" for r in rs}),
                    "verdicts_b": sorted({r["verdict_b"] or "-" for r in rs}),
                    "stall_a_ms": stats.median(sa) if sa else None,
                    "stall_b_ms": stats.median(sb) if sb else None,
                    "stall_calls": {c: calls.count(c) for c in set(calls) if c}})
    return out


def _ms(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def cmd_compare(args) -> int:
    if len(args.runs) != 2:
        raise PyvmmError("pyvmm compare on fleet runs takes two: the run before and the "
                         "run after")
    a, b = load(args.runs[0]), load(args.runs[1])
    min_change = args.min_change / 100
    rows = compare_hosts(a, b, min_change)
    if not rows:
        raise PyvmmError("the two fleet runs share no host")
    from ..tables import Grid
    t = Grid(title=f"fleet A {args.runs[0]} -> B {args.runs[1]}: per host",
             title_justify="left", keys=1, continued="fleet compare")
    for c in ("host", "kernel A -> B", "verdict A -> B", "stall ms A -> B (call, p)",
              "assign us A -> B (call)", "boots B/A (cells changed)"):
        t.add_column(c, justify="left" if c.startswith(("host", "kernel", "verdict"))
                     else "right")
    for r in rows:
        st, asg = r.get("stall_change"), r.get("assign_change")
        t.add_row(r["host"], f"{r['kernel_a'] or '?'} -> {r['kernel_b'] or '?'}",
                  f"{r['verdict_a'] or '-'} -> {r['verdict_b'] or '-'}",
                  f"{_ms(r['stall_a_ms'])} -> {_ms(r['stall_b_ms'])}"
                  + (f" ({st['call']}, p={st['p']:.3f})" if st else ""),
                  (f"{asg['a'] / 1e3:.2f} -> {asg['b'] / 1e3:.2f} ({asg['call']})"
                   if asg else "-"),
                  "-" if r["boot_ratio"] is None else
                  f"{r['boot_ratio']:.2f}x ({r['boot_changes']}/{r['cells']})")
    t.caption = (f"a change is called when p < 0.01 and the medians differ by at least "
                 f"{args.min_change:g}%; stall samples: the stall step's boots minus its "
                 "median with nothing registered; boots: geometric mean of the per-cell "
                 "median ratios")
    t.caption_justify = "left"
    console.print(t)
    g = Grid(title="per kernel group (B's kernel)", title_justify="left")
    for c in ("kernel B", "hosts", "from", "verdicts A -> B", "median stall ms A -> B",
              "stall calls"):
        g.add_column(c)
    for r in by_kernel(rows):
        g.add_row(r["kernel_b"], str(r["hosts"]), ", ".join(r["kernels_a"]),
                  f"{'/'.join(r['verdicts_a'])} -> {'/'.join(r['verdicts_b'])}",
                  f"{_ms(r['stall_a_ms'])} -> {_ms(r['stall_b_ms'])}",
                  ", ".join(f"{k} {v}" for k, v in sorted(r["stall_calls"].items())) or "-")
    console.print(g)
    for r in rows:
        if r.get("note"):
            say(console, f"{r['host']}: {r['note']}")
    return 0
