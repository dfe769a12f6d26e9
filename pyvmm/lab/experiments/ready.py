"""A kernel ready to boot, each stage cached: the tools, the kernel's packages, the kit,
the KVM modules rebuilt with the variant's patch (or the whole kernel built at its HZ),
and kernel-check of the KVM that will run; for an image without symbols (Debian's
arm64), the addresses kernel-check needs, read in one short boot."""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass

from ...errors import LabError
from ...vmm import guests
from ..boot import initramfs, qemu, tools
from ..builds import crosshelper, kcheck
from ..builds import kernel as kbuild
from ..builds import modules as modbuild
from ..builds.variant import Variant
from ..sources import apt, kits
from ..sources.cache import cache_dir, locked
from .options import LabOptions, Ui, check_options


def check_available(variants: list[Variant], ui: Ui) -> None:
    """Every variant's kernel found in Debian's package lists (the lists fetched when
    needed, no kernel downloaded): a version Debian does not have fails here, before an
    experiment creates a results directory."""
    seen = set()
    for v in variants:
        if (v.kernel, v.arch.name) not in seen:
            seen.add((v.kernel, v.arch.name))
            apt.find(v.kernel, log=ui.log, arch=v.arch)


@dataclass
class ReadyKernel:
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
    debs: apt.KernelDebs | None = None      # the packages the kit came from


def ready(opts: LabOptions, ui: Ui) -> ReadyKernel:
    """Tools, kernel packages, kit, rebuilt modules and kernel-check, each cached."""
    check_options(opts)
    v = opts.variant
    patch = v.get_patch()
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
    deb = apt.resolve(v.kernel, log=ui.log, arch=opts.arch)
    timings["download_s"] = time.monotonic() - t
    ui.stage("unpack")
    t = time.monotonic()
    kit = kits.build_kit(deb, log=ui.log, arch=opts.arch)
    timings["unpack_s"] = time.monotonic() - t
    built = None
    kernel_build = None
    if v.whole_kernel:
        ui.stage(f"kernel build ({v.label})")
        t = time.monotonic()
        builder = kbuild.KernelBuilder(kit, log=ui.log, install=opts.install)
        timings["kernel_cached"] = builder.cached(patch, v.hz) is not None
        kernel_build = builder.build(patch, v.hz)
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
    return ReadyKernel(kit, modbuild.kit_modules(kit, built), kc, built, bb, helper_bin, timings,
                       kernel_build, deb)


def build_kernel(v: Variant, ui: Ui, install: bool = True) -> tuple[bool, float]:
    """A whole-kernel variant built into the cache ahead of its lab boot (lab remedies
    builds all of them first): (whether it was cached already, seconds spent)."""
    t = time.monotonic()
    kit = kits.build_kit(apt.resolve(v.kernel, log=ui.log, arch=v.arch), log=ui.log,
                         arch=v.arch)
    builder = kbuild.KernelBuilder(kit, log=ui.log, install=install)
    patch = v.get_patch()
    cached = builder.cached(patch, v.hz) is not None
    builder.build(patch, v.hz)
    return cached, time.monotonic() - t


def image_check(kit: kits.Kit, busybox: bytes, opts: LabOptions, ui: Ui) -> dict:
    """kernel-check of an image without symbols (Debian's arm64): one short boot of the
    kit reads /proc/kallsyms for the addresses the check needs (cached per kit), then the
    code is read from the image on this host (kcheck.check_image)."""
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


def build_meta(prep: ReadyKernel) -> dict | None:
    """What a run records of its whole-kernel build (None for Debian's image)."""
    if prep.kernel_build is None:
        return None
    return {k: v for k, v in prep.kernel_build.meta.items() if k != "kit"}
