"""What every lab experiment does before it boots: the options and the variant
(a kernel and an optional KVM patch) checked before any tool is installed or anything
downloaded, then tools, packages, kit, rebuilt modules and kernel-check, each cached;
and the host facts of the kernel inside QEMU."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field

from ... import guests
from ...errors import LabError
from ..arch import X86_64, Arch
from ..boot import tools
from ..builds import kcheck
from ..builds import kernel as kbuild
from ..builds.kernel import HZ_VALUES, check_hz
from ..builds import modules as modbuild
from ..builds.patch import Patch, get_patch, load_patches
from ..sources import apt, debian, kits
from ..sources.elf import norm_module

ENVIRONMENT = "qemu-tcg"


def inner_host(kit: kits.Kit, facts: dict[str, str], smp: int, outer: dict) -> dict:
    """Host facts for the kernel inside QEMU (same keys as hostinfo.collect()); `outer` is
    hostinfo.collect() of the machine running QEMU."""
    meta = kit.meta
    return {
        "hostname": ENVIRONMENT,
        "kernel": facts.get("kernel", meta["kernel_release"]),
        "kernel_version": facts.get("kernel_version", ""),
        "machine": facts.get("machine", kit.arch.name),
        "config_source": meta["config_source"],
        "config_hz": meta["config_hz"],
        "preemption": meta["preemption"],
        "cpu_model": facts.get("cpu_model", kit.arch.lab_cpu_model).strip(),
        "cpus": int(facts["cpus"]) if facts.get("cpus", "").isdigit() else smp,
        "backend": kit.arch.lab_backend,
        "rlimit_nofile": None, "python": None, "kvm_api_version": None, "caps": None,
        "kvm_error": None,
        "clocksource": facts.get("clocksource"),
        "modules": facts.get("modules", "").split(),
        "package": f"{meta['package']} {meta['version']}",
        "outer_host": {k: outer[k] for k in ("hostname", "kernel", "cpu_model", "cpus",
                                             "backend")},
    }


@dataclass(frozen=True)
class Variant:
    """A kernel spec, an optional patch and, for a whole-kernel build, its HZ:
    '6.1', '6.1+defer-free', 'latest', '7.3+srcu-expedited@hz100'."""
    kernel: str
    patch: str | None = None
    hz: int | None = None

    @property
    def label(self) -> str:
        return (self.kernel + (f"+{self.patch}" if self.patch else "")
                + (f"@hz{self.hz}" if self.hz else ""))


def split_build(text: str) -> tuple[str, int | None]:
    """'7.3@hz100' -> ('7.3', 100): a whole-kernel build at that HZ; no '@': Debian's own
    image (None)."""
    head, at, tail = text.rpartition("@")
    if not at or os.sep in tail:
        return text, None
    m = re.fullmatch(r"hz(\d+)", tail)
    if not m:
        raise LabError(f"unknown build option '@{tail}' in '{text}': give @hzN for a "
                       f"whole-kernel build ticking at N Hz ({', '.join(map(str, HZ_VALUES))}),"
                       " e.g. 7.3@hz100")
    return head, check_hz(int(m.group(1)))


def parse_variant(text: str, patches: dict | None = None) -> Variant:
    """'KERNEL[+PATCH][@hzN]', checked without touching the network (a .deb path may
    itself hold '+', so only a known patch name after the last '+' splits it)."""
    text = text.strip()
    if not text:
        raise LabError("empty variant: give KERNEL or KERNEL+PATCH, e.g. 6.1+defer-free")
    patches = load_patches() if patches is None else patches
    text, hz = split_build(text)
    kernel, patch = text, None
    if "+" in text and not text.endswith(".deb"):
        head, _, tail = text.rpartition("+")
        if tail in patches:
            kernel, patch = head, tail
        elif not (os.sep in text):
            raise LabError(f"unknown KVM patch '{tail}' in variant '{text}': the project has "
                           f"{', '.join(patches) or 'none'} "
                           "(see pyvmm/lab/builds/patches/INDEX)")
    debian.check_spec(kernel)
    if hz and (kernel.endswith(".deb") or os.sep in kernel):
        raise LabError(f"'{kernel}@hz{hz}': a whole-kernel build starts from a Debian "
                       "version (6.1, 7.3, latest), not a package file")
    if patch and not hz and patches[patch].whole_kernel():
        raise LabError(f"patch {patch} changes the kernel image, not only KVM: it needs a "
                       f"whole-kernel build, e.g. {kernel}+{patch}@hz250")
    return Variant(kernel, patch, hz)


@dataclass
class LabOptions:
    kernel: str = "6.1"
    kvm_patch: str | None = None
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
    arch: Arch = X86_64
    # A whole kernel built at this HZ instead of Debian's image (None: Debian's).
    hz: int | None = None
    # Kernel parameters for the lab kernel (e.g. srcutree.srcu_max_nodelay_phase=0).
    cmdline: str = ""

    @property
    def variant(self) -> "Variant":
        return Variant(self.kernel, self.kvm_patch, self.hz)


class Ui:
    """What the lab reports while it works; the CLI renders it with rich."""

    def log(self, msg: str) -> None:
        print(msg)

    def stage(self, name: str, total: int | None = None) -> None:
        pass

    def boot(self, done: int, total: int, label: str) -> None:
        pass


def check_options(opts: LabOptions) -> Patch | None:
    """Everything about the arguments that can be checked before any tool is installed
    or anything downloaded; returns the patch asked for."""
    if opts.smp not in (1, 2):
        raise LabError(f"--smp {opts.smp}: the lab runs with 1 or 2 emulated CPUs")
    check_cmdline(opts.cmdline)
    spec = opts.kernel + (f"+{opts.kvm_patch}" if opts.kvm_patch else "") \
        + (f"@hz{opts.hz}" if opts.hz else "")
    v = parse_variant(spec)         # the same checks as a matrix variant
    return get_patch(v.patch) if v.patch else None


def check_cmdline(cmdline: str) -> str:
    """Kernel parameters: printable words, no quotes, not too long."""
    if len(cmdline) > 512:
        raise LabError(f"--cmdline is {len(cmdline)} characters: keep it under 512")
    for word in cmdline.split():
        if not word.isprintable() or any(c in word for c in "\"'`$\\;"):
            raise LabError(f"--cmdline: '{word}' is not a plain kernel parameter "
                           "(NAME or NAME=VALUE, no quotes or shell characters)")
    return cmdline


def kernel_cmdline(opts: LabOptions, kit: kits.Kit) -> str:
    """What the lab kernel gets on its command line beyond the lab's own: --cmdline, and
    the KVM module parameters when KVM is built in (kvm_amd.npt=0 for kvm_amd:npt=0)."""
    words = opts.cmdline.split()
    if kit.builtin:
        for mod, params in opts.kvm_args.items():
            words += [f"{norm_module(mod)}.{p}" for p in params.split()]
    return " ".join(words)


@dataclass
class Prepared:
    """A kernel ready to boot: the kit, the modules to load (rebuilt ones swapped in),
    the static check of its kvm.ko, the tools and the stage timings so far."""
    kit: kits.Kit
    modules: dict
    kernel_check: dict
    built: modbuild.BuiltModules | None
    busybox: bytes
    helper: bytes
    timings: dict
    kernel_build: kbuild.BuiltKernel | None = None


def prepare(opts: LabOptions, ui: Ui) -> Prepared:
    """Tools, kernel packages, kit, rebuilt modules and kernel-check, each cached."""
    patch = check_options(opts)
    timings = {}
    ui.stage("tools")
    tools.ensure_tools(ui.log, opts.install, opts.arch)
    busybox = tools.find_static_busybox()
    helper = guests.helper_path()
    ui.stage("download")
    t = time.monotonic()
    deb = apt.resolve(opts.kernel, log=ui.log, arch=opts.arch)
    timings["download_s"] = time.monotonic() - t
    ui.stage("unpack")
    t = time.monotonic()
    kit = kits.build_kit(deb, log=ui.log, arch=opts.arch)
    timings["unpack_s"] = time.monotonic() - t
    built = None
    kernel_build = None
    if opts.hz:
        ui.stage(f"kernel build ({opts.variant.label})")
        t = time.monotonic()
        builder = kbuild.KernelBuilder(kit, log=ui.log, install=opts.install)
        timings["kernel_cached"] = builder.cached(patch, opts.hz) is not None
        kernel_build = builder.build(patch, opts.hz)
        timings["kernel_build_s"] = time.monotonic() - t
        kit = kernel_build.kit()
        kc = kcheck.check(kit.kvm_ko)
        kc["path"] = f"{kernel_build.meta['kit']['variant']}: vmlinux (KVM built in)"
    elif patch is not None:
        ui.stage(f"modules ({patch.name})")
        t = time.monotonic()
        builder = modbuild.ModuleBuilder(kit, log=ui.log)
        was_cached = builder.cached(patch) is not None
        built = builder.build(patch)
        timings["modules_s"] = time.monotonic() - t
        timings["modules_cached"] = was_cached
        kc = kcheck.check(built.module("kvm"))
        kc["path"] = f"{kit.meta['package']}: kvm.ko rebuilt with patch {patch.name}"
    else:
        kc = kcheck.check(kit.kvm_ko)
        kc["path"] = f"{kit.meta['package']}: {kit.meta['kvm_module_file'].split('-', 1)[1]}"
    ui.log(f"kernel-check: {kc['summary']}")
    with open(busybox, "rb") as f:
        bb = f.read()
    with open(helper, "rb") as f:
        helper_bin = f.read()
    return Prepared(kit, modbuild.kit_modules(kit, built), kc, built, bb, helper_bin, timings,
                    kernel_build)


def build_meta(prep: Prepared) -> dict | None:
    """What a run records of its whole-kernel build (None for Debian's image)."""
    if prep.kernel_build is None:
        return None
    return {k: v for k, v in prep.kernel_build.meta.items() if k != "kit"}


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


