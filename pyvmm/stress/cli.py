"""CLI: `pyvmm stress`."""

from __future__ import annotations

import datetime as _dt
import json
import os
import sys

from ..tables import Grid

from ..ui import console, fmt_ns, progress
from ..results import envelope, write_json_atomic
from . import EXPECTED_OPS, Stress, StressConfig

SCHEMA = "pyvmm.stress/1"
XEN_SCHEMA = "pyvmm.stress-xen/1"


def add_parsers(sub) -> None:
    s = sub.add_parser("stress", help="concurrent ioctls on one VM with a hang watchdog")
    s.add_argument("--duration", type=float, default=10.0, metavar="S",
                   help="how long the workers run (default %(default)g s)")
    s.add_argument("--seed", type=int, default=1,
                   help="same seed, same operation sequence per worker (default 1)")
    s.add_argument("--vcpus", type=int, default=2, help="vCPU threads running the guest")
    s.add_argument("--extra-vcpus", type=int, default=6,
                   help="vCPUs created while the others run (default 6)")
    s.add_argument("--bound", type=float, default=10.0, metavar="S",
                   help="report an ioctl that has not returned after this long (default 10)")
    s.add_argument("--out", default="results", help="directory for the JSON report")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.add_argument("--xen", action="store_true",
                   help="the Xen event-channel seed instead: a vCPU sending event channels "
                        "while workers invalidate shared_info and set the MSR filter "
                        "(needs KVM_CAP_XEN_HVM; in the lab: pyvmm lab run --kvm-patch xen "
                        "xen:30)")
    s.set_defaults(func=cmd_stress)


def print_hang(report: dict) -> None:
    """Each stuck thread with what the kernel says it is doing."""
    for s in report["stuck"]:
        k = s["kernel"]
        console.print(f"[bold red]HANG[/]: thread {s['thread']} (tid {s['tid']}) has been "
                      f"in {s['operation']} ({s['arguments']}) for {s['elapsed_s']} s; "
                      f"kernel: state {k.get('state', '?')}, wchan {k.get('wchan')}",
                      highlight=False)
        if not k.get("stack", "").startswith("unreadable"):
            console.print("  stack:\n    " + k["stack"].replace("\n", "\n    "),
                          highlight=False)


def cmd_stress_xen(args) -> int:
    from .xen import XenStressConfig, run
    cfg = XenStressConfig(duration_s=args.duration, seed=args.seed, bound_s=args.bound)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"stress-xen-{_dt.datetime.now():%Y%m%d-%H%M%S}.json")

    def on_hang(report):
        write_json_atomic(path, envelope(XEN_SCHEMA, None, status="hang",
                                         config=cfg.__dict__, hang=report))
    res = run(cfg, on_hang)
    doc = envelope(XEN_SCHEMA, None,
                   status="skipped" if res.skipped else ("hang" if res.hang else "ok"),
                   **res.to_dict())
    write_json_atomic(path, doc)
    if args.json:
        print(json.dumps(doc, indent=2))
    elif res.skipped:
        console.print(f"Xen HVM event channels: skipped: {res.skipped}", highlight=False)
    else:
        console.print(f"xen stress: {res.elapsed_s:.1f} s, {res.sends} EVTCHNOP_send, "
                      f"{res.invalidations} shared_info invalidations, {res.filter_calls} "
                      "KVM_X86_SET_MSR_FILTER calls", highlight=False)
    if res.hang:
        if not args.json:
            print_hang(res.hang)
            console.print(f"report written to {path}", highlight=False)
        console.file.flush()
        sys.stdout.flush()
        os._exit(3)     # the stuck threads cannot be joined
    if not args.json and not res.skipped:
        console.print(f"no hang (bound {cfg.bound_s:g} s); report in {path}", highlight=False)
    return 0


def cmd_stress(args) -> int:
    if args.xen:
        return cmd_stress_xen(args)
    cfg = StressConfig(duration_s=args.duration, seed=args.seed, vcpus=args.vcpus,
                       extra_vcpus=args.extra_vcpus, bound_s=args.bound)
    os.makedirs(args.out, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(args.out, f"stress-{stamp}.json")

    def on_hang(report):
        # Written from the watchdog thread at once: the stuck threads may never return.
        write_json_atomic(path, envelope(SCHEMA, None, status="hang", config=cfg.__dict__,
                                         hang=report))

    stress = Stress(cfg, on_hang)
    with progress("text", "bar", "elapsed") as prog:
        task = prog.add_task("stress", total=cfg.duration_s)
        res = stress.run(lambda done, total: prog.update(task, completed=done))
    doc = envelope(SCHEMA, None, status="hang" if res.hang else "ok", **res.to_dict())
    write_json_atomic(path, doc)
    if args.json:
        print(json.dumps(doc, indent=2))
    proc = res.process
    if not args.json and proc.get("start") and proc.get("end"):
        a, b = proc["start"], proc["end"]
        console.print(f"process: open fds {a['open_fds']} -> {b['open_fds']}, RSS "
                      f"{a['rss_kib'] / 1024:.1f} -> {b['rss_kib'] / 1024:.1f} MiB (peak "
                      f"{b['rss_peak_kib'] / 1024:.1f} MiB), threads {a['threads']} -> "
                      f"{b['threads']}", highlight=False)
    if res.hang:
        print_hang(res.hang)
        console.print(f"report written to {path}", highlight=False)
        console.file.flush()
        os._exit(3)     # the stuck threads cannot be joined
    if not args.json:
        t = Grid(title=f"pyvmm stress: {res.elapsed_s:.1f} s, seed {cfg.seed}, "
                        f"{cfg.vcpus} running vCPUs", title_justify="left")
        for col in ("operation", "count", "ops/s", "p50", "p99", "max", "errors"):
            t.add_column(col, justify="left" if col in ("operation", "errors") else "right")
        for name, o in res.ops.items():
            errs = ", ".join(f"{k} x{v}" for k, v in o["errors"].items()) or "-"
            t.add_row(name, str(o["count"]), f"{o['per_s']:.0f}", fmt_ns(o["p50_ns"]),
                      fmt_ns(o["p99_ns"]), fmt_ns(o["max_ns"]), errs)
        console.print(t)
        exits = ", ".join(f"{k} {v}" for k, v in sorted(res.guest_exits.items()))
        console.print(f"guest exits seen by the vCPU threads: {exits}", highlight=False)
        for line in res.skipped:
            console.print(line, highlight=False)
        missing = [op for op in EXPECTED_OPS if op not in res.ops]
        if missing:
            console.print(f"[yellow]operations that never ran: {', '.join(missing)}[/]")
        console.print(f"no hang (bound {cfg.bound_s:g} s); report in {path}", highlight=False)
    return 0
