"""Whole lab kernels: the kernel image with KVM built in, from Debian's linux-source of
the same version as a Debian kernel, with a small config made for the lab and
CONFIG_HZ as a knob, and a project patch that may change any file.

The config is `make tinyconfig` with the lab's fragment merged on top
(lab-ARCH.config: what QEMU's machine, the initramfs, KVM, the Python runtime and the
trace job need), the options that decide how ticks and grace periods behave (NO_HZ,
preemption, RCU) copied from Debian's own config of that kernel, and the HZ asked for;
every `=y` the fragment asks for is checked once Kconfig has resolved it.

The full source tree is unpacked once per version under <cache>/kbuild/source/; a build
works in a temporary directory (a hard-linked copy of the tree when a patch changes it,
the patched files copied first so that the cached tree stays pristine; objects under
O=) and renames its result into <cache>/kbuild/kernels/, keyed by source version,
config fragment and patch; build.json is written last, so an entry without it is not
one. A failed build keeps its log and names its first error lines.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass

from ...errors import LabError
from ..arch import X86_64, Arch
from ..sources.hostpkgs import apt_install, missing_packages
from ..sources.cache import atomic_dir, cache_dir, locked, manifest, remove_leftovers
from ..sources.kits import Kit
from .modules import (AptUser, apply_patch, entry_meta, extract_source,
                      source_deb)
from .patch import Patch

HZ_VALUES = (100, 250, 300, 1000)
RECIPE = 1                  # bumped when the way a kernel is built changes (cache key)
FRAGMENT_DIR = os.path.dirname(os.path.abspath(__file__))
# Debian config options copied as they are: how ticks, preemption and grace periods run.
TIMING_PREFIXES = ("CONFIG_PREEMPT", "CONFIG_NO_HZ", "CONFIG_RCU_", "CONFIG_TREE_RCU",
                   "CONFIG_TREE_SRCU", "CONFIG_VIRT_CPU_ACCOUNTING",
                   "CONFIG_CONTEXT_TRACKING", "CONFIG_HIGH_RES_TIMERS")
# command or file -> Debian package, for a kernel build
BUILD_PACKAGES = {"make": "make", "gcc": "gcc", "flex": "flex", "bison": "bison", "bc": "bc",
                  "patch": "patch", "xz": "xz-utils", "perl": "perl",
                  "/usr/include/libelf.h": "libelf-dev",
                  "/usr/include/openssl/ssl.h": "libssl-dev"}


# --- the config (pure) ------------------------------------------------------------------

def check_hz(hz: int) -> int:
    if hz not in HZ_VALUES:
        raise LabError(f"HZ {hz}: a kernel ticks at {', '.join(map(str, HZ_VALUES))} "
                       "(Kconfig's choices)")
    return hz


def fragment(debian_config: str, hz: int, arch: Arch = X86_64, localversion: str = "",
             config_file: str | None = None) -> str:
    """The config merged onto tinyconfig: the lab's fragment (or `config_file`'s),
    Debian's timing options, the HZ knob and the local version."""
    with open(os.path.join(FRAGMENT_DIR, config_file or arch.lab_config)) as f:
        base = f.read()
    timing = [line.strip() for line in debian_config.splitlines()
              if line.startswith(TIMING_PREFIXES) and "=" in line]
    hz_lines = [f"CONFIG_HZ_{v}={'y' if v == check_hz(hz) else 'n'}" for v in HZ_VALUES]
    return (base.rstrip("\n") + "\n# how ticks, preemption and grace periods run: "
            "Debian's own config of this kernel\n" + "\n".join(timing)
            + "\n# the knob\n" + "\n".join(hz_lines) + f"\nCONFIG_HZ={hz}\n"
            + f'CONFIG_LOCALVERSION="{localversion}"\nCONFIG_LOCALVERSION_AUTO=n\n')


def parse_config(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        m = re.match(r"(CONFIG_\w+)=(.*)", line)
        if m:
            out[m.group(1)] = m.group(2).strip('"')
    return out


def kconfig_symbols(tree: str) -> set[str]:
    """Every CONFIG_ name the tree's Kconfig files define (an option of the fragment that
    a version does not have, e.g. PROC_SYSCTL gone in 7.x, is not asked of it)."""
    rx = re.compile(r"^\s*(?:menu)?config\s+(\w+)\s*$", re.M)
    out = set()
    for d, _, files in os.walk(tree):
        for f in files:
            if f.startswith("Kconfig"):
                with open(os.path.join(d, f), errors="replace") as fh:
                    out.update("CONFIG_" + m for m in rx.findall(fh.read()))
    return out


def refused(fragment_text: str, config: dict[str, str], arch: Arch = X86_64,
            known: set[str] | None = None, config_file: str | None = None) -> list[str]:
    """The lab's own `=y` options (and the HZ) that the resolved config does not have;
    with `known` (kconfig_symbols), only those this version defines."""
    with open(os.path.join(FRAGMENT_DIR, config_file or arch.lab_config)) as f:
        own = parse_config(f.read())
    want = {k: v for k, v in own.items() if v == "y" and (known is None or k in known)}
    hz = re.search(r"^CONFIG_HZ=(\d+)$", fragment_text, re.M)
    if hz:
        want["CONFIG_HZ"] = hz.group(1)
    return sorted(k for k, v in want.items() if config.get(k) != v)


def first_errors(log: str, n: int = 6) -> list[str]:
    """The first lines of a build log that say what failed."""
    rx = re.compile(r"error:|Error \d|\*\*\* |undefined reference|No rule to make")
    return [l.strip() for l in log.splitlines() if rx.search(l)][:n]


# --- the build ----------------------------------------------------------------------------

@dataclass
class BuiltKernel:
    """A built lab kernel: vmlinuz (the boot image), vmlinux (with symbols, for
    kernel-check), config, build.log and build.json."""
    path: str
    meta: dict
    arch: Arch = X86_64

    def kit(self) -> Kit:
        """As the rest of the lab sees a kernel: a kit with KVM built in, no modules."""
        return Kit(self.path, self.meta["kit"], self.arch)

    @property
    def vmlinux(self) -> str:
        return os.path.join(self.path, "vmlinux")


def ensure_build_tools(log=print, install: bool = True) -> None:
    missing = missing_packages(BUILD_PACKAGES)
    if missing:
        apt_install(missing, log, install, "install a kernel build toolchain by hand "
                    "(make, gcc, flex, bison, bc, libelf-dev, libssl-dev)")


class KernelBuilder(AptUser):
    """Builds lab kernels from the source of a Debian kit's version (its config gives
    the timing options)."""

    flavour = "lab"             # what the kernel is for: its cache entries' first word

    def __init__(self, kit: Kit, log=print, install: bool = True, jobs: int | None = None):
        self.kit, self.arch, self.log, self.install = kit, kit.arch, log, install
        self.series = kit.series
        self.version = kit.meta["version"]
        self.root = os.path.join(cache_dir(), "kbuild")
        self.debs = os.path.join(cache_dir(), "debs")
        self.jobs = jobs or os.cpu_count() or 1

    def debian_config(self) -> str:
        path = os.path.join(self.kit.path, "config")
        if not os.path.exists(path):
            raise LabError(f"{self.kit.meta['package']} {self.version} ships no config: the "
                           "lab copies its timing options from it")
        with open(path) as f:
            return f.read()

    def localversion(self, patch: Patch | None, hz: int) -> str:
        return f"-pyvmm{'-' + patch.name if patch else ''}-hz{hz}"

    @property
    def config_file(self) -> str:
        """The fragment merged onto tinyconfig (beside this module)."""
        return self.arch.lab_config

    def fragment(self, patch: Patch | None, hz: int) -> str:
        text = fragment(self.debian_config(), hz, self.arch, self.localversion(patch, hz),
                        self.config_file)
        extra = patch.config() if patch else {}
        if extra:
            text += f"# what patch {patch.name} turns on\n" + "".join(
                f"{k}={v}\n" for k, v in sorted(extra.items()))
        return text

    def key(self, patch: Patch | None, hz: int) -> str:
        if patch is not None:
            patch = patch.for_series(self.series)   # the text this series builds from
        h = hashlib.sha256()
        h.update(f"recipe {RECIPE}\n".encode())
        h.update(self.fragment(patch, hz).encode())
        h.update((patch.text if patch else "").encode())
        label = (f"{self.arch.kbuild_arch}-" if self.arch.cross_prefix else "") \
            + ("" if self.flavour == "lab" else f"{self.flavour}-") \
            + f"{patch.name if patch else 'stock'}-hz{hz}"
        return os.path.join(self.root, "kernels", f"{self.series}_{self.version}",
                            f"{label}-{h.hexdigest()[:12]}")

    def cached(self, patch: Patch | None, hz: int) -> BuiltKernel | None:
        final = self.key(patch, hz)
        meta = entry_meta(final, self.log)
        return None if meta is None else BuiltKernel(final, meta, self.arch)

    def source(self) -> str:
        """The whole source tree of this version (cached)."""
        final = os.path.join(self.root, "source", f"{self.series}_{self.version}")

        def fill(tmp):
            deb = source_deb(self.apt, self.series, self.version, self.debs,
                             f"no lab kernel can be built for {self.series}")
            self.log(f"unpacking the whole source tree from {os.path.basename(deb)}")
            extract_source(deb, tmp)
        return atomic_dir(os.path.dirname(final), final, fill, ".source-",
                           f"unpacking the {self.series} source tree", self.log)

    def build(self, patch: Patch | None, hz: int) -> BuiltKernel:
        """The built kernel (from the cache when built before)."""
        check_hz(hz)
        if patch is not None:
            patch = patch.for_series(self.series)
            if patch.series and self.series not in patch.series:
                raise LabError(f"patch {patch.name} is for {', '.join(patch.series)}, not "
                               f"{self.series}")
        hit = self.cached(patch, hz)
        if hit:
            return hit
        ensure_build_tools(self.log, self.install)
        if self.arch.cross_prefix:
            from .crosshelper import ensure_cross_tools
            ensure_cross_tools(self.arch, self.log, self.install)
        t0 = time.monotonic()
        src = self.source()
        job = _Job(self, patch, hz, src, time.monotonic() - t0)
        final = self.key(patch, hz)
        parent = os.path.dirname(final)
        os.makedirs(parent, exist_ok=True)
        with locked(final, f"building the lab kernel {job.label}", self.log):
            if self.cached(patch, hz) is None:
                prefix = f".kernel-{os.path.basename(final)}-"
                remove_leftovers(parent, prefix, self.log)
                tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
                try:
                    job.fill(tmp, final)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
        hit = self.cached(patch, hz)
        if hit is None:
            raise LabError(f"the lab kernel {job.label} was built but its cache entry is "
                           f"missing: {final}")
        return hit

    def _patched_tree(self, src: str, tmp: str, patch: Patch) -> str:
        """A hard-linked copy of the source with the patch applied (the files it changes
        copied first, so the cached tree is never written)."""
        tree = os.path.join(tmp, "tree")
        p = subprocess.run(["cp", "-al", src, tree], capture_output=True, text=True)
        if p.returncode != 0:
            raise LabError(f"copying the source tree failed: {p.stderr.strip()[:200]}")
        for rel in patch.files():
            path = os.path.join(tree, rel)
            if os.path.exists(path):
                data = open(path, "rb").read()
                os.unlink(path)
                with open(path, "wb") as f:
                    f.write(data)
                shutil.copystat(os.path.join(src, rel), path)
        apply_patch(patch, tree, tmp)
        return tree


class _Job:
    """One whole-kernel build into a temporary directory, in named steps: the tree
    (patched when the patch has a diff), the config (tinyconfig + the lab's fragment,
    checked against what Kconfig kept), the image, and the cache entry's files and
    build.json. A failing step keeps its log and names it."""

    def __init__(self, builder: "KernelBuilder", patch: Patch | None, hz: int, src: str,
                 fetch_s: float):
        self.b, self.patch, self.hz, self.src, self.fetch_s = builder, patch, hz, src, fetch_s
        self.arch = builder.arch
        self.frag = builder.fragment(patch, hz)
        self.label = (("arm64:" if self.arch.cross_prefix else "")
                      + ("" if builder.flavour == "lab" else f"{builder.flavour} ")
                      + f"{builder.series}{'+' + patch.name if patch else ''}@hz{hz}")
        final = builder.key(patch, hz)
        self.log_keep = os.path.join(builder.root, "logs", f"{os.path.basename(final)}.log")
        os.makedirs(os.path.dirname(self.log_keep), exist_ok=True)
        self.tree = self.out = self.log = ""

    def fill(self, tmp: str, final: str) -> None:
        self.tree = self.src
        if self.patch is not None and self.patch.has_diff():
            self.tree = self.b._patched_tree(self.src, tmp, self.patch)
        self.out = os.path.join(tmp, "out")
        os.makedirs(self.out)
        self.log = os.path.join(tmp, "build.log")
        config, known = self.configure(tmp)
        build_s = self.compile()
        res = self.result(tmp, config, known, build_s)
        try:
            os.replace(res, final)
        except OSError:
            # another lab command built the same entry meanwhile: keep theirs
            if not os.path.exists(os.path.join(final, "build.json")):
                raise

    def make(self, *args, what: str) -> None:
        with open(self.log, "ab") as f:
            p = subprocess.run(["make", "-C", self.tree, f"O={self.out}",
                                *self.arch.make_args, *args], stdout=f, stderr=subprocess.STDOUT)
        if p.returncode != 0:
            shutil.copy(self.log, self.log_keep)
            with open(self.log, errors="replace") as f:
                errs = first_errors(f.read())
            raise LabError(f"building the lab kernel {self.label} failed at {what}:\n  "
                           + "\n  ".join(errs or ["(no error line)"])
                           + f"\nfull log: {self.log_keep}")

    def configure(self, tmp: str) -> tuple[dict, set]:
        """tinyconfig, the lab's fragment merged, olddefconfig; fails when Kconfig
        refused an option the fragment needs. Returns the config and the version's
        Kconfig symbols."""
        frag_path = os.path.join(tmp, "lab.config")
        with open(frag_path, "w") as f:
            f.write(self.frag)
        self.b.log(f"configuring {self.label} (tinyconfig + {self.b.config_file}, "
                   f"HZ={self.hz})")
        self.make("tinyconfig", what="tinyconfig")
        with open(self.log, "ab") as f:
            p = subprocess.run([os.path.join(self.tree, "scripts", "kconfig", "merge_config.sh"),
                                "-m", "-O", self.out, os.path.join(self.out, ".config"),
                                frag_path], stdout=f, stderr=subprocess.STDOUT, cwd=self.tree,
                               env=dict(os.environ, **dict(a.split("=", 1)
                                                          for a in self.arch.make_args)))
        if p.returncode != 0:
            shutil.copy(self.log, self.log_keep)
            raise LabError(f"merging the lab config for {self.label} failed; log: "
                           f"{self.log_keep}")
        self.make("olddefconfig", what="olddefconfig")
        with open(os.path.join(self.out, ".config")) as f:
            config = parse_config(f.read())
        known = kconfig_symbols(self.tree)
        missing = refused(self.frag, config, self.arch, known, self.b.config_file)
        if missing:
            raise LabError(f"the lab kernel {self.label}: Kconfig refused "
                           f"{', '.join(missing)} (dependencies this version lacks); "
                           f"see {self.b.config_file}")
        return config, known

    def compile(self) -> float:
        self.b.log(f"building {self.label} ({self.arch.kernel_target}, make -j{self.b.jobs}; "
                   "a few minutes the first time)")
        tb = time.monotonic()
        self.make(f"-j{self.b.jobs}", self.arch.kernel_target, what=self.arch.kernel_target)
        return time.monotonic() - tb

    def result(self, tmp: str, config: dict, known: set, build_s: float) -> str:
        """The cache entry's files and its build.json, in tmp/result."""
        from ...hostinfo import config_hz, preemption_from_config
        b, out = self.b, self.out
        release = subprocess.run(["make", "-s", "-C", self.tree, f"O={out}",
                                  *self.arch.make_args, "kernelrelease"],
                                 capture_output=True, text=True).stdout.strip()
        res = os.path.join(tmp, "result")
        os.makedirs(res)
        shutil.copy(os.path.join(out, self.arch.kernel_image), os.path.join(res, "vmlinuz"))
        shutil.copy(os.path.join(out, "vmlinux"), os.path.join(res, "vmlinux"))
        shutil.copy(os.path.join(out, ".config"), os.path.join(res, "config"))
        shutil.copy(self.log, os.path.join(res, "build.log"))
        dropped = sorted(k for k, v in parse_config(self.frag).items()
                         if v == "y" and config.get(k) != "y")
        patch = self.patch
        meta = {
            "series": b.series, "version": b.version, "hz": self.hz,
            "patch": patch.name if patch else None,
            "patch_digest": patch.digest if patch else None,
            "patch_files": patch.files() if patch else [],
            "kernel_release": release, "recipe": RECIPE,
            "debian_options_dropped": [k for k in dropped if k in known],
            "options_not_in_version": [k for k in dropped if k not in known],
            "build_s": round(build_s, 1), "fetch_s": round(self.fetch_s, 1),
            "jobs": b.jobs, "built": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "kit": {"package": f"lab build of linux-source-{b.series}",
                    "version": b.version, "kernel_release": release,
                    "modules": [], "module_names": [], "kvm_module_file": None,
                    "kvm_builtin": True, "arch": self.arch.name,
                    "config_hz": config_hz(config),
                    "preemption": preemption_from_config(config),
                    "config_source": f"tinyconfig + {self.b.config_file} + Debian's "
                                     f"timing options, HZ={self.hz}",
                    "vermagic": None, "variant": self.label},
            "files": manifest(res, ["vmlinuz", "vmlinux", "config"]),
        }
        with open(os.path.join(res, "build.json"), "w") as f:
            json.dump(meta, f, indent=1)
        return res

