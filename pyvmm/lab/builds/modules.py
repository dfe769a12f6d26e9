"""Rebuilt KVM modules for a lab kernel, with one of the project's patches applied.

kvm.ko and kvm-amd.ko are built out of tree against Debian's headers package of the
same kernel (linux-headers-R + -common + linux-kbuild-S), from the matching
linux-source-S, with the compiler that built the kernel. Only virt/kvm, arch/x86/kvm
and include/linux/kvm_host.h are taken from the source tarball; the patched copy of
kvm_host.h is put ahead of the headers' own on the include path, so a patch may change
structs that only the two KVM modules use.

Everything downloaded, unpacked or built is cached under <cache>/modbuild, each entry
written under a temporary name and renamed when complete, so a second run rebuilds
nothing and an interrupted or failed build leaves nothing half-built behind. A build is
keyed by kernel release, package version and the patch's content (a changed patch is a
new build).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass

from ...errors import LabError
from ..sources.apt import Apt
from ..sources.cache import atomic_dir, cache_dir, manifest, whole_entry
from ..sources.elf import modinfo
from ..sources.kits import Kit
from ..arch import X86_64, Arch
from .patch import Patch, check_patch_scope, patch_failure

# tool -> Debian package
TOOLS = {"make": "make", "patch": "patch", "tar": "tar", "xz": "xz-utils"}


# --- headers (pure) -------------------------------------------------------------------------

def header_packages(depends: str) -> list[str]:
    """The -common headers and linux-kbuild packages an arch headers package needs."""
    out = []
    for part in depends.split(","):
        m = re.match(r"\s*([\w.+-]+)", part)
        if m and (m.group(1).startswith("linux-kbuild-") or
                  (m.group(1).startswith("linux-headers-") and m.group(1).endswith("-common"))):
            out.append(m.group(1))
    return out


def kernel_cc(kernelvariables: str) -> str:
    """The compiler a Debian headers package says the kernel was built with."""
    for line in kernelvariables.splitlines():
        m = re.match(r"\s*CC\s*=\s*(.*)", line)
        if m:
            words = [w for w in m.group(1).split() if not w.startswith("$(")]
            for w in words:
                w = w.replace("$(CROSS_COMPILE)", "")
                if w:
                    return w
            tail = m.group(1).rsplit(")", 1)[-1].strip()
            if tail:
                return tail
    return "gcc"


def kbuild_file(makefile: str, tree: str, config: dict[str, str] | None = None,
                kvm_dir: str = X86_64.kvm_dir) -> str:
    """The module directory's Kbuild: the source's Makefile with $(srctree) pointing at
    our tree, and our include directories ahead of the headers' (the patched kvm_host.h;
    a directory two levels down so that trace.h's relative TRACE_INCLUDE_PATH finds
    arch/x86/kvm)."""
    # Options the kernel was built without but the patch turns on: the Makefile sees them
    # from make's command line, the C code from these defines (autoconf.h lacks them).
    defines = "".join(f"ccflags-y += -D{k}=1\n" for k in sorted(config or {}))
    return (f"# written by pyvmm: {kvm_dir}/Makefile with $(srctree) -> {tree}\n"
            f"LINUXINCLUDE := -I{tree}/include -I{tree}/.pyvmm/inc $(LINUXINCLUDE)\n"
            + defines + makefile.replace("$(srctree)", tree))


# --- the build ---------------------------------------------------------------------------

@dataclass
class BuiltModules:
    path: str
    meta: dict
    arch: Arch = X86_64

    def module(self, name: str) -> str:
        return os.path.join(self.path, self.arch.built[name])


def _run(cmd: list[str], what: str, cwd: str | None = None, log_path: str | None = None):
    if log_path:
        with open(log_path, "ab") as f:
            p = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
    else:
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if p.returncode != 0:
        tail = "" if log_path else "\n".join((p.stderr or p.stdout).strip().splitlines()[-5:])
        raise LabError(f"{what} failed (exit {p.returncode})" + (f":\n{tail}" if tail else ""))
    return p


def check_tools(cc: str | None = None) -> None:
    missing = sorted({pkg for tool, pkg in TOOLS.items() if not shutil.which(tool)})
    if cc and not shutil.which(cc):
        missing.append(cc if cc.startswith("gcc-") else "build-essential")
    if missing:
        raise LabError("building KVM modules needs " + ", ".join(missing) +
                       f": apt-get install {' '.join(missing)} (or scripts/lab-tools.sh "
                       "--install)")


def entry_meta(final: str, log=print) -> dict | None:
    """A build's build.json, if the build is whole (cache.whole_entry)."""
    return whole_entry(final, "build.json", "build|building it again", log)


class AptUser:
    """A builder's private apt state, updated the first time it is needed."""
    log = print
    arch: Arch = X86_64
    _apt: Apt | None = None

    @property
    def apt(self) -> Apt:
        if self._apt is None:
            self._apt = Apt(log=self.log, arch=self.arch)
            self._apt.update()
        return self._apt


class ModuleBuilder(AptUser):
    def __init__(self, kit: Kit, log=print):
        self.kit = kit
        self.arch = kit.arch
        self.log = log
        self.release = kit.meta["kernel_release"]
        self.version = kit.meta["version"]
        self.root = os.path.join(cache_dir(), "modbuild")
        self.debs = os.path.join(cache_dir(), "debs")

    def key(self, patch: Patch) -> str:
        return os.path.join(self.root, "modules", f"{self.release}_{self.version}",
                            f"{patch.name}-{patch.digest}")

    def cached(self, patch: Patch) -> BuiltModules | None:
        final = self.key(patch)
        meta = entry_meta(final, self.log)
        return None if meta is None else BuiltModules(final, meta, self.arch)

    # Each step below is cached on its own.
    def headers(self) -> str:
        final = os.path.join(self.root, "headers", f"{self.release}_{self.version}")

        def fill(tmp):
            name = f"linux-headers-{self.release}"
            rec = self.apt.record(name, self.version)
            names = [name] + header_packages(rec.get("Depends", ""))
            for n in names:
                deb = self.apt.download_named(n, self.version, self.debs)
                self.log(f"unpacking {os.path.basename(deb)}")
                _run(["dpkg-deb", "-x", deb, tmp], f"unpacking {os.path.basename(deb)}")
            arch = os.path.join(tmp, "usr", "src", name)
            mk = os.path.join(arch, "Makefile")
            if not os.path.exists(mk):
                raise LabError(f"{name} {self.version} holds no usr/src/{name}/Makefile")
            # Debian's arch Makefile includes the -common tree by absolute /usr/src path.
            text = open(mk).read()
            fixed = re.sub(r"include\s+/usr/src/", f"include {final}/usr/src/", text)
            with open(mk, "w") as f:
                f.write(fixed)
        atomic_dir(os.path.dirname(final), final, fill, ".headers-",
                    f"unpacking the headers of {self.release}", self.log)
        return os.path.join(final, "usr", "src", f"linux-headers-{self.release}")

    def source(self) -> str:
        series = self.kit.series
        final = os.path.join(self.root, "source", f"{series}_{self.version}")

        def fill(tmp):
            deb = source_deb(self.apt, series, self.version, self.debs,
                             f"the modules of {self.release} cannot be rebuilt")
            self.log(f"extracting {', '.join(self.arch.source_subset)} from "
                     f"{os.path.basename(deb)}")
            extract_source(deb, tmp, self.arch.source_subset)
        atomic_dir(os.path.dirname(final), final, fill, ".source-",
                    f"unpacking the KVM source of {self.release}", self.log)
        return final

    def build(self, patch: Patch) -> BuiltModules:
        """The rebuilt modules (from the cache when built before)."""
        patch = patch.for_series(self.kit.series)
        if patch.series and self.kit.series not in patch.series:
            raise LabError(f"patch {patch.name} is for {', '.join(patch.series)}, not "
                           f"{self.kit.series} ({self.release})")
        check_patch_scope(patch, self.arch)
        hit = self.cached(patch)
        if hit:
            return hit
        t0 = time.monotonic()
        hdr = self.headers()
        with open(os.path.join(hdr, ".kernelvariables")) as f:
            cc = kernel_cc(f.read())
        check_tools(cc)
        src = self.source()
        t_fetch = time.monotonic() - t0
        final = self.key(patch)
        log_keep = os.path.join(self.root, "logs", f"{self.release}-{patch.name}.log")
        os.makedirs(os.path.dirname(log_keep), exist_ok=True)

        def fill(tmp):
            tree = os.path.join(tmp, "tree")
            for p in self.arch.source_subset:
                dst = os.path.join(tree, p)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                (shutil.copytree if os.path.isdir(os.path.join(src, p)) else shutil.copy)(
                    os.path.join(src, p), dst)
            os.makedirs(os.path.join(tree, ".pyvmm", "inc"))
            if patch.has_diff():
                apply_patch(patch, tree, tmp)
            kdir = os.path.join(tree, self.arch.kvm_dir)
            config = patch.config()
            with open(os.path.join(kdir, "Makefile")) as f:
                kb = kbuild_file(f.read(), tree, config, self.arch.kvm_dir)
            with open(os.path.join(kdir, "Kbuild"), "w") as f:
                f.write(kb)
            log = os.path.join(tmp, "build.log")
            self.log(f"building {' and '.join(self.arch.built.values())} for {self.release} "
                     f"with {cc} "
                     f"(patch {patch.name})")
            tb = time.monotonic()
            try:
                _run(["make", "-C", hdr, f"M={kdir}", f"-j{os.cpu_count() or 1}",
                      *self.arch.build_disable,
                      *(f"{k}={v}" for k, v in sorted(config.items())),
                      "modules"], "make", log_path=log)
            except LabError:
                shutil.copy(log, log_keep)
                errs = [l for l in open(log, errors="replace").read().splitlines()
                        if "error" in l.lower()][:5]
                raise LabError(f"building the KVM modules of {self.release} with patch "
                               f"{patch.name} failed:\n" + "\n".join(errs or ["(no error line)"])
                               + f"\nfull log: {log_keep}") from None
            build_s = time.monotonic() - tb
            want = self.kit_vermagic()
            for mod, fname in self.arch.built.items():
                built = os.path.join(kdir, fname)
                with open(built, "rb") as f:
                    vm = (modinfo(f.read()).get("vermagic") or [""])[0]
                if want and vm != want:
                    raise LabError(f"rebuilt {fname} has vermagic '{vm}' but the kernel's is "
                                   f"'{want}': it would not load")
                # Debug info is most of an unstripped module (18 MB of kvm.ko); the
                # initramfs does not need it, and Debian strips its own the same way.
                dst = os.path.join(tmp, fname)
                if shutil.which("strip"):
                    _run(["strip", "--strip-debug", "-o", dst, built], f"strip {fname}")
                else:
                    shutil.copy(built, dst)
            shutil.rmtree(tree)             # build.log stays beside the modules
            meta = {"patch": patch.name, "patch_digest": patch.digest, "config": config,
                    "patch_files": patch.files(), "summary": patch.summary,
                    "kernel_release": self.release, "version": self.version, "cc": cc,
                    "vermagic": want, "build_s": round(build_s, 1),
                    "fetch_s": round(t_fetch, 1),
                    "built": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "files": manifest(tmp, list(self.arch.built.values()))}
            with open(os.path.join(tmp, "build.json"), "w") as f:
                json.dump(meta, f, indent=1)
        atomic_dir(os.path.dirname(final), final, fill, ".build-",
                    f"building the KVM modules of {self.release} with {patch.name}", self.log)
        hit = self.cached(patch)
        assert hit is not None
        return hit

    def kit_vermagic(self) -> str:
        vm = self.kit.meta.get("vermagic")
        if vm is None:
            with open(self.kit.kvm_ko, "rb") as f:
                vm = (modinfo(f.read()).get("vermagic") or [""])[0]
        return vm


def apply_patch(patch: Patch, tree: str, workdir: str) -> None:
    """Apply the patch to `tree` (-p1): a dry run first, so that one that does not apply
    changes nothing and is named with its file and hunk."""
    pf = os.path.join(workdir, f"{patch.name}.patch")
    with open(pf, "w") as f:
        f.write(patch.text)
    for dry in (True, False):
        p = subprocess.run(["patch", "-p1", "--forward", "--batch", "-i", pf]
                           + (["--dry-run"] if dry else []), cwd=tree,
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise LabError(patch_failure(p.stdout + p.stderr, patch.name))


def source_deb(apt: Apt, series: str, version: str, debs: str, what: str) -> str:
    """Debian's linux-source-SERIES at VERSION, downloaded into `debs` (cached)."""
    name = f"linux-source-{series}"
    try:
        return apt.download_named(name, version, debs)
    except LabError as e:
        raise LabError(f"no {name} {version} in the archives, so {what}: {e}") from None


def extract_source(deb: str, dest: str, subset: tuple[str, ...] = ()) -> None:
    """The kernel tree inside a linux-source .deb into `dest` (only `subset` when given)."""
    x = os.path.join(dest, ".deb")
    _run(["dpkg-deb", "-x", deb, x], f"unpacking {os.path.basename(deb)}")
    src = os.path.join(x, "usr", "src")
    tars = [f for f in os.listdir(src) if f.startswith("linux-source") and ".tar" in f]
    if not tars:
        raise LabError(f"{os.path.basename(deb)} holds no source tarball")
    top = tars[0].split(".tar")[0]
    _run(["tar", "-xf", os.path.join(src, tars[0]), "-C", dest, "--strip-components=1"]
         + [f"{top}/{p}" for p in subset], "extracting the kernel source")
    shutil.rmtree(x)


def kit_modules(kit: Kit, built: BuiltModules | None) -> dict[str, bytes]:
    """File name -> contents of the modules the lab loads, in order: the kit's own, with
    kvm and kvm_amd swapped for the rebuilt ones when there are."""
    out = {}
    for path, name in zip(kit.modules(), kit.module_names()):
        src = built.module(name) if built is not None and name in kit.arch.built else path
        with open(src, "rb") as f:
            out[os.path.basename(path)] = f.read()
    return out
