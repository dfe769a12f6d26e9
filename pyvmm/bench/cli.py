"""CLI of the bench: `pyvmm bench`, `pyvmm bench ptwrite`, `pyvmm report` (and the
parser of `pyvmm compare`, whose command lives in compare.py)."""

from __future__ import annotations

import json
import os
import time

from ..tables import Grid

from ..errors import EXIT_FOUND, EXIT_NOTHING, PyvmmError
from ..analysis.stats import FAIL_ON
from ..ui import (BENCH_PTWRITE, console, err_console, int_list,  # noqa: F401 (re-exported)
                  recipes_arg, say)
from ..ui import progress as progress_bar
from ..analysis import findings, report, stats
from ..analysis.plan import DEFAULT_NS, DEFAULT_RECIPES, SweepConfig, load_run
from ..results import new_run_dir
from .compare import cmd_compare
from .sweep import Sweep



def add_parsers(sub) -> None:
    b = sub.add_parser("bench", help="sweep the registration count and time every boot phase; "
                                     "pyvmm bench ptwrite: shadow-MMU page-table writes (its "
                                     "own --help)")
    b.add_argument("--ns", default=",".join(map(str, DEFAULT_NS)),
                   help="registration counts to sweep (default %(default)s)")
    b.add_argument("--recipes", default=",".join(DEFAULT_RECIPES), metavar="RECIPES",
                   help="what each boot does: preset names separated by ',' (before-vcpu, "
                        "during-boot, after-vcpu), or recipe templates separated by ';' "
                        "(e.g. 'vm,mem,ioev:N,vcpu:1,run'; docs/methodology.md) "
                        "(default %(default)s)")
    b.add_argument("--repeats", type=int, default=30, help="boots per cell (default 30)")
    b.add_argument("--warmup", type=int, default=5,
                   help="boots run first and discarded (caches, page faults; default 5)")
    b.add_argument("--seed", type=int, default=None,
                   help="seed of the interleaved boot order (default: a random one, "
                        "recorded in run.json; give it to repeat an order)")
    b.add_argument("--ioev-len", type=int, default=4, choices=[0, 1, 2, 4, 8],
                   help="length of each MMIO ioeventfd; 0 registers it on the FAST_MMIO "
                        "bus too, two registrations each (default 4)")
    b.add_argument("--pin", type=int, default=None, metavar="CPU",
                   help="pin the boot thread to this CPU (one of those this process may "
                        "run on; where it ran is recorded either way)")
    b.add_argument("--control-n", type=int, default=32,
                   help="N of the control recipe the verdict reads (assign, EEXIST, "
                        "deassign, one ioctl each; 0: no verdict; default %(default)s)")
    b.add_argument("--out", default="results",
                   help="parent directory for results (default %(default)s)")
    b.add_argument("--json", action="store_true",
                   help="print the findings (verdict, answer, regressions, evidence, stall) "
                        "as one JSON object on stdout; tables and progress go to stderr")
    b.add_argument("--fail-on", choices=FAIL_ON, default=None,
                   help=f"exit {EXIT_FOUND} when the run finds this: sync-on-register (the "
                        "pre-6.18 regression), stall (the fix's follow-up), any (either)")
    b.add_argument("--no-plot", action="store_true",
                   help="write no plots (no matplotlib needed; pyvmm report draws them later)")
    b.add_argument("--python-vs-c", action="store_true",
                   help="drive the same recipe with the C helper, the floor (the least "
                        "Python that makes the same calls) and the Python VMM, interleaved, "
                        "and print per-phase ratios")
    b.add_argument("--per-ioctl", action="store_true",
                   help="with --python-vs-c: trace every syscall of both drivers (tracefs "
                        "raw_syscalls) and show, per phase, each ioctl's time in the kernel "
                        "from either side and the user-space time between them")
    b.set_defaults(func=cmd_bench)

    r = sub.add_parser("report", help="re-render tables, CSV and plots from a run.json")
    r.add_argument("run", help="results directory or run.json")
    r.add_argument("--pyperf", metavar="FILE", default=None,
                   help="also export the boots as pyperf JSON (a benchmark per recipe and "
                        "N), for pyperf stats, hist and compare_to")
    r.set_defaults(func=cmd_report)

    c = sub.add_parser("compare", help="per-N ratios between runs (two, or more: a row per "
                                       "run against the first), with permutation p-values; "
                                       "traces (pyvmm trace) figure by figure")
    c.add_argument("runs", nargs="+", metavar="RUN",
                   help="results directories or run.json files; the first is the baseline")
    c.add_argument("--out", default=None, help="where to write the side-by-side plot "
                                               "(default: the last run's directory)")
    c.add_argument("--min-change", type=float, default=stats.CHANGE_MIN * 100, metavar="PCT",
                   help="smallest difference of medians reported as a change, with the "
                        "permutation test at p < 0.01 (default %(default)g%%)")
    c.set_defaults(func=cmd_compare)


def check_pin(cpu: int | None) -> None:
    """--pin names a CPU this process may run on (checked before anything is made)."""
    if cpu is None:
        return
    allowed = sorted(os.sched_getaffinity(0))
    if cpu not in allowed:
        raise PyvmmError(f"--pin {cpu}: this process may run on CPU "
                         f"{', '.join(map(str, allowed))} only; give one of those")


def cmd_bench(args) -> int:
    check_pin(args.pin)
    if args.per_ioctl:
        if not args.python_vs_c:
            raise PyvmmError("--per-ioctl compares the two drivers: add --python-vs-c")
        return per_ioctl(args)
    if args.python_vs_c:
        if args.json or args.fail_on:
            raise PyvmmError("--json and --fail-on read the sweep's verdict; --python-vs-c "
                             "compares drivers and makes none")
        ns, recipes = python_vs_c_cells(args)
        cfg = SweepConfig(ns=ns, recipes=recipes, repeats=args.repeats, warmup=args.warmup,
                          seed=args.seed, ioev_len=args.ioev_len, pin_cpu=args.pin,
                          control_n=0, drivers=("c", "floor", "py"))
    else:
        cfg = SweepConfig(ns=int_list(args.ns), recipes=recipes_arg(args.recipes),
                          repeats=args.repeats, warmup=args.warmup, seed=args.seed,
                          ioev_len=args.ioev_len, pin_cpu=args.pin, control_n=args.control_n)
    if args.fail_on in ("sync-on-register", "stall", "any") and not cfg.control_n:
        raise PyvmmError("--fail-on needs the verdict: drop --control-n 0")
    from .. import hostinfo
    host = hostinfo.collect()
    if host["kvm_error"]:
        raise PyvmmError(host["kvm_error"])
    con = err_console if args.json else console
    out = new_run_dir(args.out, f"{host['hostname']}-{host['kernel']}")
    sweep = Sweep(cfg, out, host)
    total = len(sweep.cells()) * cfg.repeats
    say(con, f"pyvmm bench: {total} boots ({len(sweep.cells())} cells x {cfg.repeats} "
        f"repeats, interleaved, seed {cfg.seed}, {cfg.warmup} warm-up boots "
        f"discarded) -> {out}")
    t0 = time.monotonic()
    interrupted = False
    with progress_bar("text", "bar", "count", "elapsed", "remaining", con=con) as prog:
        task = prog.add_task("booting", total=total)

        def progress(done, tot, cell):
            prog.update(task, completed=done,
                        description=f"booting {cell[0]} N={cell[1]} ({cell[2]})")
        try:
            doc = sweep.run(progress)
        except KeyboardInterrupt:
            interrupted = True
            doc = sweep.doc
    elapsed = time.monotonic() - t0
    path = os.path.join(out, "run.json")
    if not any(s["result"]["ok"] for s in doc["samples"]):
        first = doc["failures"][0]["error"] if doc.get("failures") else "none ran"
        con.print(f"[red]no boot succeeded[/] ({len(doc['samples'])} tried; first error: "
                  f"{first}); {path} keeps what was tried", highlight=False)
        return EXIT_NOTHING if not interrupted else 130
    found = None
    if args.python_vs_c:
        python_vs_c_table(doc)
    else:
        a = report.write_all(con, doc, out, plots=not args.no_plot)
        found = findings.findings(doc, a)
    say(con, f"sweep wall time {elapsed:.1f} s; {len(doc['samples'])} boots recorded in "
        f"{path}")
    if args.json:
        print(json.dumps({"run": path, "status": doc["status"], **(found or {})}, indent=1))
    if interrupted:
        con.print("[yellow]interrupted: run.json holds the samples taken so far[/]")
        return 130
    if found and stats.fails_on(args.fail_on, found["regressions"]):
        say(con, f"--fail-on {args.fail_on}: found {', '.join(found['regressions'])} "
            f"(exit {EXIT_FOUND})")
        return EXIT_FOUND
    return 0


PY_OVER_C_TARGET = 1.15        # the Python VMM's whole boot against the C helper
PY_OVER_FLOOR_TARGET = 1.10    # each phase against the floor (pyvmm.drivers.floor)


def python_vs_c_table(doc: dict) -> dict:
    """Per-phase medians of the C helper, the floor (when the run has it) and the Python
    VMM, with Python / C, floor / C and Python / floor, per recipe and N. Returns
    {(recipe, N): {"py/c": boot ratio, "floor/c": ..., "phases": {label: {...}}}}."""
    c_cells = findings.group(doc, "c")
    py_cells = findings.group(doc, "py")
    fl_cells = findings.group(doc, "floor")
    out = {}

    def ratio(a, b):
        return a / b if b else float("nan")

    for key in sorted(set(c_cells) & set(py_cells)):
        cr, pr, fr = c_cells[key], py_cells[key], fl_cells.get(key, [])
        drivers = [("C", cr)] + ([("floor", fr)] if fr else []) + [("Python", pr)]
        t = Grid(title=f"Python VMM vs C helper: {key[0]} N={key[1]} ("
                       + " / ".join(f"{len(rs)} {name}" for name, rs in drivers)
                       + " boots, interleaved)", title_justify="left",
                 continued=f"{key[0]} N={key[1]}")
        t.add_column("phase")
        for name, _ in drivers:
            t.add_column(f"{name} us", justify="right")
        t.add_column("Python / C", justify="right")
        if fr:
            t.add_column("floor / C", justify="right")
            t.add_column("Python / floor", justify="right")
        # Phases are compared by position; only positions every boot of every driver has.
        depth = min(len(r["phases"]) for _, rs in drivers for r in rs)
        labels = [p["op"] if p["op"] != "run" else f"run->{p.get('end_marker', '?')}"
                  for p in cr[0]["phases"][:depth]]
        cell = {"phases": {}}
        over = []
        for i, label in enumerate(labels):
            med = {name: stats.median([r["phases"][i]["wall_ns"] for r in rs])
                   for name, rs in drivers}
            row = [label] + [f"{med[name] / 1e3:.1f}" for name, _ in drivers]
            ph = {"c_ns": med["C"], "py_ns": med["Python"],
                  "py/c": ratio(med["Python"], med["C"])}
            row.append(f"{ph['py/c']:.2f}x")
            if fr:
                ph["floor_ns"] = med["floor"]
                ph["floor/c"] = ratio(med["floor"], med["C"])
                ph["py/floor"] = ratio(med["Python"], med["floor"])
                row += [f"{ph['floor/c']:.2f}x", f"{ph['py/floor']:.2f}x"]
                if label != "teardown" and ph["py/floor"] > PY_OVER_FLOOR_TARGET:
                    over.append(f"{label} {ph['py/floor']:.2f}x")
            cell["phases"][label] = ph
            t.add_row(*row)
        boot = {name: stats.median([r["boot_wall_ns"] for r in rs]) for name, rs in drivers}
        cell["py/c"] = ratio(boot["Python"], boot["C"])
        row = ["[bold]boot total"] + [f"{boot[name] / 1e3:.1f}" for name, _ in drivers]
        row.append(f"[bold]{cell['py/c']:.2f}x")
        if fr:
            cell["floor/c"] = ratio(boot["floor"], boot["C"])
            cell["py/floor"] = ratio(boot["Python"], boot["floor"])
            row += [f"{cell['floor/c']:.2f}x", f"[bold]{cell['py/floor']:.2f}x"]
        t.add_row(*row)
        met = "met" if cell["py/c"] <= PY_OVER_C_TARGET else "NOT met"
        caption = f"Python / C boot total within {PY_OVER_C_TARGET:.2f}x: {met}"
        if fr:
            caption += (f"; the floor (the least Python that makes the same calls, "
                        f"pyvmm.drivers.floor) is {cell['floor/c']:.2f}x C: what any Python pays here; "
                        f"pyvmm within {PY_OVER_FLOOR_TARGET:.2f}x of the floor in every phase "
                        f"but teardown: " + ("met" if not over else
                                             "NOT met (" + ", ".join(over) + ")"))
        t.caption = caption
        console.print(t)
        out[key] = cell
    return out


def python_vs_c_cells(args) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The N values and recipes of a Python-vs-C run: what was asked, else N in {0, 10} on
    during-boot."""
    ns = int_list(args.ns) if args.ns != ",".join(map(str, DEFAULT_NS)) else (0, 10)
    recipes = recipes_arg(args.recipes) if args.recipes != ",".join(DEFAULT_RECIPES) \
        else ("during-boot",)
    return ns, recipes


def per_ioctl(args) -> int:
    """pyvmm bench --python-vs-c --per-ioctl: the syscalls of each phase, from each side."""
    from .. import hostinfo
    from .. import recipe as rmod
    from ..results import envelope, write_json_atomic
    from . import syscalls
    ns, recipes = python_vs_c_cells(args)
    if args.repeats < 3:
        raise PyvmmError(f"--repeats {args.repeats}: the per-syscall medians need at least 3 "
                         f"boots per driver")
    host = hostinfo.collect()
    if host["kvm_error"]:
        raise PyvmmError(host["kvm_error"])
    cells = []
    out = new_run_dir(args.out, f"{host['hostname']}-{host['kernel']}")
    path = os.path.join(out, "per-ioctl.json")
    doc = envelope("pyvmm.per-ioctl/1", host, status="running", cells=cells)
    try:
        with progress_bar("text", "bar", "count", "elapsed") as prog:
            task = prog.add_task("tracing", total=len(recipes) * len(ns))
            for name in recipes:
                for n in ns:
                    prog.update(task, description=f"tracing {name} N={n}")
                    rec = rmod.parse(rmod.PRESETS.get(name, name), n)
                    cell = syscalls.compare(rec, boots=args.repeats, warmup=args.warmup,
                                            ioev_len=args.ioev_len)
                    cells.append(dict(cell, name=name, n=n))
                    write_json_atomic(path, doc)
                    prog.advance(task)
        doc["status"] = "complete"
    except KeyboardInterrupt:
        doc["status"] = "interrupted"
        write_json_atomic(path, doc)
        raise
    write_json_atomic(path, doc)
    for cell in cells:
        per_ioctl_table(cell)
    console.print(f"wrote {path}", highlight=False)
    return 0


def per_ioctl_table(cell: dict) -> None:
    from .syscalls import align
    res = "" if cell["resolution_ns"] <= 1 else \
        f"; trace clock {cell['trace_clock']} prints whole us"
    t = Grid(title=f"Per syscall: {cell['name']} N={cell['n']}, medians of {cell['boots']} "
                    f"boots per driver (trace clock {cell['trace_clock']}{res})",
             title_justify="left", keys=2, continued="Per syscall")
    for col in ("phase", "syscall", "C us", "Python us", "Python - C us"):
        t.add_column(col, justify="left" if col in ("phase", "syscall") else "right")

    def us(ns):
        return "-" if ns is None else f"{ns / 1e3:.1f}"

    def diff(a, b):
        return "" if a is None or b is None else f"{(b - a) / 1e3:+.1f}"
    tot = {"c": [0.0, 0.0], "py": [0.0, 0.0]}
    for c, p in zip(cell["c"], cell["py"]):
        for k, (cr, pr) in enumerate(align(c["syscalls"], p["syscalls"])):
            a = cr["kernel_ns"] if cr else None
            b = pr["kernel_ns"] if pr else None
            t.add_row(c["phase"] if k == 0 else "", (cr or pr)["name"], us(a), us(b),
                      diff(a, b))
        t.add_row("" if c["syscalls"] or p["syscalls"] else c["phase"],
                  "[italic]user space[/]", us(c["user_ns"]), us(p["user_ns"]),
                  diff(c["user_ns"], p["user_ns"]))
        t.add_row("", f"[bold]phase[/] (page faults {c['page_faults']:g} / "
                      f"{p['page_faults']:g})", us(c["span_ns"]), us(p["span_ns"]),
                  diff(c["span_ns"], p["span_ns"]), end_section=True)
        if c["phase"] != "teardown":
            for side, ph in (("c", c), ("py", p)):
                tot[side][0] += ph["kernel_ns"]
                tot[side][1] += ph["user_ns"]
    t.add_row("[bold]boot[/] (all but teardown)", "in the kernel", us(tot["c"][0]),
              us(tot["py"][0]), diff(tot["c"][0], tot["py"][0]))
    t.add_row("", "in user space", us(tot["c"][1]), us(tot["py"][1]),
              diff(tot["c"][1], tot["py"][1]))
    console.print(t)


def cmd_report(args) -> int:
    doc = load_run(args.run)
    out = args.run if os.path.isdir(args.run) else os.path.dirname(os.path.abspath(args.run))
    if not any(s["result"]["ok"] for s in doc["samples"]):
        from ..results import run_state
        raise PyvmmError(f"{args.run}: no boot of this run succeeded ({len(doc['samples'])} "
                         f"recorded; run status: {run_state(doc)}): nothing to report")
    if any(s.get("driver") == "py" for s in doc["samples"]):
        python_vs_c_table(doc)
    else:
        before = (doc.get("analysis") or {}).get("version")
        report.write_all(console, doc, out)
        found = doc["analysis"]
        if before != found["version"]:
            say(console, f"run.json's analysis written (version {found['version']}; it had "
                f"{'none' if before is None else 'version ' + str(before)})")
    console.print(f"wrote summary.csv and plots in {out}", highlight=False)
    if args.pyperf:
        from .export import to_pyperf
        n = to_pyperf(doc, args.pyperf)
        console.print(f"wrote {n} pyperf benchmarks to {args.pyperf} (try: python -m pyperf "
                      f"stats {args.pyperf})", highlight=False)
    return 0


def add_ptwrite_parser(sub) -> None:
    """`pyvmm bench ptwrite`: its own parser, so the sweep's options are refused there."""
    # listed in `pyvmm --help` under bench's line, not under its internal name
    p = sub.add_parser(BENCH_PTWRITE, prog="pyvmm bench ptwrite",
                       description="shadow-MMU cost of guest page-table writes against data "
                                   "writes, alone and with a second faulting vCPU")
    p.add_argument("--count", type=int, default=2000,
                   help="writes per phase (default %(default)s)")
    p.add_argument("--repeats", type=int, default=5,
                   help="boots per configuration (default %(default)s)")
    p.add_argument("--out", default="results", help="directory for the JSON report")
    p.set_defaults(func=cmd_ptwrite)


def cmd_ptwrite(args) -> int:
    from .. import ptwrite
    repeats = args.repeats
    with progress_bar("text", "bar", "count") as prog:
        task = prog.add_task("ptwrite", total=2 * repeats)
        res = ptwrite.run(args.count, repeats, lambda d, t: prog.update(task, completed=d))
    os.makedirs(args.out, exist_ok=True)
    from ..results import envelope, write_json_atomic
    path = os.path.join(args.out, f"ptwrite-{time.strftime('%Y%m%d-%H%M%S')}.json")
    write_json_atomic(path, envelope("pyvmm.ptwrite/1", None, **res))
    from ..ptwrite.table import ptwrite_table
    t = ptwrite_table(res, f"pyvmm bench ptwrite: {args.count} writes per phase, median of "
                           f"{repeats} boots each")
    console.print(t)
    console.print(f"results in {path}", highlight=False)
    return 0
