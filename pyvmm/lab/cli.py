"""CLI: `pyvmm lab oldkernel` and `pyvmm kernel-check`."""

from __future__ import annotations

import json
import os
import time

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn,
                           TextColumn, TimeElapsedColumn)

from ..bench import report
from ..bench.cli import _int_list, _recipes_arg, console
from ..bench.sweep import DEFAULT_NS, DEFAULT_RECIPES, SweepConfig
from . import kcheck, oldkernel


def add_parsers(sub) -> None:
    lab = sub.add_parser("lab", help="labs that need more than this host (e.g. an older kernel)")
    labs = lab.add_subparsers(dest="lab", required=True)
    o = labs.add_parser(
        "oldkernel", help="run the registration sweep on a Debian 6.1 or 6.12 kernel under "
                          "QEMU (TCG, emulated SVM) and show the same table and verdict")
    o.add_argument("--kernel", default="6.1",
                   help="kernel series from Debian (6.1, 6.12) or a linux-image .deb path "
                        "(default %(default)s)")
    o.add_argument("--smp", type=int, default=1, choices=[1, 2],
                   help="emulated CPUs (2 uses single-threaded TCG; default 1)")
    o.add_argument("--ns", default=",".join(map(str, DEFAULT_NS)),
                   help="registration counts to sweep (default %(default)s)")
    o.add_argument("--recipes", default=",".join(DEFAULT_RECIPES),
                   help="preset names or recipe templates (default %(default)s)")
    o.add_argument("--repeats", type=int, default=oldkernel.LAB_REPEATS)
    o.add_argument("--warmup", type=int, default=oldkernel.LAB_WARMUP)
    o.add_argument("--seed", type=int, default=None)
    o.add_argument("--ioev-len", type=int, default=4, choices=[0, 1, 2, 4, 8])
    o.add_argument("--control-n", type=int, default=32,
                   help="N for the EEXIST/deassign control recipe (0: skip the verdict)")
    o.add_argument("--out", default="results", help="parent directory for results")
    o.add_argument("--timeout", type=float, default=1800.0, metavar="S",
                   help="kill QEMU after this many seconds in all (default %(default)s)")
    o.add_argument("--stall-timeout", type=float, default=90.0, metavar="S",
                   help="kill QEMU when the sweep prints nothing for this long")
    o.add_argument("--retries", type=int, default=1,
                   help="boot again this many times after a hang (each retry is reported)")
    o.add_argument("--no-install", action="store_true",
                   help="fail instead of installing qemu-system-x86 / busybox-static")
    o.set_defaults(func=cmd_oldkernel)

    k = sub.add_parser("kernel-check",
                       help="does kvm_io_bus_register_dev in this kvm.ko wait for a grace "
                            "period? (objdump)")
    k.add_argument("module", help="path of kvm.ko (or kvm.ko.xz) or a vmlinux with symbols")
    k.add_argument("--json", action="store_true")
    k.set_defaults(func=cmd_kernel_check)


class RichUi(oldkernel.Ui):
    def __init__(self, prog: Progress):
        self.prog = prog
        self.task = prog.add_task("starting", total=None)
        self.t_stage = time.monotonic()

    def log(self, msg: str) -> None:
        self.prog.console.print(msg, highlight=False)

    def stage(self, name: str, total: int | None = None) -> None:
        self.prog.reset(self.task, total=total, description=name)

    def boot(self, done: int, total: int, label: str) -> None:
        self.prog.update(self.task, completed=done, total=total,
                         description=f"sweep: {label.split('/', 1)[1]}")


def cmd_oldkernel(args) -> int:
    cfg = SweepConfig(ns=_int_list(args.ns), recipes=_recipes_arg(args.recipes),
                      repeats=args.repeats, warmup=args.warmup, seed=args.seed,
                      ioev_len=args.ioev_len, control_n=args.control_n)
    opts = oldkernel.LabOptions(kernel=args.kernel, smp=args.smp, out=args.out,
                                retries=max(0, args.retries), total_timeout_s=args.timeout,
                                stall_timeout_s=args.stall_timeout,
                                install=not args.no_install)
    boots = len(oldkernel.make_plan(cfg)) - cfg.warmup
    console.print(f"pyvmm lab oldkernel: kernel {args.kernel}, {boots} boots "
                  f"({boots // cfg.repeats} cells x {cfg.repeats} repeats, interleaved, seed "
                  f"{cfg.seed}, {cfg.warmup} warm-up boots discarded), QEMU TCG -smp {args.smp}",
                  highlight=False)
    t0 = time.monotonic()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                  transient=True) as prog:
        run = oldkernel.run_lab(opts, cfg, RichUi(prog))
    doc, out = run.doc, run.out_dir
    report.write_all(console, doc, out)
    t = run.timings
    console.print(f"lab wall time {time.monotonic() - t0:.1f} s (download {t['download_s']:.1f} "
                  f"s, unpack+initramfs {t['build_s']:.1f} s, QEMU {t['qemu_s']:.1f} s); "
                  f"{len(doc['samples'])} boots in {os.path.join(out, 'run.json')}",
                  highlight=False)
    retries = [a for a in doc["lab"]["attempts"] if not a["ok"]]
    if retries:
        console.print(f"[yellow]{len(retries)} attempt(s) hung and were retried[/]")
    kc = doc["kernel_check"]
    return 0 if kc.get("agrees", True) and not doc["failures"] else 1


def cmd_kernel_check(args) -> int:
    res = kcheck.check(args.module)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        console.print(f"{res['path']}: {res['summary']}", highlight=False)
        console.print(f"  {kcheck.FUNCTION} calls: {', '.join(res['calls']) or 'nothing'}",
                      highlight=False)
    return 0
