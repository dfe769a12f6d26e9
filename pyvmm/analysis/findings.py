"""What a run found, computed from its samples alone (pure but for numpy where the fits
have it): the samples grouped into cells, each cell's summary, the steps after the
registrations and their stall, the analysis the report renders (analyze), a run as one
flat row (run_summary), and the findings machines read (findings: stored in run.json as
"analysis", recomputed by refresh)."""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict

from . import predictions, stats

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
    if verdict.behaviour == "deferred" and verdict.first_deassign_excess_ns is not None \
            and verdict.first_deassign_excess_ns >= stats.STALL_MIN_NS:
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
        "agrees": _agrees(kc, v),
        "modules_cached": (lab.get("timings") or {}).get("modules_cached"),
    }


def _agrees(kc: dict, v) -> bool | None:
    """The kernel-check against the verdict by today's predictions and rule (a run.json
    written before either changed is read as today's pyvmm reads a new one)."""
    now = predictions.agreement(kc, v)
    return kc.get("agrees") if now is None else now["agrees"]


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
