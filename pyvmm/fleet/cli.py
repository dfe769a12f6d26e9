"""CLI: `pyvmm fleet run -i INVENTORY JOB...` and `pyvmm fleet clean -i INVENTORY`."""

from __future__ import annotations

import json
import os
import time

from ..analysis.stats import FAIL_ON
from ..errors import EXIT_FAILED, EXIT_FOUND, EXIT_INTERRUPTED, PyvmmError
from ..ui import console, err_console, say
from . import jobs
from .run import FleetOptions, FleetRun, clean


def add_parsers(sub) -> None:
    f = sub.add_parser("fleet", help="the same jobs on many hosts through Ansible (your "
                                     "inventory, SSH keys and config), merged into one table")
    fs = f.add_subparsers(dest="fleet", required=True, metavar="ACTION")
    r = fs.add_parser("run", help="install pyvmm on each host (once per build), run the jobs, "
                                  "fetch what they wrote, one row per host")
    r.add_argument("jobs", nargs="*", metavar="JOB",
                   help="info, bench (a short verdict sweep; --bench-args for others), "
                        "trace:qemu-microvm[:K] (QEMU's start-up with K virtio devices; a "
                        "host without QEMU says so), check:NAME (ioeventfd-ordering, "
                        "memslot-coherence, guest-memfd, all); info always runs first")
    r.add_argument("-i", "--inventory", default=None, metavar="INVENTORY",
                   help="anything Ansible reads: INI, YAML, a directory, a dynamic "
                        "inventory script")
    r.add_argument("--limit", default=None, metavar="PATTERN",
                   help="only the hosts matching this Ansible pattern")
    r.add_argument("--forks", type=int, default=5,
                   help="hosts worked on at once (default %(default)s)")
    r.add_argument("--out", default="results",
                   help="parent directory of results/fleet-<time>/ (default %(default)s)")
    r.add_argument("--bench-args", default="", metavar="ARGS",
                   help="options of pyvmm bench for the bench job, in one string (default "
                        f"'{' '.join(jobs.BENCH_DEFAULT)}')")
    r.add_argument("--trace-repeats", type=int, default=3, metavar="R",
                   help="start-ups traced per host by a trace job (default %(default)s)")
    r.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="longest a job may run on a host (default: 900 s for bench and "
                        "check, 600 for trace)")
    r.add_argument("--reinstall", action="store_true",
                   help="install pyvmm again even where this build is installed")
    r.add_argument("--become", action="store_true",
                   help="use Ansible's become (sudo) on the hosts; off unless asked")
    r.add_argument("--retry", default=None, metavar="RUNDIR",
                   help="run again only the hosts of this fleet run that did not finish, "
                        "into the same directory")
    r.add_argument("--fail-on", choices=FAIL_ON, default=None,
                   help=f"exit {EXIT_FOUND} when any host's bench shows this")
    r.add_argument("--json", action="store_true",
                   help="print fleet.json on stdout (tables and progress on stderr)")
    r.set_defaults(func=cmd_run)

    c = fs.add_parser("clean", help="stop anything pyvmm runs on the hosts and remove its "
                                    "installs")
    c.add_argument("-i", "--inventory", required=True, metavar="INVENTORY",
                   help="the inventory whose hosts to clean")
    c.add_argument("--limit", default=None, metavar="PATTERN",
                   help="only the hosts matching this Ansible pattern")
    c.add_argument("--become", action="store_true", help="use Ansible's become (sudo)")
    c.set_defaults(func=cmd_clean)


def add_compare_parser(sub) -> None:
    """`pyvmm compare` when its runs are fleet runs (pyvmm.cli routes it here)."""
    from ..analysis import stats
    c = sub.add_parser("compare", help="two fleet runs host by host and kernel by kernel")
    c.add_argument("runs", nargs="+", metavar="FLEET",
                   help="fleet run directories (or their fleet.json): before, then after")
    c.add_argument("--out", default=None, help="(unused for fleet runs)")
    c.add_argument("--min-change", type=float, default=stats.CHANGE_MIN * 100, metavar="PCT",
                   help="smallest difference of medians called a change, with p < 0.01 "
                        "(default %(default)g%%)")
    c.set_defaults(func=_cmd_compare)


def _cmd_compare(args) -> int:
    from .compare import cmd_compare
    return cmd_compare(args)


def cmd_run(args) -> int:
    con = err_console if args.json else console
    if args.forks < 1:
        raise PyvmmError(f"--forks {args.forks}: give at least 1")
    if args.trace_repeats < 1:
        raise PyvmmError(f"--trace-repeats {args.trace_repeats}: give at least 1")
    if args.retry:
        if args.jobs:
            raise PyvmmError("--retry runs the jobs of the earlier run: give no JOB")
        job_list = []
    else:
        if not args.inventory:
            raise PyvmmError("give the inventory: pyvmm fleet run -i INVENTORY JOB...")
        job_list = jobs.parse(args.jobs, args.bench_args, args.timeout, args.trace_repeats)
    opts = FleetOptions(inventory=args.inventory, jobs=job_list, limit=args.limit,
                        forks=args.forks, out=args.out, reinstall=args.reinstall,
                        become=args.become, retry=args.retry, specs=list(args.jobs),
                        bench_args=args.bench_args)
    t0 = time.monotonic()

    def line(msg: str) -> None:
        say(con, msg)
    interrupted = False
    try:
        doc, out = FleetRun(opts, line).run()
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        if interrupted:
            say(con, "[yellow]interrupted: fleet.json keeps what was fetched; pyvmm fleet "
                     "run --retry DIR runs the rest[/]", markup=True)
    from .rows import plot, table
    con.print(table(doc))
    paths = plot(doc, out)
    n_ok = sum(1 for r in doc["rows"] if r["status"] in ("ok", "no QEMU"))
    say(con, f"fleet wall time {time.monotonic() - t0:.1f} s; {n_ok} of {len(doc['rows'])} "
        f"host(s) finished; {os.path.join(out, 'fleet.json')}"
        + (f", plot {paths[0]}" if paths else ""))
    if args.json:
        print(json.dumps(doc, indent=1))
    if doc["status"] == "interrupted":
        return EXIT_INTERRUPTED
    if n_ok < len(doc["rows"]):
        return EXIT_FAILED
    from ..analysis.stats import fails_on
    hits = [r["host"] for r in doc["rows"] if fails_on(args.fail_on, r.get("regressions") or [])]
    if hits:
        say(con, f"--fail-on {args.fail_on}: found on {', '.join(hits)} (exit {EXIT_FOUND})")
        return EXIT_FOUND
    return 0


def cmd_clean(args) -> int:
    res = clean(args.inventory, args.limit, args.become, lambda m: say(console, m))
    for r in res:
        what = r["status"] + (f": {r['path']}" if r.get("path") else "") + (
            f" ({r['bytes'] / 2**20:.1f} MiB)" if r.get("bytes") else "") + (
            f" ({r['reason']})" if r.get("reason") and r["status"] not in
            ("removed", "nothing installed") else "")
        say(console, f"{r['host']}: {what}")
    return 0 if all(r["status"] in ("removed", "nothing installed") for r in res) else \
        EXIT_FAILED
