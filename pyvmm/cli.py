"""pyvmm command line: info, boot, bench, report, compare, lab, kernel-check, check."""

from __future__ import annotations

import argparse
import json
import sys

from rich.table import Table

from . import guests, hostinfo, layout
from .errors import PyvmmError

# Tables fit the terminal (or $COLUMNS); written to a file or a pipe they stay wide.
from .ui import console, err_console  # noqa: E402  (the one console every command uses)


def _fail(msg: str, code: int = 2) -> int:
    err_console.print(f"[bold red]pyvmm: error:[/] {msg}", highlight=False, soft_wrap=True)
    return code


def _ms(ns: float) -> str:
    return f"{ns / 1e6:.3f}"


# --- info ---------------------------------------------------------------------------------
def cmd_info(args) -> int:
    info = hostinfo.collect(args.kvm)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0 if info["kvm_error"] is None else 2
    t = Table(title="pyvmm info", show_header=False)
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
    c = Table(title="KVM capabilities (asked on a VM fd)")
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
                "deassign": "deassign", "teardown": "teardown"}


def phase_label(p: dict) -> str:
    label = PHASE_LABELS.get(p["op"], p["op"])
    if p["op"] == "run":
        end = p.get("end_marker", 0)
        return "run to HLT" if end == 0 else f"run to '{layout.MARKER_NAMES.get(end, end)}'"
    if p["op"] in ("ioev", "vcpu", "eexist", "deassign", "memslot"):
        label += f" ({p['count']})"
    return label


def cmd_boot(args) -> int:
    from . import recipe as rmod, runner as pyrunner

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
            err_console.print(f"guest serial output so far: {boot.serial.decode(errors='replace')!r}")
        return _fail(str(e))
    doorbell_ok = True
    if g.name == "doorbell":
        doorbell_ok = (res["doorbells_completed"] == res["doorbells_expected"]
                       and res["doorbell_mmio_exits"] == 0)
    if args.json:
        out = dict(res, guest=g.name, recipe=rec.text, doorbells_ok=doorbell_ok)
        print(json.dumps(out, indent=2))
        return 0 if doorbell_ok else 1
    if res["serial"]:
        console.print(f"[bold]guest serial output:[/] {res['serial'].rstrip()}", highlight=False)
    t = Table(title=f"boot timeline: guest {g.name} ({g.mode} mode), recipe {rec.text}")
    t.add_column("phase")
    t.add_column("wall ms", justify="right")
    t.add_column("CPU ms", justify="right")
    t.add_column("blocked ms", justify="right")
    for p in res["phases"]:
        t.add_row(phase_label(p), _ms(p["wall_ns"]), _ms(p["cpu_ns"]),
                  _ms(max(0, p["wall_ns"] - p["cpu_ns"])))
    t.add_row("[bold]boot (all but teardown)", f"[bold]{_ms(res['boot_wall_ns'])}",
              _ms(res["boot_cpu_ns"]), _ms(max(0, res["boot_wall_ns"] - res["boot_cpu_ns"])))
    console.print(t)
    console.print(f"exits to userspace: {res['exits']} ({res['io_exits']} port I/O, "
                  f"{res['doorbell_mmio_exits'] + res['other_mmio_exits']} MMIO); "
                  f"CPU {res['cpu_start']} -> {res['cpu_end']}"
                  + (f", pinned to {res['pinned_cpu']}" if res["pinned_cpu"] >= 0 else ""))
    if g.name == "doorbell":
        n = res["doorbells_expected"]
        verdict = "[green]OK[/]" if doorbell_ok else "[red]MISMATCH[/]"
        console.print(f"doorbells: {n} rung by the guest, {res['doorbells_completed']} eventfd "
                      f"counts, {res['doorbell_mmio_exits']} doorbell MMIO exits reached "
                      f"userspace: {verdict}")
        console.print(f"BAR read by the guest: {res['bar_value']:#x}")
    if res.get("stats"):
        from .kvmstats import interesting
        st = Table(title="KVM binary stats: change over the boot (KVM_GET_STATS_FD)")
        st.add_column("fd")
        st.add_column("statistic")
        st.add_column("delta", justify="right")
        for key, delta in res["stats"].items():
            for name, value in sorted(interesting(delta).items()):
                st.add_row(key, name, str(value))
        console.print(st)
    return 0 if doorbell_ok else 1


# --- parser ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyvmm", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    i = sub.add_parser("info", help="host kernel, KVM backend and capabilities")
    i.add_argument("--json", action="store_true")
    i.add_argument("--kvm", default="/dev/kvm", help="KVM device (default /dev/kvm)")
    i.set_defaults(func=cmd_info)

    b = sub.add_parser("boot", help="boot a tiny guest on the Python VMM and show its timeline")
    b.add_argument("--guest", default="doorbell",
                   help=f"guest image: {', '.join(sorted(guests.GUESTS))} (default doorbell)")
    b.add_argument("--ioeventfds", type=_nonneg, default=0, metavar="N",
                   help="MMIO doorbell ioeventfds to register before the vCPU")
    b.add_argument("--vcpus", type=_pos, default=1, metavar="K")
    b.add_argument("--recipe", help="full recipe instead of --ioeventfds/--vcpus")
    b.add_argument("--ioev-len", type=int, default=4, choices=[0, 1, 2, 4, 8])
    b.add_argument("--timeout", type=float, default=10.0, help="seconds (0: none)")
    b.add_argument("--pin", type=int, default=None, metavar="CPU")
    b.add_argument("--memory", choices=["anon", "gmem"], default="anon",
                   help="back RAM with anonymous memory or a guest_memfd (mmap flags)")
    b.add_argument("--stats", action="store_true",
                   help="show KVM binary stats deltas of the VM and vCPU 0")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_boot)

    from .bench import cli as bench_cli
    bench_cli.add_parsers(sub)
    bench_cli.add_ptwrite_parser(sub)
    from .lab import cli as lab_cli
    lab_cli.add_parsers(sub)
    lab_cli.add_kernel_check_parser(sub)       # also top level: pyvmm kernel-check
    from .checks import cli as check_cli
    check_cli.add_parsers(sub)
    from .stress import cli as stress_cli
    stress_cli.add_parsers(sub)
    return p


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
        from .bench.cli import BENCH_PTWRITE
        argv = [BENCH_PTWRITE] + argv[2:]
    parser = build_parser()
    args = parser.parse_args(argv)
    import signal
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return args.func(args)
    except PyvmmError as e:
        return _fail(str(e))
    except Terminated:
        return _fail("terminated (SIGTERM); partial results are marked interrupted", 143)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
