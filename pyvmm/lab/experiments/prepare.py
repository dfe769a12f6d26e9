"""What every lab experiment does before it boots: the options and the variant
(a kernel and an optional KVM patch) checked before any tool is installed or anything
downloaded, then tools, packages, kit, rebuilt modules and kernel-check, each cached;
and the host facts of the kernel inside QEMU."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field

from ...vmm import guests
from ...errors import LabError
from ..arch import ARM64, X86_64, Arch, get_arch
from ..boot import tools
from ..builds import kcheck
from ..builds import kernel as kbuild
from ..builds.kernel import HZ_VALUES, check_hz
from ..builds import modules as modbuild
from ..builds.patch import Patch, get_patch, load_patches
from ..builds import crosshelper
from ..sources import apt, debian, kits
from ..sources.cache import cache_dir, locked
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
    """A kernel spec, an optional patch, for a whole-kernel build its HZ, and the
    architecture: '6.1', '6.1+defer-free', 'latest', '7.3+srcu-expedited@hz100',
    'arm64:6.1'."""
    kernel: str
    patch: str | None = None
    hz: int | None = None
    arch: Arch = X86_64

    @property
    def label(self) -> str:
        return (("arm64:" if self.arch == ARM64 else "") + self.kernel
                + (f"+{self.patch}" if self.patch else "")
                + (f"@hz{self.hz}" if self.hz else ""))


# Debian's CONFIG_HZ on each architecture: a patched arm64 variant without @hzN builds at it
DEBIAN_HZ = {"x86_64": 250, "aarch64": 250}


def split_arch(text: str, default: Arch = X86_64) -> tuple[str, Arch]:
    """'arm64:6.1' -> ('6.1', ARM64); without a prefix, `default` (--arch)."""
    head, colon, tail = text.partition(":")
    if colon and head and not os.sep in head and not head[0].isdigit():
        return tail, get_arch(head)
    return text, default


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


def parse_variant(text: str, patches: dict | None = None, arch: Arch = X86_64) -> Variant:
    """'[ARCH:]KERNEL[+PATCH][@hzN]', checked without touching the network (a .deb path
    may itself hold '+', so only a known patch name after the last '+' splits it)."""
    text = text.strip()
    if not text:
        raise LabError("empty variant: give KERNEL or KERNEL+PATCH, e.g. 6.1+defer-free")
    patches = load_patches() if patches is None else patches
    text, arch = split_arch(text, arch)
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
    if arch.kvm_builtin and patch and not hz:
        # KVM is built into the image: a patched KVM is a whole-kernel build, at the HZ
        # of Debian's own kernel unless one is asked for
        hz = DEBIAN_HZ[arch.name]
    return Variant(kernel, patch, hz, arch)


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

    def __post_init__(self):
        if self.arch.kvm_builtin and self.kvm_patch and not self.hz:
            self.hz = DEBIAN_HZ[self.arch.name]     # a patched KVM is a whole-kernel build

    @property
    def variant(self) -> "Variant":
        return Variant(self.kernel, self.kvm_patch, self.hz, self.arch)


def variant_options(base: "LabOptions", v: Variant, **kw) -> "LabOptions":
    """The options of one variant of a multi-variant experiment (matrix, vcpus)."""
    from dataclasses import replace
    return replace(base, kernel=v.kernel, kvm_patch=v.patch, hz=v.hz, arch=v.arch, **kw)


def stamped_dir(parent: str, prefix: str) -> str:
    """A new PARENT/PREFIX-YYYYmmdd-HHMMSS[-n] directory for a multi-variant experiment."""
    import time
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = os.path.join(parent, f"{prefix}-{stamp}")
    n = 1
    while os.path.exists(out):
        n += 1
        out = os.path.join(parent, f"{prefix}-{stamp}-{n}")
    os.makedirs(out)
    return out


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
    v = parse_variant(spec, arch=opts.arch)      # the same checks as a matrix variant
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
    if opts.arch.cross_prefix:       # the helper and busybox of the lab's architecture
        helper_bin, _ = crosshelper.helper(opts.arch, ui.log, opts.install)
        bb = crosshelper.busybox(opts.arch, ui.log)
    else:
        with open(tools.find_static_busybox(), "rb") as f:
            bb = f.read()
        with open(guests.helper_path(), "rb") as f:
            helper_bin = f.read()
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
        kc = kcheck.check(kit.kvm_ko, kit.arch.objdump)
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
    elif kit.arch.kvm_builtin:
        ui.stage("kernel symbols")
        kc = image_check(kit, bb, opts, ui)
        kc["path"] = f"{kit.meta['package']}: Image (KVM built in), symbols from the lab kernel"
    else:
        kc = kcheck.check(kit.kvm_ko)
        kc["path"] = f"{kit.meta['package']}: {kit.meta['kvm_module_file'].split('-', 1)[1]}"
    ui.log(f"kernel-check: {kc['summary']}")
    return Prepared(kit, modbuild.kit_modules(kit, built), kc, built, bb, helper_bin, timings,
                    kernel_build)


def image_check(kit: kits.Kit, busybox: bytes, opts: LabOptions, ui: Ui) -> dict:
    """kernel-check of an image without symbols (Debian's arm64): one short boot of the
    kit reads /proc/kallsyms for the addresses the check needs (cached per kit), then the
    code is read from the image on this host (kcheck.check_image)."""
    import json
    path = os.path.join(cache_dir(), "ksyms", os.path.basename(kit.path) + ".json")
    facts = None
    try:
        with open(path) as f:
            facts = json.load(f).get("facts")
    except FileNotFoundError:
        pass
    except (OSError, ValueError, AttributeError):
        ui.log(f"the cached symbols {path} are damaged: reading them again")
    if not facts:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with locked(path, f"reading the symbols of {kit.meta['package']}", ui.log):
            facts = _read_ksyms(kit, busybox, opts, ui)
            tmp = path + f".tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump({"package": kit.meta["package"], "version": kit.meta["version"],
                           "facts": facts}, f, indent=1)
            os.replace(tmp, path)
    return kcheck.check_image(kit.vmlinuz, facts, f"{kit.arch.cross_prefix}objdump")


def _read_ksyms(kit: kits.Kit, busybox: bytes, opts: LabOptions, ui: Ui) -> dict[str, str]:
    import tempfile
    from ..boot import initramfs, qemu
    ui.log(f"reading {kit.meta['package']}'s symbols from /proc/kallsyms (one boot)")
    mods = {}
    for p in kit.modules():
        with open(p, "rb") as f:
            mods[os.path.basename(p)] = f.read()
    image = initramfs.build(busybox, b"", mods, "", data_tty=kit.arch.data_tty,
                            python=["awk", kcheck.kallsyms_awk(), "/proc/kallsyms"])
    with tempfile.TemporaryDirectory(prefix="pyvmm-ksyms-") as work:
        initrd = os.path.join(work, "initramfs.cpio.gz")
        with open(initrd, "wb") as f:
            f.write(image)
        cfg = qemu.QemuConfig(kernel=kit.vmlinuz, initrd=initrd, mem_mb=opts.mem_mb,
                              boot_timeout_s=opts.boot_timeout_s,
                              stall_timeout_s=opts.stall_timeout_s,
                              total_timeout_s=opts.total_timeout_s, arch=kit.arch)
        stream, _ = qemu.run(cfg, work)
    facts = {k: v for k, v in stream.facts.items()
             if k.startswith((kcheck.KSYM_FACT + ":", kcheck.KSYM_NEXT_FACT + ":"))}
    if f"{kcheck.KSYM_FACT}:{kcheck.FUNCTION}" not in facts:
        raise LabError(f"{kit.meta['package']}: /proc/kallsyms in the lab kernel has no "
                       f"{kcheck.FUNCTION} (errors: {'; '.join(stream.errors[-3:]) or 'none'})")
    return facts


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


