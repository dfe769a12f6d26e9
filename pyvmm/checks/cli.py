"""`pyvmm check NAME`: correctness checks that exit non-zero on any violation."""

from __future__ import annotations

import json

from ..tables import Grid

from ..ui import console, fmt_ns, progress
from . import gmem, races

CHECKS = ("ioeventfd-ordering", "memslot-coherence", "guest-memfd")


def add_parsers(sub) -> None:
    c = sub.add_parser("check", help="correctness checks: ordering after KVM_IOEVENTFD, "
                                     "memslot coherence, guest_memfd lifecycle")
    c.add_argument("name", choices=CHECKS + ("all",),
                   help=f"which check: {', '.join(CHECKS)}, or all of them")
    c.add_argument("--iterations", type=int, default=100_000,
                   help="guest loop iterations for the concurrency checks (default 100000)")
    c.add_argument("--duration", type=float, default=60.0, metavar="S",
                   help="stop a concurrency check after this many seconds (default 60)")
    c.add_argument("--hold-us", type=float, default=races.DEFAULT_HOLD_S * 1e6,
                   help="how long the mutator leaves each state before the next ioctl, so "
                        "the vCPU sees settled states (default %(default)g us)")
    c.add_argument("--reads", type=int, default=50,
                   help="guest reads per step of the guest-memfd cases (default 50)")
    c.add_argument("--json", action="store_true", help="print the result as JSON")
    c.set_defaults(func=cmd_check)


def _progress():
    return progress("text", "bar", "count", "elapsed")


def run_concurrent(name: str, args) -> tuple[int, dict]:
    fn = {"ioeventfd-ordering": races.ioeventfd_ordering,
          "memslot-coherence": races.memslot_coherence}[name]
    if args.iterations < 1 or args.duration <= 0 or args.hold_us < 0:
        from ..errors import PyvmmError
        raise PyvmmError("--iterations must be >= 1, --duration > 0 and --hold-us >= 0")
    with _progress() as prog:
        task = prog.add_task(name, total=args.iterations)
        res = fn(args.iterations, args.duration,
                 lambda done, total: prog.update(task, completed=done),
                 hold_s=args.hold_us / 1e6)
    d = res.to_dict()
    if not args.json:
        _show_concurrent(res, d)
    return (1 if res.violations else 0), d


def _show_concurrent(res, d: dict) -> None:
    v = res.verdict
    t = Grid(title=f"pyvmm check {res.name}", show_header=False, title_justify="left")
    t.add_column("", style="bold")
    t.add_column("")
    rows = [("iterations", f"{res.iterations} ({res.runs} KVM_RUNs, stopped by "
                           f"{res.stopped_by})"),
            ("elapsed", f"{res.elapsed_s:.2f} s"),
            ("mutator operations", str(d.get("operations", 0))),
            ("accesses judged", f"{v.checked} in a settled state, {v.ambiguous} during an "
                                "operation (sanity-checked only)"),
            ("violations", f"[bold {'red' if v.violations else 'green'}]"
                           f"{len(v.violations)}[/]")]
    if "pattern_intact" in d:
        rows.append(("slot pattern intact", "yes" if d["pattern_intact"] else "[red]NO"))
    for k, val in rows:
        t.add_row(k, val)
    console.print(t)
    o = Grid(title="outcomes (state / access / what the VMM saw)", title_justify="left")
    o.add_column("state / access / outcome")
    o.add_column("count", justify="right")
    for key, n in d["verdict"]["outcomes"].items():
        o.add_row(key, str(n))
    console.print(o)
    if d["latency"]:
        lt = Grid(title="mutator ioctl latency while the vCPU runs", title_justify="left")
        for col in ("operation", "count", "p50", "p90", "p99", "max"):
            lt.add_column(col, justify="left" if col == "operation" else "right")
        for name, s in d["latency"].items():
            lt.add_row(name, str(s["count"]), fmt_ns(s["p50_ns"], 3), fmt_ns(s["p90_ns"], 3),
                       fmt_ns(s["p99_ns"], 3), fmt_ns(s["max_ns"], 3))
        console.print(lt)
    if res.stats:
        parts = []
        for label, deltas in res.stats.items():
            moved = ", ".join(f"{k} {val}" for k, val in deltas.items() if val)
            parts.append(f"{label}: {moved or 'nothing moved'}")
        console.print("KVM stats deltas: " + "; ".join(parts), highlight=False)
    for viol in v.violations[:5]:
        a = viol.access
        console.print(f"[red]violation[/] run {a.run} (seq {a.start}->{a.end}): {viol.why}; "
                      f"{a.detail}", highlight=False)


def run_gmem(args) -> tuple[int, dict]:
    try:
        with _progress() as prog:
            task = prog.add_task("guest-memfd", total=len(gmem.CASES) + 1)
            cases = gmem.run_cases(args.reads, lambda d, t: prog.update(task, completed=d))
    except gmem.CheckSkipped as e:
        if not args.json:
            console.print(f"pyvmm check guest-memfd: skipped: {e}", highlight=False)
        return 0, {"check": "guest-memfd", "skipped": str(e)}
    d = {"check": "guest-memfd", "cases": [c.to_dict() for c in cases],
         "violations": sum(not c.ok for c in cases)}
    if not args.json:
        t = Grid(title="pyvmm check guest-memfd", title_justify="left")
        for col in ("case", "expected", "observed", "result"):
            t.add_column(col)
        for c in cases:
            t.add_row(c.name, c.expected, "\n".join(c.observed),
                      "[green]as expected" if c.ok else "[bold red]VIOLATION")
        console.print(t)
    return (1 if d["violations"] else 0), d


def cmd_check(args) -> int:
    names = CHECKS if args.name == "all" else (args.name,)
    rc, docs = 0, []
    for name in names:
        r, d = run_gmem(args) if name == "guest-memfd" else run_concurrent(name, args)
        rc = max(rc, r)
        docs.append(d)
    if args.json:
        from ..results import envelope
        if len(docs) == 1:
            out = envelope("pyvmm.check/1", None, **docs[0])
        else:
            out = envelope("pyvmm.checks/1", None, checks=docs)
        print(json.dumps(out, indent=2))
    elif rc:
        console.print("[bold red]violations found[/]")
    return rc

