"""Other QEMUs than this host's: a Debian suite's qemu-system-x86 (trixie's 10.0, sid's
11.1...) with every library it loads, fetched through the lab's private apt state and
unpacked into the cache, run with its own loader and C library (a newer glibc than this
host's), so that `pyvmm trace` and the lab can start it on this host and inside a lab
kernel.

What comes out is a launcher directory: the unpacked tree and launch.json, which says how
to start QEMU (the loader, the library path, the binary, -L for its firmware) and where
its C library is (the tracer's uprobe goes on that library's ioctl). `pyvmm trace --qemu
DIR` and the trace workloads read launch.json; nothing else of this module is needed to
run it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

from ...errors import LabError
from .apt import Apt
from .cache import atomic_dir, cache_dir

SUITES = ("trixie", "sid", "bookworm")
PACKAGE = "qemu-system-x86"
BINARY = "usr/bin/qemu-system-x86_64"
LIBDIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu")
LOADER = "lib64/ld-linux-x86-64.so.2"
LAUNCH = "launch.json"


def check_spec(spec: str) -> str:
    """'debian:trixie' -> 'trixie'; refused without the network."""
    head, colon, suite = spec.partition(":")
    if head != "debian" or not colon or suite not in SUITES:
        raise LabError(f"--qemu {spec}: give debian:SUITE with SUITE one of "
                       f"{', '.join(SUITES)} (or a path to a qemu-system-x86_64)")
    return suite


def closure(apt: Apt, suite: str) -> list[tuple[str, str]]:
    """(package, version) of qemu-system-x86 from `suite` and everything it depends on,
    as apt would install them on an empty system (no recommends)."""
    out = apt.query(["apt-get", "install", "--simulate", "--no-install-recommends", "-t", suite,
                    f"{PACKAGE}/{suite}"], f"resolve {PACKAGE} from {suite}")
    pkgs = []
    for line in out.splitlines():
        m = re.match(r"Inst (\S+) (?:\[\S+\] )?\((\S+) ", line)
        if m:
            pkgs.append((m.group(1).split(":")[0], m.group(2)))
    if not any(p == PACKAGE for p, _ in pkgs):
        raise LabError(f"apt found no {PACKAGE} in {suite}")
    return pkgs


def fetch(spec: str, log=print) -> str:
    """The launcher directory of a suite's QEMU (fetched and unpacked once, cached)."""
    suite = check_spec(spec)
    apt = Apt(log=log)
    apt.update()
    pkgs = closure(apt, suite)
    version = dict(pkgs)[PACKAGE]
    final = os.path.join(cache_dir(), "qemus", f"{suite}_{version.replace(':', '%3a')}")
    if os.path.exists(os.path.join(final, LAUNCH)):
        return final
    debs_dir = os.path.join(cache_dir(), "debs")

    def fill(tmp: str) -> None:
        log(f"fetching QEMU {version} from {suite}: {len(pkgs)} packages")
        for deb in _download_all(apt, pkgs, debs_dir):
            p = subprocess.run(["dpkg-deb", "-x", deb, tmp], capture_output=True, text=True)
            if p.returncode != 0:
                raise LabError(f"dpkg-deb -x {os.path.basename(deb)}: {p.stderr.strip()}")
        _finish(tmp, suite, version)
    return atomic_dir(os.path.dirname(final), final, fill, ".qemu-",
                      f"unpacking QEMU {version} from {suite}", log)


def _download_all(apt: Apt, pkgs: list[tuple[str, str]], debs_dir: str) -> list[str]:
    """The packages' .debs, those not cached fetched in one apt-get download (which checks
    each against the index's hashes)."""
    from .apt import cached_deb
    os.makedirs(debs_dir, exist_ok=True)
    missing = [(n, v) for n, v in pkgs if not cached_deb(debs_dir, n, v)]
    if missing:
        tmp = os.path.join(debs_dir, f".qemu-download-{os.getpid()}")
        os.makedirs(tmp, exist_ok=True)
        try:
            apt._run(["apt-get", "download", "-q"] + [f"{n}={v}" for n, v in missing],
                     f"download {len(missing)} packages", cwd=tmp)
            for f in os.listdir(tmp):
                if f.endswith(".deb"):
                    os.replace(os.path.join(tmp, f), os.path.join(debs_dir, f))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    out = []
    for n, v in pkgs:
        deb = cached_deb(debs_dir, n, v)
        if deb is None:
            raise LabError(f"{n} {v} did not come down")
        out.append(deb)
    return out


def _finish(tree: str, suite: str, version: str) -> None:
    """launch.json for the unpacked tree (paths as they will be: the final directory)."""
    final = os.path.join(os.path.dirname(tree), f"{suite}_{version.replace(':', '%3a')}")
    loader = os.path.join(tree, LOADER)
    if not os.path.exists(loader):          # usrmerge: the loader lives under usr/lib64
        for cand in ("usr/lib64/ld-linux-x86-64.so.2",
                     "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
                     "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"):
            if os.path.exists(os.path.join(tree, cand)):
                loader_rel = cand
                break
        else:
            raise LabError(f"QEMU {version} from {suite}: no ld-linux-x86-64.so.2 unpacked")
    else:
        loader_rel = LOADER
    libc = next((d for d in LIBDIRS if os.path.exists(os.path.join(tree, d, "libc.so.6"))), None)
    if libc is None:
        raise LabError(f"QEMU {version} from {suite}: no libc.so.6 unpacked")
    data = "usr/share/qemu"
    launch = {"suite": suite, "version": version,
              "loader": os.path.join(final, loader_rel),
              "library_path": ":".join(os.path.join(final, d) for d in LIBDIRS),
              "binary": os.path.join(final, BINARY), "datadir": os.path.join(final, data),
              "libc": os.path.join(final, libc, "libc.so.6")}
    with open(os.path.join(tree, LAUNCH), "w") as f:
        json.dump(launch, f, indent=1)


def files(launcher: str) -> list[str]:
    """What a lab kernel needs of a launcher: the loader, the libraries QEMU loads (as
    its own loader lists them), the binary, microvm's firmware and launch.json."""
    with open(os.path.join(launcher, LAUNCH)) as f:
        ln = json.load(f)
    p = subprocess.run([ln["loader"], "--list", "--library-path", ln["library_path"],
                        ln["binary"]], capture_output=True, text=True)
    if p.returncode != 0:
        raise LabError(f"{ln['binary']} does not load with its own libraries: "
                       + (p.stderr.strip().splitlines() or ["?"])[-1])
    libs = re.findall(r"=> (/\S+) \(0x", p.stdout)
    data = [os.path.join(ln["datadir"], n) for n in ("bios-microvm.bin", "qboot.rom")
            if os.path.exists(os.path.join(ln["datadir"], n))]
    return sorted({ln["loader"], ln["binary"], ln["libc"], *libs, *data,
                   os.path.join(launcher, LAUNCH)})


def version_of(binary_or_launcher: str) -> str:
    """'QEMU emulator version ...' of a binary or a launcher."""
    launch = os.path.join(binary_or_launcher, LAUNCH)
    if os.path.isdir(binary_or_launcher) and os.path.exists(launch):
        with open(launch) as f:
            ln = json.load(f)
        argv = [ln["loader"], "--library-path", ln["library_path"], ln["binary"]]
    else:
        argv = [shutil.which(binary_or_launcher) or binary_or_launcher]
    p = subprocess.run(argv + ["--version"], capture_output=True, text=True)
    return (p.stdout.splitlines() or ["?"])[0]
