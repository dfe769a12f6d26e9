"""What the lab runs inside a kernel of another architecture: the static pyvmm-bootbench
helper cross-compiled from the checkout's csrc/ with that architecture's guest
(guests/<arch>/doorbell.S), and a static busybox from Debian's package of that
architecture. Both are cached (the helper by a hash of its sources and compiler, the
busybox by its package version), written under a temporary name and renamed, with a
manifest checked before use.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess

from ...errors import LabError
from ..arch import Arch
from ..sources.hostpkgs import apt_install, missing_packages
from ..sources.apt import Apt
from ..sources.cache import cache_dir, made_entry, manifest
from ..sources.debian import compare_versions

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
CSRC = os.path.join(ROOT, "csrc")
GUESTS = os.path.join(ROOT, "guests")
SOURCES = ("csrc/main.c", "csrc/bootbench.c", "csrc/bootbench.h", "csrc/guest_blob.S",
           "guests/protocol.inc")


def _cross_tools(arch: Arch) -> dict[str, str]:
    p = arch.cross_prefix
    return {f"{p}gcc": f"gcc-{p.rstrip('-')}", f"{p}ld": f"binutils-{p.rstrip('-')}",
            f"{p}objcopy": f"binutils-{p.rstrip('-')}",
            f"/usr/{p.rstrip('-')}/lib/libc.a": f"libc6-dev-{arch.debian}-cross"}


def missing_tools(arch: Arch) -> list[str]:
    """Debian packages the cross build of `arch` needs and this host lacks."""
    return missing_packages(_cross_tools(arch))


def ensure_cross_tools(arch: Arch, log=print, install: bool = True) -> None:
    missing = missing_tools(arch)
    if missing:
        apt_install(missing, log, install, f"install the {arch.debian} cross compiler by hand")
        still = missing_tools(arch)
        if still:
            raise LabError(f"{' and '.join(still)} installed, but the cross compiler is "
                           "still not found")


def _sources(arch: Arch) -> list[str]:
    guest = os.path.join("guests", arch.name, "doorbell.S")
    files = list(SOURCES) + [guest]
    for f in files:
        if not os.path.isfile(os.path.join(ROOT, f)):
            raise LabError(f"{f} is not here: the {arch.name} helper is built from the "
                           f"project's checkout ({ROOT}); run pyvmm from a checkout")
    return files


def _key(arch: Arch, files: list[str]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.encode() + b"\0")
        with open(os.path.join(ROOT, f), "rb") as fh:
            h.update(fh.read())
    p = subprocess.run([f"{arch.cross_prefix}gcc", "--version"], capture_output=True,
                       text=True)
    h.update(p.stdout.encode())
    return h.hexdigest()[:16]


def helper(arch: Arch, log=print, install: bool = True) -> tuple[bytes, dict]:
    """The static helper for `arch` (contents, and its build facts)."""
    ensure_cross_tools(arch, log, install)
    files = _sources(arch)
    key = _key(arch, files)
    final = os.path.join(cache_dir(), "helpers", f"{arch.name}-{key}")
    meta = made_entry(final, "helper.json", f"{arch.name} helper",
                  lambda tmp: _build(arch, tmp, key, log), log)
    with open(os.path.join(final, "pyvmm-bootbench"), "rb") as f:
        return f.read(), {k: v for k, v in meta.items() if k != "files"}


def _run(cmd: list[str], what: str) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        first = "\n  ".join((p.stderr or p.stdout).strip().splitlines()[:6])
        raise LabError(f"{what} failed:\n  {first}")


def _build(arch: Arch, tmp: str, key: str, log) -> None:
    p = arch.cross_prefix
    log(f"building the static pyvmm-bootbench for {arch.name} ({p}gcc)")
    guest = os.path.join(GUESTS, arch.name, "doorbell.S")
    obj, elf, binf = (os.path.join(tmp, n) for n in ("guest.o", "guest.elf", "guest.bin"))
    _run([f"{p}gcc", "-c", "-x", "assembler-with-cpp", "-I", GUESTS, "-o", obj, guest],
         f"assembling {guest}")
    _run([f"{p}ld", "-Ttext=0x10000", "-e", "_start", "-o", elf, obj], "linking the guest")
    _run([f"{p}objcopy", "-O", "binary", elf, binf], "objcopy of the guest")
    blob = os.path.join(tmp, "blob.o")
    _run([f"{p}gcc", "-c", f'-DDOORBELL_BIN="{binf}"', "-o", blob,
          os.path.join(CSRC, "guest_blob.S")], "embedding the guest")
    out = os.path.join(tmp, "pyvmm-bootbench")
    _run([f"{p}gcc", "-static", "-O2", "-Wall", "-I", CSRC, "-I", GUESTS, "-o", out,
          os.path.join(CSRC, "main.c"), os.path.join(CSRC, "bootbench.c"), blob],
         f"the static {arch.name} helper build")
    for n in (obj, elf, blob):
        os.unlink(n)
    meta = {"arch": arch.name, "key": key,
            "compiler": subprocess.run([f"{p}gcc", "--version"], capture_output=True,
                                       text=True).stdout.splitlines()[0],
            "guest_bytes": os.path.getsize(binf),
            "files": manifest(tmp, ["pyvmm-bootbench", "guest.bin"])}
    with open(os.path.join(tmp, "helper.json"), "w") as f:
        json.dump(meta, f, indent=1)


def busybox(arch: Arch, log=print) -> bytes:
    """A static busybox for `arch`, from Debian's busybox-static of that architecture
    (fetched with the lab's private apt state, checked like every download)."""
    import functools
    apt = Apt(log=log, arch=arch)
    apt.update()
    recs = apt.records("busybox-static")
    if not recs:
        raise LabError(f"no busybox-static for {arch.debian} in the package lists")
    best = max(recs, key=functools.cmp_to_key(lambda a, b: compare_versions(a["Version"],
                                                                            b["Version"])))
    version = best["Version"]
    final = os.path.join(cache_dir(), "busybox", f"{arch.debian}-{version.replace(':', '_')}")

    def fill(tmp):
        deb = apt.download_named("busybox-static", version, os.path.join(cache_dir(), "debs"))
        x = os.path.join(tmp, "x")
        _run(["dpkg-deb", "-x", deb, x], f"unpacking {deb}")
        src = next((os.path.join(x, d, "busybox") for d in ("bin", "usr/bin")
                    if os.path.isfile(os.path.join(x, d, "busybox"))), None)
        if src is None:
            raise LabError(f"{deb} holds no bin/busybox")
        shutil.copy(src, os.path.join(tmp, "busybox"))
        shutil.rmtree(x)
        with open(os.path.join(tmp, "busybox.json"), "w") as f:
            json.dump({"version": version, "arch": arch.debian,
                       "files": manifest(tmp, ["busybox"])}, f)
    made_entry(final, "busybox.json", f"{arch.debian} busybox", fill, log)
    with open(os.path.join(final, "busybox"), "rb") as f:
        return f.read()
