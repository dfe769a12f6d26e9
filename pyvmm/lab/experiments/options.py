"""What a lab experiment is asked to do, checked before any tool is installed or
anything downloaded: the options of one lab boot (a Variant, CPUs, memory, bounds,
kernel parameters, module parameters), the checks on them, and the Ui the lab reports
its progress through (plain lines, or a rich progress display's)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from ...errors import LabError
from ..arch import Arch
from ..builds.variant import Variant
from ..sources import kits
from ..sources.elf import norm_module


@dataclass
class LabOptions:
    variant: Variant = field(default_factory=lambda: Variant("6.1"))
    # Module parameters, e.g. {"kvm_amd": "npt=0"} (shadow paging in the lab's KVM).
    kvm_args: dict = field(default_factory=dict)
    smp: int = 1
    out: str = "results"
    retries: int = 1
    total_timeout_s: float = 1800.0
    stall_timeout_s: float = 90.0
    boot_timeout_s: float = 120.0
    install: bool = True
    mem_mb: int = 1024
    # Kernel parameters for the lab kernel (e.g. srcutree.srcu_max_nodelay_phase=0).
    cmdline: str = ""
    # The QEMU a trace job runs inside the lab kernel: None (this host's) or debian:SUITE.
    qemu: str | None = None
    # The lab's own emulator: None (this host's QEMU) or debian:SUITE; and whether its TCG
    # runs a thread per emulated CPU (multi-threaded TCG) rather than one for all.
    emulator: str | None = None
    mttcg: bool = False

    @property
    def arch(self) -> Arch:
        return self.variant.arch

    def for_variant(self, v: Variant, **kw) -> "LabOptions":
        """These options for another variant (one row of a matrix)."""
        return replace(self, variant=v, **kw)


class Ui:
    """What the lab reports while it works; the CLI renders it with rich."""

    def log(self, msg: str) -> None:
        print(msg)

    def stage(self, name: str, total: int | None = None) -> None:
        pass

    def boot(self, done: int, total: int, label: str) -> None:
        pass


def check_options(opts: LabOptions) -> None:
    """What the variant's parse did not check: CPUs and kernel parameters."""
    if opts.smp not in (1, 2, 4) or (opts.smp == 4 and not opts.mttcg):
        raise LabError(f"--smp {opts.smp}: the lab runs with 1 or 2 emulated CPUs, or 4 with "
                       "--mttcg")
    check_cmdline(opts.cmdline)
    from ..sources.qemus import check_spec
    for spec in (opts.qemu, opts.emulator):
        if spec:
            check_spec(spec)
    if opts.mttcg and opts.smp < 2:
        raise LabError("--mttcg runs a thread per emulated CPU: give --smp 2 or 4")


def check_cmdline(cmdline: str) -> str:
    """Kernel parameters: printable words, no quotes, not too long."""
    if len(cmdline) > 512:
        raise LabError(f"--cmdline is {len(cmdline)} characters: keep it under 512")
    for word in cmdline.split():
        if not word.isprintable() or any(c in word for c in "\"'`$\\;"):
            raise LabError(f"--cmdline: '{word}' is not a plain kernel parameter "
                           "(NAME or NAME=VALUE, no quotes or shell characters)")
    return cmdline


def parse_kvm_args(items: list[str]) -> dict[str, str]:
    """['kvm_amd:npt=0', 'kvm_amd:avic=0'] -> {'kvm_amd': 'npt=0 avic=0'}."""
    out: dict[str, list[str]] = {}
    for item in items:
        mod, sep, param = item.partition(":")
        if not sep or not mod or "=" not in param or any(c.isspace() for c in param):
            raise LabError(f"--kvm-arg '{item}': give MODULE:NAME=VALUE, e.g. kvm_amd:npt=0")
        out.setdefault(mod, []).append(param)
    return {m: " ".join(ps) for m, ps in out.items()}


def kernel_cmdline(opts: LabOptions, kit: kits.Kit) -> str:
    """What the lab kernel gets on its command line beyond the lab's own: --cmdline, and
    the KVM module parameters when KVM is built in (kvm_amd.npt=0 for kvm_amd:npt=0)."""
    words = opts.cmdline.split()
    if kit.builtin:
        for mod, params in opts.kvm_args.items():
            words += [f"{norm_module(mod)}.{p}" for p in params.split()]
    return " ".join(words)


def module_args(kit: kits.Kit, args: dict[str, str]) -> dict[str, str]:
    """{'kvm_amd': 'npt=0'} -> {'03-kvm_amd.ko': 'npt=0'} for the initramfs (nothing when
    KVM is built in: kernel_cmdline passes them)."""
    if kit.builtin:
        return {}
    names = dict(zip(kit.module_names(), kit.meta["modules"]))
    out = {}
    for mod, params in args.items():
        key = norm_module(mod)
        if key not in names:
            raise LabError(f"module parameters for {mod}: the lab loads only "
                           f"{', '.join(names)}")
        out[names[key]] = params
    return out


class ConsoleUi(Ui):
    """The lab's reports as plain lines (before a progress display exists)."""

    def __init__(self, con):
        self.con = con

    def log(self, msg: str) -> None:
        self.con.print(msg, highlight=False)


class RichUi(Ui):
    def __init__(self, prog):
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
