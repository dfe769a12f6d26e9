"""The lab commands' shared arguments (the sweep's, the emulator's, the lab kernel's)
and how parsed arguments become a SweepConfig and LabOptions: one definition for lab
kernel, matrix, vcpus and remedies."""

from __future__ import annotations

from ...analysis.plan import DEFAULT_NS, DEFAULT_RECIPES, SweepConfig
from ...analysis.stats import FAIL_ON
from ...errors import EXIT_FOUND
from ...ui import int_list, recipes_arg
from ..builds.variant import Variant
from . import kernel_lab
from .options import LabOptions


def emulator_arg(o, default=None) -> None:
    o.add_argument("--emulator", default=default, metavar="debian:SUITE",
                   help="the lab's emulator: this host's QEMU or a Debian suite's with its "
                        "own libraries (pyvmm lab qemu; default %(default)s)")


def sweep_args(o, repeats_default: int, cpus: bool = True) -> None:
    if cpus:
        o.add_argument("--smp", type=int, default=1, choices=[1, 2, 4],
                       help="emulated CPUs (default 1; 2 share one TCG thread unless "
                            "--mttcg; 4 with --mttcg only)")
        o.add_argument("--mttcg", action="store_true",
                       help="multi-threaded TCG: a host thread per emulated CPU, so a grace "
                            "period's work can run beside the registering thread (with "
                            "--emulator debian:trixie or sid; recorded with the results)")
        emulator_arg(o)
    o.add_argument("--ns", default=",".join(map(str, DEFAULT_NS)),
                   help="registration counts to sweep (default %(default)s)")
    o.add_argument("--recipes", default=",".join(DEFAULT_RECIPES),
                   help="preset names separated by ',' (before-vcpu, during-boot, "
                        "after-vcpu) or recipe templates separated by ';' "
                        "(default %(default)s)")
    o.add_argument("--repeats", type=int, default=repeats_default,
                   help="boots per cell (default %(default)s)")
    o.add_argument("--warmup", type=int, default=kernel_lab.LAB_WARMUP,
                   help="boots run first and discarded (default %(default)s)")
    o.add_argument("--seed", type=int, default=None,
                   help="seed of the interleaved boot order (default: random, recorded)")
    o.add_argument("--ioev-len", type=int, default=4, choices=[0, 1, 2, 4, 8],
                   help="length of each MMIO ioeventfd; 0 registers it on the FAST_MMIO "
                        "bus too (default 4)")
    o.add_argument("--control-n", type=int, default=32,
                   help="N of the control recipe the verdict reads (assign, EEXIST, "
                        "deassign; 0: no verdict; default %(default)s)")
    if cpus:
        o.add_argument("--fail-on", choices=FAIL_ON, default=None,
                       help=f"exit {EXIT_FOUND} when the lab kernel (any variant) shows "
                            "this: sync-on-register, stall (the fix's follow-up) or any")
    o.add_argument("--out", default="results", help="parent directory for results")
    o.add_argument("--timeout", type=float, default=1800.0, metavar="S",
                   help="kill QEMU after this many seconds in all (default %(default)s)")
    o.add_argument("--stall-timeout", type=float, default=90.0, metavar="S",
                   help="kill QEMU when the sweep prints nothing for this long")
    o.add_argument("--retries", type=int, default=1,
                   help="boot again this many times after a hang (each retry is reported)")
    o.add_argument("--no-install", action="store_true",
                   help="fail instead of installing qemu-system-x86 / busybox-static")
    arch_arg(o)
    cmdline_arg(o)


def arch_arg(o) -> None:
    o.add_argument("--arch", default="x86_64", metavar="ARCH",
                   help="the lab's architecture: x86_64 (default) or arm64 (Debian's arm64 "
                        "kernels under qemu-system-aarch64, KVM built in; also as a variant "
                        "prefix, e.g. arm64:6.1)")


def qemu_arg(o) -> None:
    o.add_argument("--qemu", default=None, metavar="debian:SUITE",
                   help="the QEMU a trace job runs in the lab kernel: this host's (default) "
                        "or a Debian suite's, with its own libraries (debian:trixie, "
                        "debian:sid)")


def cmdline_arg(o) -> None:
    o.add_argument("--cmdline", default="", metavar="ARGS",
                   help="kernel parameters for the lab kernel (every variant), e.g. "
                        "srcutree.srcu_max_nodelay_phase=0; recorded with the results")


BUILD_HELP = ("; KERNEL@hzN builds the whole kernel from Debian's source of that version "
              "with the lab's config at N Hz (100, 250, 300, 1000), KVM built in")


def sweep_config(args) -> SweepConfig:
    return SweepConfig(ns=int_list(args.ns), recipes=recipes_arg(args.recipes),
                       repeats=args.repeats, warmup=args.warmup, seed=args.seed,
                       ioev_len=args.ioev_len, control_n=args.control_n)


def lab_options(args, variant: Variant, **kw) -> LabOptions:
    """LabOptions from the parsed arguments; `kw` sets or overrides fields."""
    fields = dict(variant=variant, smp=getattr(args, "smp", 1), out=args.out,
                  mttcg=getattr(args, "mttcg", False), emulator=getattr(args, "emulator", None),
                  retries=max(0, args.retries), total_timeout_s=args.timeout,
                  stall_timeout_s=args.stall_timeout, install=not args.no_install,
                  cmdline=args.cmdline)
    fields.update(kw)
    return LabOptions(**fields)
