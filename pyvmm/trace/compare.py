"""`pyvmm compare` on trace documents: two kernels or two VMMs side by side, figure by
figure (start-up, whole process, KVM ioctl time, SRCU waits, each milestone), with the
permutation test and the change rule of the sweep's compare, and each side's verdict."""

from __future__ import annotations

import json
import os

from ..analysis import stats
from ..errors import PyvmmError
from ..results import partial_lines
from ..tables import Grid
from ..ui import console
from .runs import SCHEMA

FIGURES = (("start-up ms", "startup_ms"), ("whole process ms", "process_ms"),
           ("KVM ioctl ms", "kvm_ioctl_ms"), ("SRCU wait ms", "srcu_wait_ms"),
           ("SRCU waits", "srcu_waits"))


def is_trace(path: str) -> bool:
    """Whether `path` (a results directory or a JSON file) holds a trace document."""
    if os.path.isdir(path):
        return os.path.exists(os.path.join(path, "trace.json"))
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return SCHEMA.encode() in head


def load(path: str) -> dict:
    if os.path.isdir(path):
        path = os.path.join(path, "trace.json")
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise PyvmmError(f"{path} does not exist: give a trace directory or its trace.json") \
            from None
    except (OSError, ValueError) as e:
        raise PyvmmError(f"{path} is not a readable trace.json: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise PyvmmError(f"{path} is not a trace document (schema {SCHEMA})")
    if not doc.get("runs"):
        raise PyvmmError(f"{path} holds no finished run")
    doc["_source"] = {"path": os.path.abspath(path), "mtime": os.path.getmtime(path)}
    return doc


def label(doc: dict) -> str:
    what = doc.get("workload") or os.path.basename(doc["traced"][0])
    return f"{what} on {doc['host'].get('kernel')}"


def values(doc: dict, key: str, milestone: bool = False) -> list[float]:
    out = []
    for r in doc["runs"]:
        s = r["summary"]
        v = s["milestones_ms"].get(key) if milestone else s.get(key)
        if v is not None:
            out.append(float(v))
    return out


def rows(a: dict, b: dict, min_change: float) -> list[dict]:
    keys = [(name, key, False) for name, key in FIGURES]
    ms = []
    for d in (a, b):
        for r in d["runs"]:
            for k in r["summary"]["milestones_ms"]:
                if k not in ms and k != "exec":
                    ms.append(k)
    keys += [(f"{k} (ms)", k, True) for k in ms]
    out = []
    for name, key, milestone in keys:
        xa, xb = values(a, key, milestone), values(b, key, milestone)
        if not xa or not xb:
            continue
        ma, mb = stats.median(xa), stats.median(xb)
        ratio = mb / ma if ma else float("nan")
        p = stats.permutation_pvalue(xa, xb) if len(xa) > 1 and len(xb) > 1 else None
        call = stats.change_call(ratio, p, min_change) if p is not None else "-"
        out.append({"figure": name, "a": ma, "b": mb, "ratio": ratio, "p": p,
                    "change": call, "na": len(xa), "nb": len(xb)})
    return out


def cmd_compare(args) -> int:
    if len(args.runs) < 2:
        raise PyvmmError("compare needs at least two traces (the first is the baseline)")
    min_change = args.min_change / 100
    docs = [load(p) for p in args.runs]
    base = docs[0]
    for doc, path in zip(docs[1:], args.runs[1:]):
        t = Grid(title=f"compare A = {label(base)}  vs  B = {label(doc)} ({len(base['runs'])} "
                       f"/ {len(doc['runs'])} runs)", title_justify="left", continued="compare")
        for col in ("figure", "A median", "B median", "B / A", "p-value", "change"):
            t.add_column(col, justify="left" if col == "figure" else "right")
        for r in rows(base, doc, min_change):
            t.add_row(r["figure"], f"{r['a']:.3f}", f"{r['b']:.3f}",
                      f"{r['ratio']:.2f}" if r["ratio"] == r["ratio"] else "-",
                      "-" if r["p"] is None else f"{r['p']:.4f}", r["change"])
        t.caption = (f"a change counts when p < {stats.CHANGE_P_MAX:g} and the medians "
                     f"differ by at least {min_change * 100:g}%; p needs two runs a side "
                     "(pyvmm trace --repeat K)")
        console.print(t)
        for name, d in (("A", base), ("B", doc)):
            console.print(f"{name}: {d['runs'][0]['summary']['verdict']}", highlight=False)
    partial_lines(console, docs, args.runs)
    return 0

