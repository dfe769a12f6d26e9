"""Debian's kernel packages for the lab, fetched through a private apt state under the
cache (its own sources list and package lists), so the host's apt configuration is
neither used nor changed: Debian 12 (bookworm) carries 6.1, Debian 13 (trixie) 6.12,
trixie-backports 7.3 and sid 7.2. From 7.x Debian splits the image package:
linux-image-R only depends on linux-binary-R (vmlinuz), linux-modules-R (the .ko.xz
files) and linux-base-R (config, System.map), so a kernel is a set of packages of one
version, fetched together.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass

from ...errors import LabError, disk_full
from ..arch import X86_64, Arch
from .cache import cache_dir, locked, remove_leftovers, sha256_file
from .debian import KernelPackage, check_spec, parse_records, pick_kernel, split_parts

MIRROR = "http://deb.debian.org/debian"
SECURITY = "http://deb.debian.org/debian-security"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
SOURCES = [
    (MIRROR, "bookworm"), (SECURITY, "bookworm-security"),
    (MIRROR, "trixie"), (SECURITY, "trixie-security"), (MIRROR, "trixie-backports"),
    (MIRROR, "sid"),
]
SUITES = "bookworm, trixie, trixie-backports, sid"
LISTS_MAX_AGE_S = 24 * 3600
# what this process already asked apt (keyed by the lists' update stamp), as text and as
# records, and the .debs it found sound: `lab remedies` readies its kernels some 200
# times in one run
_ASKED: dict[tuple, str] = {}
_SHOWN: dict[tuple, list[dict[str, str]]] = {}
_SOUND: set[tuple] = set()


class Apt:
    """apt-get and apt-cache on the lab's own state, for one architecture's packages."""

    def __init__(self, root: str | None = None, log=print, arch: Arch = X86_64):
        self.arch = arch
        self.root = root or os.path.join(
            cache_dir(), "apt" if arch == X86_64 else f"apt-{arch.debian}")
        self.log = log
        for d in ("lists/partial", "cache/archives/partial", "etc"):
            os.makedirs(os.path.join(self.root, d), exist_ok=True)
        self.sources = os.path.join(self.root, "etc", "sources.list")
        text = "".join(f"deb [signed-by={KEYRING}] {url} {suite} main\n" for url, suite in SOURCES)
        if not os.path.exists(self.sources) or open(self.sources).read() != text:
            # a name of this process's own: two lab runs starting on an empty cache write
            # it at once, and one's rename must not take the other's file away
            tmp = f"{self.sources}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, self.sources)
            try:                # new suites: the lists must be fetched again
                os.unlink(self._stamp)
            except FileNotFoundError:
                pass

    def _opts(self) -> list[str]:
        r = self.root
        return ["-o", f"Dir::Etc::SourceList={self.sources}", "-o", "Dir::Etc::SourceParts=-",
                "-o", f"Dir::State::Lists={r}/lists", "-o", f"Dir::Cache={r}/cache",
                "-o", "Dir::State::Status=/dev/null", "-o", f"APT::Architecture={self.arch.debian}",
                "-o", "Debug::NoLocking=1", "-o", "APT::Sandbox::User=root"]

    def _run(self, args: list[str], what: str, cwd: str | None = None) -> str:
        if not shutil.which(args[0]):
            raise LabError(f"{args[0]} not found: the lab fetches kernels from Debian with apt; "
                           "on a non-Debian host pass --kernel PATH.deb")
        p = subprocess.run([args[0]] + self._opts() + args[1:], cwd=cwd, capture_output=True,
                           text=True)
        if p.returncode != 0:
            out = (p.stderr or p.stdout).strip()
            if "No space left on device" in out:
                raise disk_full(os.path.join(cwd or self.root, "apt"), None,
                                "nothing half-downloaded is kept")
            tail = "\n".join(out.splitlines()[-5:])
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
        with locked(os.path.join(self.root, "lists"), "updating the lab's package lists",
                    self.log):
            if not force and (self.lists_age() or LISTS_MAX_AGE_S) < LISTS_MAX_AGE_S:
                return              # another command updated them while this one waited
            self._update(age)

    def _update(self, age: float | None) -> None:
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

    def _lists_key(self) -> tuple:
        try:
            return (self.root, os.stat(self._stamp).st_mtime_ns)
        except OSError:
            return (self.root, None)

    def query(self, args: list[str], what: str) -> str:
        """The output of a read-only apt command (apt-cache show, apt-get --simulate),
        remembered in this process until the lists change: each one reads every
        suite's lists, over a second, and `lab remedies` asks the same ones some 200
        times in a run."""
        key = (*self._lists_key(), *args)
        if key not in _ASKED:
            _ASKED[key] = self._run(args, what)
        return _ASKED[key]

    def _show(self, args: list[str], what: str) -> list[dict[str, str]]:
        """`apt-cache show ARGS` as records (remembered, see `query`)."""
        key = (*self._lists_key(), "show", *args)
        if key not in _SHOWN:
            _SHOWN[key] = parse_records(self.query(["apt-cache", "show", *args], what))
        return [dict(r) for r in _SHOWN[key]]

    def metapackage_records(self) -> list[dict[str, str]]:
        meta = self.arch.image_metapackage
        return self._show([meta], f"find {meta} in the package lists")

    def records(self, name: str) -> list[dict[str, str]]:
        """Every version of package NAME the lists hold."""
        return self._show([name], f"find {name} in the package lists")

    def prefetch(self, pairs: list[tuple[str, str]]) -> None:
        """The records of several NAME=VERSION in one apt-cache call, remembered for
        `record` (a 7.x kernel is four packages)."""
        todo = [(n, v) for n, v in pairs
                if (*self._lists_key(), "show", f"{n}={v}") not in _SHOWN]
        if len(todo) < 2:
            return
        recs = self._show([f"{n}={v}" for n, v in todo],
                          "find " + ", ".join(f"{n} {v}" for n, v in todo)
                          + " in the package lists")
        for n, v in todo:
            mine = [r for r in recs if r.get("Package") == n and r.get("Version") == v]
            if mine:
                _SHOWN[(*self._lists_key(), "show", f"{n}={v}")] = mine

    def record(self, name: str, version: str) -> dict[str, str]:
        """The package record of NAME at VERSION."""
        recs = self._show([f"{name}={version}"],
                          f"find {name} {version} in the package lists")
        if not recs:
            raise LabError(f"{name} {version} is not in the package lists")
        return recs[0]

    def download_named(self, name: str, version: str, dest_dir: str) -> str:
        """Download NAME=VERSION into dest_dir, unless a finished copy is there; a copy is
        checked against the size and SHA-256 the package index gives (before it is used,
        and after it is fetched), and a damaged one is fetched again."""
        os.makedirs(dest_dir, exist_ok=True)
        with locked(os.path.join(dest_dir, f".{name}_{version.replace(':', '%3a')}"),
                    f"downloading {name} {version}", self.log):
            have = cached_deb(dest_dir, name, version)
            if have:
                problem = self.check_deb(have, name, version)
                if problem is None:
                    return have
                self.log(f"the cached {os.path.basename(have)} is damaged ({problem}): "
                         "fetching it again")
                os.unlink(have)
            path = self._download(name, version, dest_dir)
            problem = self.check_deb(path, name, version)
            if problem is not None:
                os.unlink(path)
                raise LabError(f"{name} {version} came down damaged ({problem}); try again")
            return path

    def check_deb(self, path: str, name: str, version: str) -> str | None:
        """What is wrong with a .deb against the index's Size and SHA256, or None. A file
        found sound is not hashed again in this process while its size and mtime hold."""
        st = os.stat(path)
        seen = (os.path.abspath(path), st.st_size, st.st_mtime_ns, name, version)
        if seen in _SOUND:
            return None
        try:
            rec = self.record(name, version)
        except LabError:
            return None             # not in the lists (any more): nothing to check against
        size, digest = rec.get("Size"), rec.get("SHA256")
        have = os.path.getsize(path)
        if size and size.isdigit() and have != int(size):
            return f"{have} bytes, the index says {size}"
        if digest and sha256_file(path) != digest:
            return "its SHA-256 is not the index's"
        _SOUND.add(seen)
        return None

    def _download(self, name: str, version: str, dest_dir: str) -> str:
        # called under the package's lock (download_named): see cache.fill_dir
        stem = f".download-{name}_{version.replace(':', '%3a')}-"
        remove_leftovers(dest_dir, stem, self.log)
        tmp = tempfile.mkdtemp(prefix=stem, dir=dest_dir)
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


def find(spec: str, log=print, arch: Arch = X86_64) -> KernelPackage | None:
    """The Debian package a kernel spec names, from the package lists alone (fetched or
    refreshed when needed, nothing else downloaded): an unknown version fails here, before
    an experiment creates or downloads anything. None for a .deb path."""
    spec = check_spec(spec)
    if spec.endswith(".deb") or os.sep in spec:
        return None
    apt = Apt(log=log, arch=arch)
    apt.update()
    try:
        return pick_kernel(apt.metapackage_records(), spec, arch)
    except LabError:
        apt.update(force=True)      # maybe the lists are stale: retry once, and say so
        log("  retrying with fresh package lists")
        return pick_kernel(apt.metapackage_records(), spec, arch)


def resolve(spec: str, log=print, arch: Arch = X86_64) -> KernelDebs:
    """A kernel spec ('6.1', '7.3', 'latest' or PATH.deb) to local .deb paths
    (downloading them)."""
    pkg = find(spec, log, arch)
    if pkg is None:
        return KernelDebs(os.path.abspath(spec.strip()))
    apt = Apt(log=log, arch=arch)
    debs = os.path.join(cache_dir(), "debs")
    rec = apt.record(pkg.name, pkg.version)
    parts = split_parts(rec.get("Depends", ""), pkg.version)
    names = [pkg.name] + parts
    apt.prefetch([(n, pkg.version) for n in parts])
    cached = all(cached_deb(debs, n, pkg.version) for n in names)
    log(f"kernel {spec}: {pkg.name} {pkg.version}" + (f" + {len(parts)} parts" if parts else "")
        + (" (cached)" if cached else " (downloading)"))
    paths = [apt.download_named(n, pkg.version, debs) for n in names]
    return KernelDebs(paths[0], tuple(paths[1:]), pkg)
