"""Debian kernel packages for the kernel lab: resolve, download, unpack into a kit.

A *kit* is what the lab boots: the kernel image, its config, and the KVM modules with
everything they depend on, decompressed and in load order. Kits and downloaded packages
live in the cache (PYVMM_CACHE, else $XDG_CACHE_HOME/pyvmm, else ~/.cache/pyvmm); every
cache entry is written under a temporary name and renamed into place, so an interrupted
download or unpack never leaves a half-written entry behind.

Packages come from a private apt state under the cache (its own sources list and
package lists), so the host's apt configuration is neither used nor changed: Debian 12
(bookworm) carries 6.1, Debian 13 (trixie) 6.12, trixie-backports 7.3 and sid 7.2.
From 7.x Debian splits the image package: linux-image-R only depends on linux-binary-R
(vmlinuz), linux-modules-R (the .ko.xz files) and linux-base-R (config, System.map),
so a kernel is a set of packages of one version, unpacked into one tree.
"""

from __future__ import annotations

import functools
import gzip
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
import zlib
from dataclasses import dataclass

from ..errors import LabError  # noqa: F401 (re-exported)

MIRROR = "http://deb.debian.org/debian"
SECURITY = "http://deb.debian.org/debian-security"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
SOURCES = [
    (MIRROR, "bookworm"), (SECURITY, "bookworm-security"),
    (MIRROR, "trixie"), (SECURITY, "trixie-security"), (MIRROR, "trixie-backports"),
    (MIRROR, "sid"),
]
SUITES = "bookworm, trixie, trixie-backports, sid"
# Packages a split (7.x) image depends on that hold its files.
SPLIT_PARTS = ("linux-binary-", "linux-modules-", "linux-base-")
METAPACKAGE = "linux-image-amd64"
LISTS_MAX_AGE_S = 24 * 3600
# The module that makes /dev/kvm inside QEMU's emulated AMD CPU (-cpu EPYC,+svm).
KVM_VENDOR_MODULE = "kvm_amd"
MODULE_EXTS = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")


def cache_dir() -> str:
    base = os.environ.get("PYVMM_CACHE")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(xdg, "pyvmm")
    os.makedirs(base, exist_ok=True)
    return base


# --- ELF and module metadata (pure) ---------------------------------------------------

def _unpack(fmt: str, data: bytes, off: int, what: str) -> tuple:
    if off < 0 or off + struct.calcsize(fmt) > len(data):
        raise LabError(f"truncated or damaged ELF file: its {what} at offset {off:#x} lies "
                       f"beyond the file's {len(data)} bytes")
    return struct.unpack_from(fmt, data, off)


def _elf_ident(data: bytes) -> None:
    if data[:4] != b"\x7fELF":
        raise LabError("not an ELF file")
    if len(data) < 6 or data[4] != 2 or data[5] != 1:
        raise LabError("only 64-bit little-endian ELF files are supported")


def elf_section(data: bytes, name: str) -> bytes | None:
    """Contents of the named section of a 64-bit little-endian ELF file, or None.
    A damaged file raises LabError, never anything else."""
    _elf_ident(data)
    shoff, = _unpack("<Q", data, 0x28, "section header offset")
    shentsize, shnum, shstrndx = _unpack("<HHH", data, 0x3A, "section header counts")
    if shoff == 0 or shnum == 0:
        return None
    if shentsize < 64:
        raise LabError(f"damaged ELF file: section headers of {shentsize} bytes (64 expected)")
    if shstrndx >= shnum:
        raise LabError(f"damaged ELF file: section name table {shstrndx} of {shnum} sections")

    def header(i):
        # sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size
        return _unpack("<IIQQQQ", data, shoff + i * shentsize, f"section header {i}")

    def contents(h, what):
        off, size = h[4], h[5]
        if h[1] == 8:               # SHT_NOBITS: no bytes in the file
            return b""
        if off + size > len(data):
            raise LabError(f"truncated or damaged ELF file: {what} ends at {off + size:#x}, "
                           f"beyond the file's {len(data)} bytes")
        return data[off:off + size]

    names = contents(header(shstrndx), "the section name table")
    want = name.encode()
    for i in range(shnum):
        h = header(i)
        end = names.find(b"\0", h[0])
        if h[0] < len(names) and end >= 0 and names[h[0]:end] == want:
            return contents(h, f"section {name}")
    return None


def elf_is_dynamic(data: bytes) -> bool:
    """True when an ELF executable asks for a program interpreter (is not static)."""
    if data[:4] != b"\x7fELF" or len(data) < 5 or data[4] != 2:
        raise LabError("not a 64-bit ELF file")
    phoff, = _unpack("<Q", data, 0x20, "program header offset")
    phentsize, phnum = _unpack("<HH", data, 0x36, "program header counts")
    if phnum and phentsize < 56:
        raise LabError(f"damaged ELF file: program headers of {phentsize} bytes (56 expected)")
    for i in range(phnum):
        p_type, = _unpack("<I", data, phoff + i * phentsize, f"program header {i}")
        if p_type == 3:     # PT_INTERP
            return True
    return False


def modinfo(data: bytes) -> dict[str, list[str]]:
    """The key=value strings of a module's .modinfo section (keys may repeat)."""
    sec = elf_section(data, ".modinfo")
    info: dict[str, list[str]] = {}
    if sec is None:
        return info
    for item in sec.split(b"\0"):
        if b"=" in item:
            k, v = item.decode(errors="replace").split("=", 1)
            info.setdefault(k, []).append(v)
    return info


def module_depends(data: bytes) -> list[str]:
    vals = modinfo(data).get("depends", [""])
    return [norm_module(d) for d in ",".join(vals).split(",") if d]


def norm_module(name: str) -> str:
    """Module names as the kernel sees them: '-' and '_' are the same."""
    base = os.path.basename(name)
    for ext in MODULE_EXTS:
        if base.endswith(ext):
            base = base[:-len(ext)]
            break
    return base.replace("-", "_")


def decompress_module(path: str) -> bytes:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if path.endswith(".xz"):
            return lzma.decompress(raw)
        if path.endswith(".gz"):
            return gzip.decompress(raw)
    except (lzma.LZMAError, OSError, EOFError, zlib.error) as e:
        raise LabError(f"{os.path.basename(path)} is damaged: cannot decompress it "
                       f"({' '.join(str(e).split())})") from None
    if path.endswith(".zst"):
        if not shutil.which("zstd"):
            raise LabError(f"{os.path.basename(path)} is zstd-compressed and zstd is not "
                           "installed: apt-get install zstd")
        p = subprocess.run(["zstd", "-dc", path], capture_output=True)
        if p.returncode != 0:
            raise LabError(f"{os.path.basename(path)} is damaged: zstd cannot decompress it")
        return p.stdout
    return raw


def load_order(root: str, deps: dict[str, list[str]]) -> list[str]:
    """Modules needed by `root`, dependencies first. Raises on a missing module or a cycle."""
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(m: str, chain: tuple[str, ...]):
        if state.get(m) == 2:
            return
        if state.get(m) == 1:
            raise LabError(f"module dependency cycle: {' -> '.join(chain + (m,))}")
        if m not in deps:
            via = f" (needed by {chain[-1]})" if chain else ""
            raise LabError(f"module {m}{via} is not in the kernel package")
        state[m] = 1
        for d in deps[m]:
            visit(d, chain + (m,))
        state[m] = 2
        order.append(m)

    visit(root, ())
    return order


# --- Debian versions (pure) ------------------------------------------------------------

def _order(c: str) -> int:
    if c == "~":
        return -1
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


def _cmp_part(a: str, b: str) -> int:
    while a or b:
        na = re.match(r"[^\d]*", a).group()
        nb = re.match(r"[^\d]*", b).group()
        for i in range(max(len(na), len(nb))):
            ca = _order(na[i]) if i < len(na) else 0
            cb = _order(nb[i]) if i < len(nb) else 0
            if ca != cb:
                return -1 if ca < cb else 1
        a, b = a[len(na):], b[len(nb):]
        da = re.match(r"\d*", a).group()
        db = re.match(r"\d*", b).group()
        if int(da or 0) != int(db or 0):
            return -1 if int(da or 0) < int(db or 0) else 1
        a, b = a[len(da):], b[len(db):]
    return 0


def compare_versions(a: str, b: str) -> int:
    """Debian version comparison (epoch, upstream, revision), as dpkg does it."""
    def split(v):
        epoch, _, rest = v.partition(":") if ":" in v else ("0", "", v)
        if not epoch.isdigit():
            raise LabError(f"{' '.join(v.split())[:60]!r} is not a Debian version "
                           "(the epoch before ':' must be a number)")
        up, _, rev = rest.rpartition("-") if "-" in rest else (rest, "", "0")
        return int(epoch), up, rev
    ea, ua, ra = split(a)
    eb, ub, rb = split(b)
    if ea != eb:
        return -1 if ea < eb else 1
    return _cmp_part(ua, ub) or _cmp_part(ra, rb)


def parse_records(text: str) -> list[dict[str, str]]:
    """Split `apt-cache show` output into one dict per package record."""
    records, cur, key = [], {}, None
    for line in text.splitlines():
        if not line.strip():
            if cur:
                records.append(cur)
            cur, key = {}, None
        elif line[0] in " \t" and key:
            cur[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, val = line.partition(":")
            cur[key] = val.strip()
    if cur:
        records.append(cur)
    return records


@dataclass(frozen=True)
class KernelPackage:
    name: str           # e.g. linux-image-6.1.0-50-amd64
    version: str        # e.g. 6.1.176-1
    series: str         # e.g. 6.1

    @property
    def filename(self) -> str:
        return f"{self.name}_{self.version.replace(':', '%3a')}_amd64.deb"


def _image_dep(depends: str) -> str | None:
    """The versioned linux-image-R package a metapackage depends on (7.x lists
    linux-base-amd64 first)."""
    for part in depends.split(","):
        m = re.match(r"\s*(linux-image-[\w.+-]+)", part)
        if m and m.group(1) != METAPACKAGE:
            return m.group(1)
    return None


def pick_kernel(records: list[dict[str, str]], series: str) -> KernelPackage:
    """From metapackage records, the newest whose version is in `series` (e.g. '6.1'),
    or the newest of all for 'latest'."""
    found = []
    for r in records:
        ver = r.get("Version", "")
        upstream = ver.split(":")[-1]
        if series != "latest" and not upstream.startswith(series + "."):
            continue
        name = _image_dep(r.get("Depends", ""))
        if name:
            found.append(KernelPackage(name, ver, ".".join(upstream.split(".")[:2])))
    if not found:
        have = sorted({m.group(0) for r in records
                       if (m := re.match(r"\d+\.\d+", r.get("Version", "").split(":")[-1]))},
                      key=lambda v: tuple(int(x) for x in v.split(".")))
        raise LabError(f"unknown kernel version '{series}': the Debian archives offer "
                       f"{', '.join(have) or 'none'}; give one of those, 'latest' or a path "
                       "to a linux-image .deb")
    return max(found, key=functools.cmp_to_key(lambda a, b: compare_versions(a.version,
                                                                            b.version)))


def split_parts(depends: str, version: str) -> list[str]:
    """The linux-binary/modules/base packages of a split image record, pinned to its
    version (empty for an image package that holds everything itself)."""
    out = []
    for part in depends.split(","):
        for alt in part.split("|"):
            m = re.match(r"\s*([\w.+-]+)\s*(?:\(=\s*([^)]+)\))?", alt)
            if m and m.group(1).startswith(SPLIT_PARTS) and (m.group(2) or version) == version:
                out.append(m.group(1))
    return out


KERNEL_SPEC_FORMS = ("a Debian series such as 6.1, 6.12, 7.2 or 7.3, 'latest' (the newest "
                     "in the archives), or a path to a linux-image .deb")


def check_spec(spec: str) -> str:
    """Validate a kernel spec without touching the network or the disk beyond a stat;
    returns it normalised. Raises LabError naming the accepted forms."""
    spec = spec.strip()
    if spec.endswith(".deb") or os.sep in spec:
        if not os.path.isfile(spec):
            raise LabError(f"kernel package {spec} does not exist")
        return spec
    if spec == "latest" or re.fullmatch(r"\d+\.\d+", spec):
        return spec
    raise LabError(f"unknown kernel version '{spec}': give {KERNEL_SPEC_FORMS}")


# --- apt (private state) ----------------------------------------------------------------

class Apt:
    def __init__(self, root: str | None = None, log=print):
        self.root = root or os.path.join(cache_dir(), "apt")
        self.log = log
        for d in ("lists/partial", "cache/archives/partial", "etc"):
            os.makedirs(os.path.join(self.root, d), exist_ok=True)
        self.sources = os.path.join(self.root, "etc", "sources.list")
        text = "".join(f"deb [signed-by={KEYRING}] {url} {suite} main\n" for url, suite in SOURCES)
        if not os.path.exists(self.sources) or open(self.sources).read() != text:
            with open(self.sources + ".tmp", "w") as f:
                f.write(text)
            os.replace(self.sources + ".tmp", self.sources)
            try:                # new suites: the lists must be fetched again
                os.unlink(self._stamp)
            except FileNotFoundError:
                pass

    def _opts(self) -> list[str]:
        r = self.root
        return ["-o", f"Dir::Etc::SourceList={self.sources}", "-o", "Dir::Etc::SourceParts=-",
                "-o", f"Dir::State::Lists={r}/lists", "-o", f"Dir::Cache={r}/cache",
                "-o", "Dir::State::Status=/dev/null", "-o", "APT::Architecture=amd64",
                "-o", "Debug::NoLocking=1", "-o", "APT::Sandbox::User=root"]

    def _run(self, args: list[str], what: str, cwd: str | None = None) -> str:
        if not shutil.which(args[0]):
            raise LabError(f"{args[0]} not found: the lab fetches kernels from Debian with apt; "
                           "on a non-Debian host pass --kernel PATH.deb")
        p = subprocess.run([args[0]] + self._opts() + args[1:], cwd=cwd, capture_output=True,
                           text=True)
        if p.returncode != 0:
            tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-5:])
            raise LabError(f"apt could not {what}:\n{tail}")
        return p.stdout

    @property
    def _stamp(self) -> str:
        return os.path.join(self.root, "updated")

    def lists_age(self) -> float | None:
        """Seconds since the last successful update (apt keeps the server's mtimes on
        the list files, so a stamp file of our own tells the age)."""
        try:
            return time.time() - os.path.getmtime(self._stamp)
        except OSError:
            return None

    def update(self, force: bool = False) -> None:
        age = self.lists_age()
        if not force and age is not None and age < LISTS_MAX_AGE_S:
            return
        self.log(f"updating the lab's package lists ({SUITES})")
        try:
            self._run(["apt-get", "update", "-q"], "update the package lists from "
                      f"{MIRROR} (is deb.debian.org reachable?)")
            with open(self._stamp, "w") as f:
                f.write(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
        except LabError:
            if age is None:
                raise
            self.log("  update failed; using the lists from the last update")

    def metapackage_records(self) -> list[dict[str, str]]:
        return parse_records(self._run(["apt-cache", "show", METAPACKAGE],
                                       f"find {METAPACKAGE} in the package lists"))

    def record(self, name: str, version: str) -> dict[str, str]:
        """The package record of NAME at VERSION."""
        recs = parse_records(self._run(["apt-cache", "show", f"{name}={version}"],
                                       f"find {name} {version} in the package lists"))
        if not recs:
            raise LabError(f"{name} {version} is not in the package lists")
        return recs[0]

    def download_named(self, name: str, version: str, dest_dir: str) -> str:
        """Download NAME=VERSION into dest_dir, unless a finished copy is there."""
        os.makedirs(dest_dir, exist_ok=True)
        have = cached_deb(dest_dir, name, version)
        if have:
            return have
        tmp = tempfile.mkdtemp(prefix=".download-", dir=dest_dir)
        try:
            self._run(["apt-get", "download", "-q", f"{name}={version}"],
                      f"download {name} {version}", cwd=tmp)
            debs = [f for f in os.listdir(tmp) if f.endswith(".deb")]
            if len(debs) != 1:
                raise LabError(f"apt-get download of {name} left {debs!r}, expected one .deb")
            final = os.path.join(dest_dir, debs[0])
            os.replace(os.path.join(tmp, debs[0]), final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final


def cached_deb(folder: str, name: str, version: str) -> str | None:
    """The finished download of NAME=VERSION in `folder` (any architecture), or None."""
    stem = f"{name}_{version.replace(':', '%3a')}_"
    try:
        have = sorted(f for f in os.listdir(folder) if f.startswith(stem) and f.endswith(".deb"))
    except FileNotFoundError:
        return None
    return os.path.join(folder, have[0]) if have else None


@dataclass(frozen=True)
class KernelDebs:
    """The packages of one kernel: the image package first, then (7.x) its parts."""
    image: str
    parts: tuple[str, ...] = ()
    package: KernelPackage | None = None

    @property
    def all(self) -> list[str]:
        return [self.image, *self.parts]


def resolve(spec: str, log=print) -> KernelDebs:
    """A kernel spec ('6.1', '7.3', 'latest' or PATH.deb) to local .deb paths
    (downloading them)."""
    spec = check_spec(spec)
    if spec.endswith(".deb") or os.sep in spec:
        return KernelDebs(os.path.abspath(spec))
    apt = Apt(log=log)
    apt.update()
    try:
        pkg = pick_kernel(apt.metapackage_records(), spec)
    except LabError:
        apt.update(force=True)      # maybe the lists are stale: retry once, and say so
        log("  retrying with fresh package lists")
        pkg = pick_kernel(apt.metapackage_records(), spec)
    debs = os.path.join(cache_dir(), "debs")
    rec = apt.record(pkg.name, pkg.version)
    parts = split_parts(rec.get("Depends", ""), pkg.version)
    names = [pkg.name] + parts
    cached = all(cached_deb(debs, n, pkg.version) for n in names)
    log(f"kernel {spec}: {pkg.name} {pkg.version}" + (f" + {len(parts)} parts" if parts else "")
        + (" (cached)" if cached else " (downloading)"))
    paths = [apt.download_named(n, pkg.version, debs) for n in names]
    return KernelDebs(paths[0], tuple(paths[1:]), pkg)


# --- kits -------------------------------------------------------------------------------

@dataclass
class Kit:
    path: str
    meta: dict

    @property
    def vmlinuz(self) -> str:
        return os.path.join(self.path, "vmlinuz")

    @property
    def kvm_ko(self) -> str:
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


def build_kit(debs: KernelDebs | str, log=print) -> Kit:
    """Unpack the kernel image, config and KVM modules of a kernel's packages (cached)."""
    if isinstance(debs, str):
        debs = KernelDebs(debs)
    if not shutil.which("dpkg-deb"):
        raise LabError("dpkg-deb not found: it unpacks the kernel package (apt-get install dpkg)")
    deb = debs.image
    name, version = _deb_field(deb, "Package"), _deb_field(deb, "Version")
    kits = os.path.join(cache_dir(), "kits")
    final = os.path.join(kits, re.sub(r"[^\w.+-]", "_", f"{name}_{version}"))
    if os.path.exists(os.path.join(final, "kit.json")):
        with open(os.path.join(final, "kit.json")) as f:
            return Kit(final, json.load(f))
    os.makedirs(kits, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".kit-", dir=kits)
    try:
        x = os.path.join(tmp, "x")
        for d in debs.all:
            log(f"unpacking {os.path.basename(d)}")
            p = subprocess.run(["dpkg-deb", "-x", d, x], capture_output=True, text=True)
            if p.returncode != 0:
                raise LabError(f"dpkg-deb could not unpack {d}: {p.stderr.strip()}")
        meta = _assemble_kit(x, tmp, name, version)
        shutil.rmtree(x)
        with open(os.path.join(tmp, "kit.json"), "w") as f:
            json.dump(meta, f, indent=1)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Kit(final, meta)


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


def _assemble_kit(x: str, out: str, name: str, version: str) -> dict:
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
                       "the lab needs a package that ships kvm.ko and kvm-amd.ko")
    paths: dict[str, str] = {}
    for d, _, files in os.walk(mod_root):
        for f in files:
            if f.endswith(MODULE_EXTS):
                paths.setdefault(norm_module(f), os.path.join(d, f))
    if "kvm" not in paths or KVM_VENDOR_MODULE not in paths:
        builtin = ""
        bpath = os.path.join(mod_root, "modules.builtin")
        if os.path.exists(bpath) and "kvm.ko" in open(bpath).read():
            builtin = " (KVM is built into this kernel; the lab expects modules)"
        raise LabError(f"{name} {version} has no kvm and kvm-amd modules{builtin}")
    data: dict[str, bytes] = {}
    deps: dict[str, list[str]] = {}

    def load(m):
        if m not in data and m in paths:
            data[m] = decompress_module(paths[m])
            deps[m] = module_depends(data[m])
            for d in deps[m]:
                load(d)
    load(KVM_VENDOR_MODULE)
    order = load_order(KVM_VENDOR_MODULE, deps)
    os.makedirs(os.path.join(out, "modules"))
    files = []
    for i, m in enumerate(order):
        fname = f"{i:02d}-{m}.ko"
        with open(os.path.join(out, "modules", fname), "wb") as f:
            f.write(data[m])
        files.append(fname)
    from ..hostinfo import config_hz, preemption_from_config
    return {"package": name, "version": version, "kernel_release": release,
            "modules": files, "module_names": order,
            "kvm_module_file": files[order.index("kvm")],
            "config_hz": config_hz(config), "preemption": preemption_from_config(config),
            "config_source": f"{name} {version}: {os.path.relpath(cfg_path, x)}"
            if cfg_path else f"{name} {version}: no config",
            "vermagic": (modinfo(data["kvm"]).get("vermagic") or [""])[0]}
