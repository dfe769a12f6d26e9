"""The jobs a fleet runs on each host, as pyvmm command lines, checked here before any
host is contacted: `info`, `bench` (a short verdict sweep unless --bench-args says
otherwise), `trace:qemu-microvm[:K]` (QEMU's start-up, where the host has QEMU) and
`check:NAME`. `{OUT}` in a command line is the job's output directory on the host."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

from ..errors import PyvmmError

# A short sweep that gives the verdict and the stall: the control recipe at N=32, and
# N=0 and 1 of the two main recipes; 10 boots per cell (about 2 s on a 6.18 host).
BENCH_DEFAULT = ["--ns", "0,1,32", "--repeats", "10"]
CHECKS = ("ioeventfd-ordering", "memslot-coherence", "guest-memfd", "all")
TIMEOUTS = {"info": 60.0, "bench": 900.0, "trace": 600.0, "check": 900.0}


@dataclass
class Job:
    name: str                   # what the results directory calls it: bench, trace-qemu-microvm-2
    kind: str                   # info | bench | trace | check
    argv: list[str]             # pyvmm's arguments on the host
    timeout_s: float
    needs: str | None = None    # a command the host must have (QEMU), else 'no QEMU'
    spec: str = ""
    extra: dict = field(default_factory=dict)

    def to_vars(self) -> dict:
        """What the playbook's job task reads."""
        return {"name": self.name, "argv": self.argv, "timeout": self.timeout_s,
                "needs": self.needs or ""}


def parse(specs: list[str], bench_args: str = "", timeout_s: float | None = None,
          trace_repeats: int = 3) -> list[Job]:
    """Job specs to Jobs (info first, always: every row needs the host's facts)."""
    if not specs:
        raise PyvmmError("no jobs: give e.g. info bench trace:qemu-microvm check:all")
    out: dict[str, Job] = {}
    extra = _bench_args(bench_args)
    for spec in ["info"] + list(specs):
        name, _, arg = spec.strip().partition(":")
        t = timeout_s
        if name == "info":
            job = Job("info", "info", ["info", "--json"], t or TIMEOUTS["info"])
        elif name == "bench":
            if arg:
                raise PyvmmError(f"job '{spec}': bench takes its options from --bench-args")
            job = Job("bench", "bench", ["bench", *(extra or BENCH_DEFAULT), "--json",
                                         "--no-plot", "--out", "{OUT}"], t or TIMEOUTS["bench"])
        elif name == "trace":
            wl, _, k = arg.partition(":")
            if wl != "qemu-microvm" or (k and not k.isdigit()):
                raise PyvmmError(f"job '{spec}': the fleet traces qemu-microvm[:K] (K "
                                 "virtio-mmio devices), e.g. trace:qemu-microvm:2")
            k = k or "0"
            job = Job(f"trace-qemu-microvm-{k}", "trace",
                      ["trace", "--vmm", f"qemu-microvm:{k}", "--repeat", str(trace_repeats),
                       "--json", "--out", "{OUT}"], t or TIMEOUTS["trace"],
                      needs="qemu-system-x86_64")
        elif name == "check":
            if arg not in CHECKS:
                raise PyvmmError(f"job '{spec}': give check:NAME with NAME one of "
                                 f"{', '.join(CHECKS)}")
            job = Job(f"check-{arg}", "check", ["check", arg, "--json"],
                      t or TIMEOUTS["check"])
        else:
            raise PyvmmError(f"unknown fleet job '{spec}': info, bench, "
                             "trace:qemu-microvm[:K], check:NAME")
        job.spec = spec
        if job.name in out and spec != "info":
            raise PyvmmError(f"job '{spec}' given twice")
        out[job.name] = job
    return list(out.values())


def _bench_args(text: str) -> list[str]:
    """--bench-args, checked with the bench's own parser here, before any host is
    contacted (options that would change where or how results are written are the
    fleet's)."""
    if not text.strip():
        return []
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise PyvmmError(f"--bench-args {text!r}: {e}") from None
    for w in words:
        if re.match(r"--(out|json|no-plot|python-vs-c|per-ioctl|fail-on)\b", w):
            raise PyvmmError(f"--bench-args: {w.split('=')[0]} is set by the fleet; leave it "
                             "out")
    import argparse
    from ..bench import cli as bench_cli
    p = argparse.ArgumentParser(prog="pyvmm bench", add_help=False, exit_on_error=False)
    sub = p.add_subparsers(dest="cmd")
    bench_cli.add_parsers(sub)
    try:
        ns = p.parse_args(["bench", *words])
    except (argparse.ArgumentError, SystemExit) as e:
        raise PyvmmError(f"--bench-args {text!r}: not options of pyvmm bench ({e})") from None
    from ..ui import int_list, recipes_arg
    int_list(ns.ns)
    recipes_arg(ns.recipes)
    return words
