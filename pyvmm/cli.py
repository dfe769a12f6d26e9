"""pyvmm command line: info, boot, bench (and bench ptwrite), report, compare, lab,\nkernel-check, check, stress, trace, fleet."""

from __future__ import annotations

import argparse
import os
import sys

from .vmm import guests, layout
from .errors import NO_SPACE, PyvmmError, disk_full

# Tables fit the terminal (or $COLUMNS); written to a file or a pipe they stay wide.
from .ui import BENCH_PTWRITE, console, err_console  # the one console every command uses

# Commands defined by each room's cli module (add_parsers). A command line names one, so
# only that room is imported: `pyvmm boot` loads what booting needs and no more (no
# rich, matplotlib or numpy). Help and unknown commands build the whole parser.
ROOMS = {"bench": "bench", "report": "bench", "compare": "bench", BENCH_PTWRITE: "bench",
         "lab": "lab", "kernel-check": "lab", "check": "checks", "stress": "stress",
         "trace": "trace", "fleet": "fleet"}


def _fail(msg: str, code: int = 2) -> int:
    if "rich" in sys.modules:
        err_console.print(f"[bold red]pyvmm: error:[/] {msg}", highlight=False,
                          soft_wrap=True)
    else:       # a command that drew nothing with rich does not load it to fail
        print(f"pyvmm: error: {msg}", file=sys.stderr)
    return code


def _ms(ns: float) -> str:
    return f"{ns / 1e6:.3f}"


# --- info ---------------------------------------------------------------------------------
def cmd_info(args) -> int:
    import json

    from .tables import Grid
    from . import hostinfo
    info = hostinfo.collect(args.kvm)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0 if info["kvm_error"] is None else 2
    t = Grid(title="pyvmm info", show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value")
    hz = info["config_hz"]
    rows = [
        ("host", info["hostname"]),
        ("kernel", info["kernel"]),
        ("CONFIG_HZ", f"{hz} (from {info['config_source']})" if hz else "unknown"),
        ("preemption", info["preemption"]),
        ("CPU", f"{info['cpu_model']} x {info['cpus']}"),
        ("KVM backend", info["backend"]),
        ("KVM API version", str(info["kvm_api_version"] or "-")),
        ("RLIMIT_NOFILE", f"soft {info['rlimit_nofile']['soft']}, "
                          f"hard {info['rlimit_nofile']['hard']}"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
    if info["kvm_error"]:
        return _fail(info["kvm_error"])
    c = Grid(title="KVM capabilities (asked on a VM fd)")
    c.add_column("capability")
    c.add_column("value", justify="right")
    for name, value in info["caps"].items():
        if name == "guest_memfd flags":
            text = hostinfo.guest_memfd_flags_text(value)
        elif name in ("nr memslots", "nr vcpus (recommended)", "max vcpus"):
            text = str(value)
        else:
            text = "yes" if value else "no"
        c.add_row(name, text)
    console.print(c)
    return 0


# --- boot ---------------------------------------------------------------------------------
PHASE_LABELS = {"vm": "create VM", "mem": "memory", "ioev": "ioeventfds", "vcpu": "vCPUs",
                "run": "run", "memslot": "memslot change", "eexist": "EEXIST controls",
                "deassign": "deassign", "teardown": "teardown", "gic": "GICv3"}


def phase_label(p: dict) -> str:
    label = PHASE_LABELS.get(p["op"], p["op"])
    if p["op"] == "run":
        end = p.get("end_marker", 0)
        return "run to HLT" if end == 0 else f"run to '{layout.MARKER_NAMES.get(end, end)}'"
    if p["op"] in ("ioev", "vcpu", "eexist", "deassign", "memslot"):
        label += f" ({p['count']})"
    return label


def cmd_boot(args) -> int:
    from . import recipe as rmod
    from .drivers import runner as pyrunner

    g = guests.info(args.guest)
    if args.recipe:
        text = args.recipe
    else:
        text = f"vm,mem,ioev:{args.ioeventfds},vcpu:{args.vcpus},run"
        if args.ioeventfds == 0:
            text = f"vm,mem,vcpu:{args.vcpus},run"
    rec = rmod.parse(text)
    if rec.registrations and g.name != "doorbell":
        console.print(f"note: guest '{g.name}' does not ring doorbells; the ioeventfds are "
                      f"registered but stay silent")
    boot = pyrunner.PyBoot(rec, guest=g.name, ioev_len=args.ioev_len,
                           timeout=args.timeout or None, pin_cpu=args.pin, stats=args.stats,
                           memory=args.memory)
    try:
        res = boot.run()
    except PyvmmError as e:
        if boot.serial:
            print(f"guest serial output so far: {boot.serial.decode(errors='replace')!r}",
                  file=sys.stderr)
        return _fail(str(e))
    doorbell_ok = True
    if g.name == "doorbell":
        doorbell_ok = (res["doorbells_completed"] == res["doorbells_expected"]
                       and res["doorbell_mmio_exits"] == 0)
    if args.json:
        import json
        out = dict(res, guest=g.name, recipe=rec.text, doorbells_ok=doorbell_ok)
        print(json.dumps(out, indent=2))
        return 0 if doorbell_ok else 1
    print(boot_text(g, rec, res, doorbell_ok), end="")
    if res.get("stats"):
        print(stats_text(res["stats"]), end="")
    return 0 if doorbell_ok else 1


def boot_text(g, rec, res: dict, doorbell_ok: bool) -> str:
    """The boot timeline as plain text. Printed without rich: a boot process imports only
    what booting needs (issue #12: whole-process boot against QEMU)."""
    out = []
    if res["serial"]:
        out.append(f"guest serial output: {res['serial'].rstrip()}")
    rows = [(phase_label(p), _ms(p["wall_ns"]), _ms(p["cpu_ns"]),
             _ms(max(0, p["wall_ns"] - p["cpu_ns"]))) for p in res["phases"]]
    rows.append(("boot (all but teardown)", _ms(res["boot_wall_ns"]), _ms(res["boot_cpu_ns"]),
                 _ms(max(0, res["boot_wall_ns"] - res["boot_cpu_ns"]))))
    out.append(f"boot timeline: guest {g.name} ({g.mode} mode), recipe {rec.text}")
    out += _columns(("phase", "wall ms", "CPU ms", "blocked ms"), rows)
    mmio = res["doorbell_mmio_exits"] + res["other_mmio_exits"]
    other = res["exits"] - res["io_exits"] - mmio
    rest = ""
    if other:
        rest = f", {other} {'HLT' if res.get('halted') and other == 1 else 'other'}"
    out.append(f"vCPU thread's CPU at the first and the last exit: {res['cpu_start']} -> "
               f"{res['cpu_end']}"
               + (f" (pinned to {res['pinned_cpu']})" if res["pinned_cpu"] >= 0 else ""))
    td = next((p for p in res["phases"] if p["op"] == "teardown"), None)
    if td and rec.registrations and td["wall_ns"] - td["cpu_ns"] >= 1e6:
        out.append(f"teardown waited {_ms(td['wall_ns'] - td['cpu_ns'])} ms off the CPU: "
                   "destroying the VM waits for the SRCU")
        out.append("  grace period its registrations' deferred bus frees left pending "
                   "(6.18+)")
    out.append(f"exits to userspace: {res['exits']} ({res['io_exits']} port I/O, {mmio} MMIO"
               f"{rest})")
    if g.name == "doorbell":
        verdict = "OK" if doorbell_ok else "MISMATCH"
        out.append(f"doorbells: {res['doorbells_expected']} rung by the guest, "
                   f"{res['doorbells_completed']} counted by their eventfds,")
        out.append(f"  {res['doorbell_mmio_exits']} reached userspace as MMIO exits: {verdict}")
        mapped = any(st.op == "memslot" for st in rec.steps)
        want = layout.BAR_PATTERN if mapped else 0xFFFFFFFF
        why = ("the memslot step mapped the BAR" if mapped else
               "no memslot step: the read exits and the VMM answers all-ones")
        out.append(f"BAR read by the guest: {res['bar_value']:#x} (expected {want:#x}:")
        out.append(f"  {why})")
    return "\n".join(out) + "\n"


def stats_text(stats: dict) -> str:
    from .vmm.kvmstats import interesting
    rows = [(key, name, str(value)) for key, delta in stats.items()
            for name, value in sorted(interesting(delta).items())]
    return "\n".join(["KVM binary stats: change over the boot (KVM_GET_STATS_FD)"]
                     + _columns(("fd", "statistic", "delta"), rows)) + "\n"


def _columns(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """Left-aligned first column, right-aligned others, two spaces apart."""
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(r):
        return "  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in
                                                   zip(r[1:], widths[1:])]).rstrip()
    return [line(header), line(tuple("-" * w for w in widths))] + [line(r) for r in rows]


# --- parser ---------------------------------------------------------------------------------
class _Formatter(argparse.HelpFormatter):
    """argparse's formatter, sized with os.get_terminal_size: argparse makes one for
    every add_argument, and its own sizing imports shutil (a millisecond per process)."""

    def __init__(self, prog, indent_increment=2, max_help_position=24, width=None):
        if width is None:
            try:
                width = int(os.environ["COLUMNS"])
            except (KeyError, ValueError):
                try:
                    width = os.get_terminal_size(sys.stdout.fileno()).columns
                except (OSError, ValueError):
                    width = 80
            width -= 2
        super().__init__(prog, indent_increment, max_help_position, width)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `only`, just the core commands and that room's (see ROOMS)."""
    p = argparse.ArgumentParser(prog="pyvmm", description=__doc__, formatter_class=_Formatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND",
                           title="commands (pyvmm COMMAND --help for each)")

    i = sub.add_parser("info", help="host kernel, KVM backend and capabilities",
                       formatter_class=_Formatter)
    i.add_argument("--json", action="store_true",
                   help="print the host facts as one JSON object")
    i.add_argument("--kvm", default="/dev/kvm", help="KVM device (default /dev/kvm)")
    i.set_defaults(func=cmd_info)

    b = sub.add_parser("boot", help="boot a tiny guest on the Python VMM and show its timeline",
                       formatter_class=_Formatter)
    b.add_argument("--guest", default="doorbell",
                   help=f"guest image: {', '.join(sorted(guests.GUESTS))} (default doorbell)")
    b.add_argument("--ioeventfds", type=_nonneg, default=0, metavar="N",
                   help="MMIO doorbell ioeventfds to register before the vCPU")
    b.add_argument("--vcpus", type=_pos, default=1, metavar="K",
                   help="vCPUs to create (vCPU 0 runs the guest; default 1)")
    b.add_argument("--recipe", help="full recipe instead of --ioeventfds/--vcpus, e.g. "
                                    "vm,mem,ioev:4,vcpu:1,run (docs/methodology.md)")
    b.add_argument("--ioev-len", type=int, default=4, choices=[0, 1, 2, 4, 8],
                   help="length of each MMIO ioeventfd; 0 registers it on the FAST_MMIO "
                        "bus too (default 4)")
    b.add_argument("--timeout", type=float, default=10.0,
                   help="kick the guest out after this many seconds (0: none; default 10)")
    b.add_argument("--pin", type=int, default=None, metavar="CPU",
                   help="pin the vCPU thread to this CPU")
    b.add_argument("--memory", choices=["anon", "gmem"], default="anon",
                   help="back RAM with anonymous memory or a guest_memfd (mmap flags)")
    b.add_argument("--stats", action="store_true",
                   help="show KVM binary stats deltas of the VM and vCPU 0")
    b.add_argument("--json", action="store_true",
                   help="print the boot's result (phases, exits, doorbells) as JSON")
    b.set_defaults(func=cmd_boot)

    rooms = ("bench", "lab", "checks", "stress", "trace", "fleet") if only is None else (only,)
    if "bench" in rooms:
        from .bench import cli as bench_cli
        bench_cli.add_parsers(sub)
        bench_cli.add_ptwrite_parser(sub)
    if "lab" in rooms:
        from .lab import cli as lab_cli
        lab_cli.add_parsers(sub)
        lab_cli.add_kernel_check_parser(sub)       # also top level: pyvmm kernel-check
    if "checks" in rooms:
        from .checks import cli as check_cli
        check_cli.add_parsers(sub)
    if "stress" in rooms:
        from .stress import cli as stress_cli
        stress_cli.add_parsers(sub)
    if "trace" in rooms:
        from .trace import cli as trace_cli
        trace_cli.add_parsers(sub)
    if "fleet" in rooms:
        from .fleet import cli as fleet_cli
        fleet_cli.add_parsers(sub)
    if "fleet-compare" in rooms:     # pyvmm compare on fleet runs
        from .fleet import cli as fleet_cli
        fleet_cli.add_compare_parser(sub)
    if "trace-compare" in rooms:     # pyvmm compare on trace documents
        from .trace import cli as trace_cli
        trace_cli.add_compare_parser(sub)
    return p


def _compares_traces(args: list[str]) -> bool:
    """Whether `pyvmm compare ARGS` names trace documents (its first run is one)."""
    runs = [a for a in args if not a.startswith("-")]
    if not runs:
        return False
    from .trace.compare import is_trace
    return is_trace(runs[0])


def _compares_fleets(args: list[str]) -> bool:
    """Whether `pyvmm compare ARGS` names fleet runs (its first run is one)."""
    runs = [a for a in args if not a.startswith("-")]
    if not runs:
        return False
    from .fleet.compare import is_fleet
    return is_fleet(runs[0])


def _nonneg(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{v} is negative")
    return v


def _pos(text: str) -> int:
    v = _nonneg(text)
    if v == 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return v


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into the same path as Ctrl-C: every command that writes results
    marks them interrupted and keeps what it measured."""


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["bench", "ptwrite"]:           # a workload with its own parser
        argv = [BENCH_PTWRITE] + argv[2:]
    first = argv[0] if argv else None
    if first in ("info", "boot"):
        parser = build_parser(only="")
    elif first == "compare" and _compares_fleets(argv[1:]):
        parser = build_parser(only="fleet-compare")
    elif first == "compare" and _compares_traces(argv[1:]):
        parser = build_parser(only="trace-compare")
    else:
        parser = build_parser(only=ROOMS.get(first))
    args = parser.parse_args(argv)
    import signal
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return args.func(args)
    except PyvmmError as e:
        return _fail(str(e))
    except OSError as e:
        if e.errno not in NO_SPACE:
            raise
        # a full disk anywhere (results, the lab's cache, a build): one line; what was
        # written atomically before is intact, what was half-written is removed
        return _fail(str(disk_full(e.filename or os.getcwd(), None,
                                   "finished results and cache entries are intact")))
    except Terminated:
        return _fail("terminated (SIGTERM); partial results are marked interrupted", 143)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    finally:
        signal.signal(signal.SIGTERM, previous)


def entry() -> None:
    """The `pyvmm` console script. A boot process ends with os._exit once its output is
    flushed: by then it has closed its VM, and interpreter finalization (tearing down
    every module, about 2 ms on the test host, a tenth of the process) would release
    nothing the kernel does not. Every other command exits normally."""
    code = main()
    if sys.argv[1:2] == ["boot"]:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
