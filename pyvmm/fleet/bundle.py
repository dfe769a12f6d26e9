"""What a fleet host gets: one self-contained archive of pyvmm as built here (its guests,
static helper and compiled modules) and of the third-party packages the host's jobs
import, so a host needs nothing but python3 (no pip, no package index, no compiler).

What goes in is found the way the lab's Python runtime is: a child interpreter of this
installation imports what a host job runs (the bench, trace and check commands, the
sweep and its analysis) and lists sys.modules; every top-level package outside the
standard library that it loaded goes in whole, with its bundled libraries (cffi.libs,
numpy.libs); matplotlib and numpy do not (plots are drawn on the controller, and the
fits a host's analysis makes have a pure-Python path). The archive is
keyed by a hash of its files, cached under <cache>/fleet/, and says for which machine
and Python it was built: the compiled modules run only there."""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import platform
import subprocess
import sys
import sysconfig
import tarfile
from dataclasses import dataclass

from ..errors import PyvmmError

PROBE = """
import json, sys
import pyvmm.cli, pyvmm.bench.cli, pyvmm.bench.sweep, pyvmm.trace.cli, pyvmm.trace.runs
import pyvmm.trace.record, pyvmm.trace.workloads, pyvmm.checks.cli, pyvmm.checks.races
import pyvmm.checks.gmem, pyvmm.analysis.report, pyvmm.analysis.stats, pyvmm.hostinfo
import pyvmm.drivers.native, pyvmm.drivers.runner, pyvmm.tables, pyvmm.ui
import jsonschema, rich.console, rich.table, rich.progress, rich.live
files = sorted({m.__file__ for m in list(sys.modules.values())
                if getattr(m, "__file__", None)})
print(json.dumps({"files": files, "package": pyvmm.__path__[0]}))
"""
LEAVE_OUT = {"pyvmm", "matplotlib", "numpy", "contourpy", "kiwisolver", "fontTools",
             "cycler", "pyparsing", "dateutil", "mpl_toolkits", "PIL", "pytest", "_pytest",
             "hypothesis",
             "ansible", "ansible_runner", "pip", "setuptools", "_distutils_hack", "pkg_resources"}
SKIP_DIRS = {"__pycache__", "tests", "test"}


@dataclass
class Bundle:
    path: str           # the .tar.gz
    key: str            # the build's key: the install directory's name on each host
    machine: str
    python: str
    files: int
    bytes: int
    cached: bool


def _probe() -> dict:
    p = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd="/")
    if p.returncode != 0:
        raise PyvmmError("could not list what a fleet host needs from this installation: "
                         + (p.stderr.strip().splitlines() or ["no output"])[-1])
    return json.loads(p.stdout)


def _tops(files: list[str]) -> dict[str, str]:
    """Top-level importable name -> its path (a package folder or a module file) for every
    loaded file outside the standard library."""
    stdlib = {os.path.realpath(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib")}
    roots = [os.path.realpath(p) for p in sys.path if p and os.path.isdir(p)]
    out = {}
    for f in files:
        real = os.path.realpath(f)
        if any(real.startswith(s + os.sep) for s in stdlib) and "site-packages" not in real:
            continue
        for r in sorted(roots, key=len, reverse=True):
            if real.startswith(r + os.sep) and "site-packages" in r:
                top = os.path.relpath(real, r).split(os.sep)[0]
                name = top.split(".")[0]
                out.setdefault(name, os.path.join(r, top))
                break
    return out


def collect() -> list[tuple[str, str]]:
    """(path here, path in the archive under site/) for every file a host needs."""
    info = _probe()
    pairs = []
    pkg = info["package"]
    for d, dirs, names in os.walk(pkg):
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS and not x.startswith("."))
        for n in sorted(names):
            if n.endswith((".pyc", ".o")):
                continue
            full = os.path.join(d, n)
            pairs.append((full, os.path.join("site", "pyvmm", os.path.relpath(full, pkg))))
    for name, path in sorted(_tops(info["files"]).items()):
        if name in LEAVE_OUT:
            continue
        targets = [path]
        libs = os.path.join(os.path.dirname(path), f"{name}.libs")
        if os.path.isdir(libs):
            targets.append(libs)
        for t in targets:
            base = os.path.dirname(t)
            if os.path.isfile(t):
                pairs.append((t, os.path.join("site", os.path.relpath(t, base))))
                continue
            for d, dirs, names in os.walk(t):
                dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS)
                for n in sorted(names):
                    if n.endswith(".pyc"):
                        continue
                    full = os.path.join(d, n)
                    pairs.append((full, os.path.join("site", os.path.relpath(full, base))))
    return pairs


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "pyvmm", "fleet")


def _prune(keep: int) -> None:
    """Older bundles (other builds) beyond the newest `keep` are removed."""
    old = sorted(glob.glob(os.path.join(cache_dir(), "pyvmm-*.tar.gz")), key=os.path.getmtime)
    for p in old[:-keep] if keep else old:
        try:
            os.unlink(p)
        except OSError:
            pass


def build(log=print) -> Bundle:
    """The archive for this installation (from the cache when its files are unchanged)."""
    pairs = collect()
    h = hashlib.sha256()
    machine = platform.machine()
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    h.update(f"{machine} {python}\n".encode())
    size = 0
    for src, dst in pairs:
        st = os.stat(src)
        size += st.st_size
        h.update(f"{dst} {st.st_size}\n".encode())
        with open(src, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    key = f"pyvmm-{machine}-py{python}-{h.hexdigest()[:16]}"
    out = os.path.join(cache_dir(), f"{key}.tar.gz")
    if os.path.exists(out):
        return Bundle(out, key, machine, python, len(pairs), size, True)
    os.makedirs(cache_dir(), exist_ok=True)
    _prune(keep=2)
    log(f"packing pyvmm for fleet hosts: {len(pairs)} files, {size / 2**20:.1f} MiB "
        f"({machine}, Python {python})")
    tmp = f"{out}.tmp{os.getpid()}"
    try:
        with tarfile.open(tmp, "w:gz", compresslevel=6) as t:
            for src, dst in pairs:
                t.add(src, arcname=dst, recursive=False)
            meta = json.dumps({"key": key, "machine": machine, "python": python,
                               "files": len(pairs)}).encode()
            ti = tarfile.TarInfo("bundle.json")
            ti.size = len(meta)
            t.addfile(ti, io.BytesIO(meta))
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return Bundle(out, key, machine, python, len(pairs), size, False)
