"""CLI: `pyvmm trace [options] -- CMD ARGS...` and `pyvmm trace --vmm qemu-microvm[:K]`."""

from __future__ import annotations

import json
import os
import time

from ..analysis.stats import FAIL_ON, fails_on
from ..errors import (EXIT_FOUND, EXIT_INTERRUPTED, EXIT_NOTHING, PyvmmError,
                      TraceUnavailable)
from ..ui import console, err_console, progress, say
from . import report, workloads
from .runs import TraceRun


def add_compare_parser(sub) -> None:
    """`pyvmm compare` when its runs are traces (pyvmm.cli routes it here)."""
    from ..analysis import stats
    c = sub.add_parser("compare", help="traces side by side, figure by figure")
    c.add_argument("runs", nargs="+", metavar="TRACE",
                   help="trace directories or trace.json files; the first is the baseline")
    c.add_argument("--out", default=None, help="(unused for traces)")
    c.add_argument("--min-change", type=float, default=stats.CHANGE_MIN * 100, metavar="PCT")
    c.set_defaults(func=_cmd_compare)


def _cmd_compare(args) -> int:
    from .compare import cmd_compare
    return cmd_compare(args)


def add_parsers(sub) -> None:
    t = sub.add_parser(
        "trace", help="trace any VMM's KVM ioctls at start-up and what each one waited "
                      "for in the kernel (tracefs, root): pyvmm trace -- CMD ARGS...")
    t.add_argument("command", nargs="*", metavar="CMD",
                   help="the command to trace, after --, e.g. -- qemu-system-x86_64 ...")
    t.add_argument("--vmm", metavar="NAME[:K]", default=None,
                   help="a named workload instead of a command: "
                        + "; ".join(f"{k}: {v}" for k, v in workloads.WORKLOADS.items()))
    t.add_argument("--qemu", default=None, metavar="PATH",
                   help="the QEMU for --vmm qemu-microvm: a binary (default: "
                        "qemu-system-x86_64 on PATH) or a launcher directory of another "
                        "suite's QEMU with its own libraries (pyvmm lab qemu debian:trixie "
                        "prints one)")
    t.add_argument("--repeat", type=int, default=1, metavar="K",
                   help="trace K start-ups; medians and spread over them (default 1)")
    t.add_argument("--overhead", action="store_true",
                   help="also run K untraced start-ups, interleaved A/B, and report what "
                        "tracing costs")
    t.add_argument("--port", default=None, metavar="PORT",
                   help="an I/O port whose first guest write is a milestone (e.g. 0x80; "
                        "--vmm qemu-microvm uses 0x80)")
    t.add_argument("--timeout", type=float, default=120.0, metavar="S",
                   help="kill the command after this many seconds (default %(default)g)")
    t.add_argument("--all", action="store_true", help="list every KVM ioctl")
    t.add_argument("--strace", action="store_true",
                   help="use strace -f -T instead of tracefs (no sleeps or stacks; slows "
                        "the start-up several times): what is used when tracefs cannot be")
    t.add_argument("--no-args", action="store_true",
                   help="no uprobe on the C library's ioctl(): ioctls are named but their "
                        "arguments are not decoded (the uprobe's trap is most of what "
                        "tracing costs a start-up; see docs/trace.md)")
    t.add_argument("--timers", action="store_true",
                   help="also record the timer wheel and the workqueue, machine-wide: for "
                        "each long SRCU wait, when the grace period's work was queued, for "
                        "which jiffy, and when it ran (why the wait lasted what it did)")
    t.add_argument("--no-stacks", action="store_true",
                   help="no kernel stack on sleeps: what an ioctl waited in is unknown")
    t.add_argument("--out", default="results", help="parent directory for results")
    t.add_argument("--json", action="store_true",
                   help="print trace.json on stdout (tables and progress on stderr); its "
                        "\"analysis\" holds the verdict, the regressions and their cost")
    t.add_argument("--fail-on", choices=FAIL_ON, default=None,
                   help=f"exit {EXIT_FOUND} when the start-up shows this: sync-on-register "
                        "(registrations waited), stall (a later ioctl waited behind them), "
                        "any (either)")
    t.set_defaults(func=cmd_trace)


def _port(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        v = int(text, 0)
    except ValueError:
        raise PyvmmError(f"--port {text}: give a port number, e.g. 0x80 or 128") from None
    if not 0 <= v <= 0xFFFF:
        raise PyvmmError(f"--port {text}: an I/O port is 0 to 0xffff")
    return v


def cmd_trace(args) -> int:
    port = _port(args.port)
    if args.repeat < 1:
        raise PyvmmError(f"--repeat {args.repeat}: give at least 1")
    if args.timeout <= 0:
        raise PyvmmError(f"--timeout {args.timeout:g}: give a positive number of seconds")
    if args.vmm and args.command:
        raise PyvmmError("give either --vmm NAME or a command after --, not both")
    workload = ok = libc = None
    captures = False
    if args.vmm:
        w = workloads.parse(args.vmm, args.qemu)
        argv, ok, workload, captures = w.argv, w.ok_status, w.spec, w.captures_json
        libc = w.libc
        port = w.port if port is None else port
    elif args.command:
        argv = list(args.command)
    else:
        raise PyvmmError("nothing to trace: give a command after -- (pyvmm trace -- "
                         "qemu-system-x86_64 ...) or --vmm qemu-microvm[:K]")
    from .probesite import executable
    if executable(argv[0]) is None:     # before anything is printed or created
        raise PyvmmError(f"{argv[0]}: not found or not an executable (give a path, or a "
                         "command on PATH)")
    con = err_console if args.json else console
    use_strace = args.strace
    if not use_strace:
        problem = _tracefs_problem()
        if problem:
            say(con, f"[yellow]pyvmm trace: {problem}; falling back to strace -f -T "
                "(per-ioctl times, no sleeps or stacks, a slower start-up)[/]", markup=True)
            use_strace = True
    tr = TraceRun(argv, args.out, args.repeat, port, args.timeout, args.overhead, workload,
                  ok, use_strace=use_strace, captures_json=captures,
                  arguments=not args.no_args, stacks=not args.no_stacks,
                  timers=args.timers, libc=libc)
    total = args.repeat * (2 if args.overhead else 1)
    say(con, f"pyvmm trace: {workload or ' '.join(argv)}, {args.repeat} traced start-up(s)"
        + (", with as many untraced (A/B)" if args.overhead else "") + f" -> {tr.dir}")
    t0 = time.monotonic()
    interrupted = False
    with progress("text", "bar", "count", "elapsed", con=con) as prog:
        task = prog.add_task("tracing", total=total)
        try:
            doc = tr.run(lambda d, n: prog.update(task, completed=d))
        except TraceUnavailable as e:
            raise PyvmmError(f"{e}; or trace with --strace") from None
        except KeyboardInterrupt:
            interrupted = True
            doc = tr.doc
    report.render(con, doc, args.all)
    say(con, f"trace wall time {time.monotonic() - t0:.1f} s; "
        f"{os.path.join(tr.dir, 'trace.json')}")
    if args.json:
        print(json.dumps(doc, indent=1))
    if interrupted:
        return EXIT_INTERRUPTED
    if not doc["runs"]:
        return EXIT_NOTHING
    found = (doc.get("analysis") or {}).get("regressions") or []
    if fails_on(args.fail_on, found):
        say(con, f"--fail-on {args.fail_on}: found {', '.join(found)} (exit {EXIT_FOUND})")
        return EXIT_FOUND
    return 0


def _tracefs_problem() -> str | None:
    """Why tracefs cannot trace here, or None."""
    if os.geteuid() != 0:
        return "tracing with tracefs needs root"
    root = "/sys/kernel/tracing"
    if not os.path.exists(os.path.join(root, "trace")) and \
            not os.path.isdir("/sys/kernel/tracing"):
        return "tracefs is not available (/sys/kernel/tracing is missing)"
    return None
