"""Kits: what the lab boots. A kit is the kernel image, its config, and the KVM modules
with everything they depend on, decompressed and in load order, unpacked from a kernel's
packages into the cache (written under a temporary name and renamed into place, so an
interrupted unpack never leaves a half-written entry behind).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

from ...errors import LabError
from ..arch import X86_64, Arch
from .apt import KernelDebs
from .cache import cache_dir, locked, manifest, remove_leftovers, whole_entry
from .elf import MODULE_EXTS, decompress_module, load_order, modinfo, module_depends, norm_module


@dataclass
class Kit:
    path: str
    meta: dict
    arch: Arch = X86_64

    @property
    def vmlinuz(self) -> str:
        return os.path.join(self.path, "vmlinuz")

    @property
    def system_map(self) -> str | None:
        """The image's symbol table (kept for an image that is not ELF: arm64's Image)."""
        p = os.path.join(self.path, "System.map")
        return p if os.path.exists(p) else None

    @property
    def builtin(self) -> bool:
        """KVM built into the image (a lab kernel build): no modules to load."""
        return bool(self.meta.get("kvm_builtin"))

    @property
    def kvm_ko(self) -> str:
        """What kernel-check reads: kvm.ko, or the image with symbols (vmlinux) when KVM
        is built in."""
        if self.builtin:
            return os.path.join(self.path, "vmlinux")
        return os.path.join(self.path, "modules", self.meta["kvm_module_file"])

    def modules(self) -> list[str]:
        return [os.path.join(self.path, "modules", f) for f in self.meta["modules"]]

    def module_names(self) -> list[str]:
        """Kernel module names in load order (kvm, kvm_amd, ...)."""
        return self.meta.get("module_names") or [
            norm_module(f.split("-", 1)[1]) for f in self.meta["modules"]]

    @property
    def series(self) -> str:
        return ".".join(self.meta["version"].split(":")[-1].split(".")[:2])


def _deb_field(deb: str, field: str) -> str:
    p = subprocess.run(["dpkg-deb", "-f", deb, field], capture_output=True, text=True)
    if p.returncode != 0:
        raise LabError(f"{deb} is not a readable Debian package: {p.stderr.strip()}")
    return p.stdout.strip()


def build_kit(debs: KernelDebs | str, log=print, arch: Arch = X86_64) -> Kit:
    """Unpack the kernel image, config and KVM modules of a kernel's packages (cached)."""
    if isinstance(debs, str):
        debs = KernelDebs(debs)
    if not shutil.which("dpkg-deb"):
        raise LabError("dpkg-deb not found: it unpacks the kernel package (apt-get install dpkg)")
    deb = debs.image
    name, version = _deb_field(deb, "Package"), _deb_field(deb, "Version")
    kits = os.path.join(cache_dir(), "kits")
    final = os.path.join(kits, re.sub(r"[^\w.+-]", "_", f"{name}_{version}"))
    hit = _cached_kit(final, arch, log)
    if hit is not None:
        return hit
    os.makedirs(kits, exist_ok=True)
    with locked(final, f"unpacking {name} {version}", log):
        hit = _cached_kit(final, arch, log)
        return hit if hit is not None else _unpack_kit(debs, final, kits, name, version,
                                                        arch, log)


def _cached_kit(final: str, arch: Arch, log) -> Kit | None:
    """The kit at `final` if it is whole (kit.json, written last, and its manifest)."""
    meta = whole_entry(final, "kit.json", "kit|unpacking it again", log)
    return None if meta is None else Kit(final, meta, arch)


def _unpack_kit(debs, final: str, kits: str, name: str, version: str, arch: Arch, log) -> Kit:
    stem = f".kit-{os.path.basename(final)}-"      # under the kit's lock: see fill_dir
    remove_leftovers(kits, stem, log)
    tmp = tempfile.mkdtemp(prefix=stem, dir=kits)
    try:
        x = os.path.join(tmp, "x")
        for d in debs.all:
            log(f"unpacking {os.path.basename(d)}")
            p = subprocess.run(["dpkg-deb", "-x", d, x], capture_output=True, text=True)
            if p.returncode != 0:
                raise LabError(f"dpkg-deb could not unpack {d}: {p.stderr.strip()}")
        meta = _assemble_kit(x, tmp, name, version, arch)
        shutil.rmtree(x)
        names = ["vmlinuz"] + [os.path.join("modules", m) for m in meta["modules"]]
        for extra in ("config", "System.map"):
            if os.path.exists(os.path.join(tmp, extra)):
                names.append(extra)
        meta["files"] = manifest(tmp, names)
        with open(os.path.join(tmp, "kit.json"), "w") as f:
            json.dump(meta, f, indent=1)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Kit(final, meta, arch)


def _system_map(x: str, release: str) -> str | None:
    for p in (f"boot/System.map-{release}", f"usr/lib/modules/{release}/System.map",
              f"lib/modules/{release}/System.map"):
        if os.path.isfile(os.path.join(x, p)):
            return os.path.join(x, p)
    return None


def _kernel_files(x: str) -> tuple[str, str, str | None]:
    """(release, vmlinuz path, config path or None) of an unpacked kernel: /boot in the
    classic layout, /usr/lib/modules/R/{vmlinuz,config} in the split one."""
    boot = os.path.join(x, "boot")
    images = sorted(f for f in os.listdir(boot) if f.startswith("vmlinuz-")) \
        if os.path.isdir(boot) else []
    if images:
        release = images[0][len("vmlinuz-"):]
        cfg = os.path.join(boot, f"config-{release}")
        return release, os.path.join(boot, images[0]), cfg if os.path.exists(cfg) else None
    for base in ("usr/lib/modules", "lib/modules"):
        root = os.path.join(x, base)
        if not os.path.isdir(root):
            continue
        for release in sorted(os.listdir(root)):
            vmlinuz = os.path.join(root, release, "vmlinuz")
            if os.path.isfile(vmlinuz):
                cfg = os.path.join(root, release, "config")
                return release, vmlinuz, cfg if os.path.exists(cfg) else None
    raise LabError("the package holds no /boot/vmlinuz-* nor usr/lib/modules/*/vmlinuz: is it a "
                   "linux-image package (for 7.x, with its linux-binary and linux-modules "
                   "parts)?")


def _assemble_kit(x: str, out: str, name: str, version: str, arch: Arch = X86_64) -> dict:
    try:
        release, vmlinuz, cfg_path = _kernel_files(x)
    except LabError as e:
        raise LabError(f"{name} {version}: {e}") from None
    shutil.copy(vmlinuz, os.path.join(out, "vmlinuz"))
    config = {}
    if cfg_path:
        shutil.copy(cfg_path, os.path.join(out, "config"))
        with open(cfg_path, errors="replace") as f:
            for line in f:
                m = re.match(r"(CONFIG_\w+)=(.*)", line)
                if m:
                    config[m.group(1)] = m.group(2).strip('"')
    mod_root = next((os.path.join(x, p, release) for p in ("lib/modules", "usr/lib/modules")
                     if os.path.isdir(os.path.join(x, p, release))), None)
    if mod_root is None:
        raise LabError(f"{name} {version} holds no kernel modules (lib/modules/{release}); "
                       f"the lab needs a package that ships kvm.ko and "
                       f"{arch.kvm_vendor_module.replace('_', '-')}.ko")
    paths: dict[str, str] = {}
    for d, _, files in os.walk(mod_root):
        for f in files:
            if f.endswith(MODULE_EXTS):
                paths.setdefault(norm_module(f), os.path.join(d, f))
    if arch.kvm_builtin:
        return _builtin_kvm_kit(x, out, name, version, release, mod_root, paths, config,
                                cfg_path, arch)
    vendor = arch.kvm_vendor_module
    if "kvm" not in paths or vendor not in paths:
        builtin = ""
        bpath = os.path.join(mod_root, "modules.builtin")
        if os.path.exists(bpath) and "kvm.ko" in open(bpath).read():
            builtin = " (KVM is built into this kernel; the lab expects modules)"
        raise LabError(f"{name} {version} has no kvm and {vendor.replace('_', '-')} modules"
                       f"{builtin}")
    data: dict[str, bytes] = {}
    deps: dict[str, list[str]] = {}

    def load(m):
        if m not in data and m in paths:
            data[m] = decompress_module(paths[m])
            deps[m] = module_depends(data[m])
            for d in deps[m]:
                load(d)
    load(vendor)
    order = load_order(vendor, deps)
    files = _write_modules(out, order, data)
    from ...hostinfo import config_hz, preemption_from_config
    return {"package": name, "version": version, "kernel_release": release,
            "modules": files, "module_names": order,
            "kvm_module_file": files[order.index("kvm")],
            "config_hz": config_hz(config), "preemption": preemption_from_config(config),
            "config_source": f"{name} {version}: {os.path.relpath(cfg_path, x)}"
            if cfg_path else f"{name} {version}: no config",
            "vermagic": (modinfo(data["kvm"]).get("vermagic") or [""])[0]}


def _write_modules(out: str, order: list[str], data: dict[str, bytes]) -> list[str]:
    """The kit's modules/NN-name.ko files, numbered in load order."""
    os.makedirs(os.path.join(out, "modules"))
    files = []
    for i, m in enumerate(order):
        fname = f"{i:02d}-{m}.ko"
        with open(os.path.join(out, "modules", fname), "wb") as f:
            f.write(data[m])
        files.append(fname)
    return files


def _builtin_kvm_kit(x: str, out: str, name: str, version: str, release: str, mod_root: str,
                     paths: dict[str, str], config: dict, cfg_path: str | None,
                     arch: Arch) -> dict:
    """A kit of an image with KVM built in (Debian's arm64): the image, its System.map
    (kernel-check reads the image through it) and the modules /init needs besides KVM
    (the virtio console that carries the lab's data), each with what it depends on."""
    if config.get("CONFIG_KVM") != "y":
        raise LabError(f"{name} {version}: CONFIG_KVM is {config.get('CONFIG_KVM', 'unset')}; "
                       f"the {arch.name} lab expects KVM built into the image")
    smap = _system_map(x, release)
    if smap is None:
        raise LabError(f"{name} {version} ships no System.map: kernel-check cannot read its "
                       "image")
    shutil.copy(smap, os.path.join(out, "System.map"))
    builtin = set()
    bpath = os.path.join(mod_root, "modules.builtin")
    if os.path.exists(bpath):
        with open(bpath) as f:
            builtin = {norm_module(os.path.basename(l.strip())) for l in f if l.strip()}
    data: dict[str, bytes] = {}
    deps: dict[str, list[str]] = {}
    order: list[str] = []

    def load(m):
        if m in data or m in builtin:
            return
        if m not in paths:
            raise LabError(f"{name} {version} has no module {m} (the lab's data port needs "
                           "it) and does not build it in")
        data[m] = decompress_module(paths[m])
        deps[m] = module_depends(data[m])
        for d in deps[m]:
            load(d)
        order.append(m)             # after what it depends on
    for m in arch.lab_modules:
        load(m)
    files = _write_modules(out, order, data)
    from ...hostinfo import config_hz, preemption_from_config
    return {"package": name, "version": version, "kernel_release": release,
            "modules": files, "module_names": order, "kvm_module_file": None,
            "kvm_builtin": True, "arch": arch.name,
            "config_hz": config_hz(config), "preemption": preemption_from_config(config),
            "config_source": f"{name} {version}: {os.path.relpath(cfg_path, x)}"
            if cfg_path else f"{name} {version}: no config",
            "vermagic": (modinfo(data[order[0]]).get("vermagic") or [""])[0] if order else ""}


def extra_modules(kit: Kit, debs: KernelDebs, names: tuple[str, ...], log=print) \
        -> dict[str, bytes]:
    """More modules of the kit's kernel than KVM's (a lab host's NIC), with what they
    depend on, in load order: {'NN-name.ko': contents}, cached in the kit's extra/
    folder. Modules the kernel builds in are left out; none for an image with everything
    built in (a whole-kernel lab build)."""
    if kit.builtin:
        return {}
    folder = os.path.join(kit.path, "extra-" + "-".join(sorted(names)))
    listing = os.path.join(folder, "order.json")
    try:
        with open(listing) as f:
            order = json.load(f)
        out = {}
        for n in order:
            with open(os.path.join(folder, n), "rb") as fh:
                out[n] = fh.read()
        return out
    except (OSError, ValueError):
        pass
    release = kit.meta["kernel_release"]
    log(f"extracting {', '.join(names)} from {kit.meta['package']}")
    with tempfile.TemporaryDirectory(prefix="pyvmm-extra-") as x:
        for deb in debs.all:
            p = subprocess.run(["dpkg-deb", "-x", deb, x], capture_output=True, text=True)
            if p.returncode != 0:
                raise LabError(f"dpkg-deb -x {deb} failed: {p.stderr.strip()}")
        mod_root = next((os.path.join(x, p, release) for p in ("lib/modules", "usr/lib/modules")
                         if os.path.isdir(os.path.join(x, p, release))), None)
        if mod_root is None:
            raise LabError(f"{kit.meta['package']} holds no modules of {release}")
        paths: dict[str, str] = {}
        for d, _, files in os.walk(mod_root):
            for f in files:
                if f.endswith(MODULE_EXTS):
                    paths.setdefault(norm_module(f), os.path.join(d, f))
        builtin = set()
        bpath = os.path.join(mod_root, "modules.builtin")
        if os.path.exists(bpath):
            with open(bpath) as f:
                builtin = {norm_module(os.path.basename(ln.strip())) for ln in f if ln.strip()}
        loaded = set(kit.module_names())
        data: dict[str, bytes] = {}
        order: list[str] = []

        def load(m):
            if m in data or m in builtin or m in loaded:
                return
            if m not in paths:
                raise LabError(f"{kit.meta['package']} has no module {m} and does not build it "
                               "in")
            data[m] = decompress_module(paths[m])
            for dep in module_depends(data[m]):
                load(dep)
            order.append(m)
        for m in names:
            load(m)
    tmp = folder + f".tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    out = {}
    for i, m in enumerate(order):
        fname = f"{50 + i:02d}-{m}.ko"
        with open(os.path.join(tmp, fname), "wb") as f:
            f.write(data[m])
        out[fname] = data[m]
    with open(os.path.join(tmp, "order.json"), "w") as f:
        json.dump(list(out), f)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return out
