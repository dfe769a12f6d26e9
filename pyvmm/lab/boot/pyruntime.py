"""The Python runtime the lab puts into its initramfs, so that pyvmm itself (the Python
VMM: checks, stress, ptwrite) runs on a lab kernel, not only the static C helper.

What goes in is what running pyvmm.lab.experiments.inside needs, found by importing it (and every
job module) in a child interpreter of this installation and listing sys.modules: the
interpreter binary, those stdlib and site-packages files (with their compiled .pyc,
whose mtimes are kept so they stay valid), the whole pyvmm package (guests, helper,
cffi module), and every shared library that the interpreter and the extension modules
load (from ldd). Files keep their absolute paths, so the interpreter finds its prefix
as it does here. No rich, matplotlib or numpy.

The result is a gzip'd newc archive cached under <cache>/pyruntime/, keyed by the file
list and the files' sizes and mtimes; the lab appends it to the initramfs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from dataclasses import dataclass

from ...errors import LabError
from .archive import ldd, pack

# Imported in the child to find the file set: the inner runner and what its jobs import
# lazily (the jobs' modules are imported at the top of a function, not of the module).
PROBE = """
import json, sys, encodings.utf_8, encodings.latin_1, encodings.ascii, runpy, importlib.util
import importlib.machinery, traceback, linecache, tokenize
import pyvmm.lab.experiments.inside, pyvmm.ptwrite, pyvmm.checks.races, pyvmm.checks.gmem
import pyvmm.stress, pyvmm.vmm.vcpu, pyvmm.vmm.vm, pyvmm.vmm.kvm, pyvmm.vmm.kvmstats, pyvmm.vmm.memory
import pyvmm.recipe, pyvmm.vmm.guests, pyvmm.stress.xen
import pyvmm.trace.record, pyvmm.trace.runs, pyvmm.trace.workloads, pyvmm.trace.gpwork
pyvmm.vmm.guests.load("ptwrite"); pyvmm.vmm.guests.helper_path()
for bad in ("rich", "matplotlib", "numpy"):
    if bad in sys.modules:
        raise SystemExit(f"pyvmm.lab.experiments.inside pulled in {bad}: "
                         "the lab runtime must not need it")
files = sorted({m.__file__ for m in list(sys.modules.values())
                if getattr(m, "__file__", None)})
print(json.dumps({"files": files, "executable": sys._base_executable,
                  "prefix": sys.base_prefix, "path": sys.path,
                  "package": pyvmm.__path__[0]}))
"""


@dataclass
class Runtime:
    archive: bytes          # gzip'd newc cpio
    command: list[str]      # how /init starts the inner runner (before the jobs)
    files: int
    size: int               # uncompressed bytes of the files
    cached: bool


def _probe() -> dict:
    p = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                       cwd="/")
    if p.returncode != 0:
        raise LabError("could not list what the lab's Python runtime needs: "
                       + (p.stderr.strip().splitlines() or ["no output"])[-1])
    return json.loads(p.stdout)


def collect() -> tuple[list[str], dict]:
    """The absolute paths to copy, and what the probe said."""
    info = _probe()
    files = set(info["files"])
    pkg = info["package"]
    for d, dirs, names in os.walk(pkg):
        dirs[:] = [x for x in dirs if x != "__pycache__"]
        for n in names:
            files.add(os.path.join(d, n))
    # Whole stdlib packages of whatever was imported: their submodules load lazily
    # (importlib.resources -> importlib.readers, for one).
    stdlib = sysconfig.get_paths()["stdlib"]
    for f in list(files):
        rel = os.path.relpath(f, stdlib)
        if rel.startswith("..") or os.sep not in rel or rel.startswith("lib-dynload"):
            continue
        top = os.path.join(stdlib, rel.split(os.sep)[0])
        for d, dirs, names in os.walk(top):
            dirs[:] = [x for x in dirs if x not in ("__pycache__", "test", "tests", "idle_test")]
            for n in names:
                if n.endswith(".py"):
                    files.add(os.path.join(d, n))
    # Compiled bytecode next to each source, so the emulated CPU does not recompile.
    for f in list(files):
        if f.endswith(".py"):
            tag = sys.implementation.cache_tag
            pyc = os.path.join(os.path.dirname(f), "__pycache__",
                               f"{os.path.basename(f)[:-3]}.{tag}.pyc")
            if os.path.exists(pyc):
                files.add(pyc)
    exe = os.path.realpath(info["executable"])
    files.add(exe)
    # The landmark the interpreter looks for to find its prefix.
    files.add(os.path.join(stdlib, "os.py"))
    libs = set()
    for f in [exe] + [x for x in files if x.endswith(".so") or ".so." in x]:
        libs.update(ldd(f))
    files |= libs
    return sorted(files), info


def build(log=print) -> Runtime:
    files, info = collect()
    # site-packages, and the folder that holds pyvmm itself when that is elsewhere (an
    # editable install: the checkout is the install).
    site = sorted({p for p in info["path"] if p.endswith("site-packages")})
    pkg_parent = os.path.dirname(info["package"])
    if pkg_parent not in site:
        site.append(pkg_parent)
    command = ["env", "PYTHONNOUSERSITE=1", "PYTHONDONTWRITEBYTECODE=1", "PYVMM_LAB_INNER=1",
               f"PYTHONPATH={':'.join(site)}", os.path.realpath(info["executable"]),
               "-m", "pyvmm.lab.experiments.inside"]
    blob, cached, size = pack(files, "pyruntime", "the lab's Python runtime", log)
    return Runtime(blob, command, len(files), size, cached)
