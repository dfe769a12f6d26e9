"""A Linux guest for the linux-microvm workload: the lab's guest kernel (builds/guest.py)
and an initramfs whose only program is a static /init (guests/linux/init.c) that writes
"user space started" to an I/O port the tracer watches (vmm/layout.py INIT_PORT) and ends
the VM through QEMU's isa-debug-exit. The initramfs is cached by the init's source and the
compiler."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

from ...errors import LabError
from ..builds import guest as gbuild
from ..sources.cache import cache_dir, locked
from ..sources.kits import Kit
from .initramfs import Entry, cpio_newc

INIT_SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.dirname(os.path.abspath(__file__))))), "guests", "linux", "init.c")


@dataclass
class LinuxGuest:
    kernel: str             # bzImage
    initrd: str             # gzip'd newc with /init
    meta: dict

    @property
    def files(self) -> list[str]:
        return [self.kernel, self.initrd]


def build_init(log=print) -> str:
    """The guest's initramfs (cached): /init (static) and /dev/console."""
    if not os.path.exists(INIT_SOURCE):
        raise LabError(f"{INIT_SOURCE} is missing: the Linux guest's /init is built from it")
    gcc = shutil.which("gcc")
    if not gcc:
        raise LabError("gcc not found: it builds the Linux guest's /init (apt-get install gcc "
                       "libc6-dev)")
    ver = subprocess.run([gcc, "--version"], capture_output=True, text=True).stdout
    with open(INIT_SOURCE, "rb") as f:
        key = hashlib.sha256(f.read() + ver.encode()).hexdigest()[:16]
    out = os.path.join(cache_dir(), "linuxguest", f"init-{key}.cpio.gz")
    if os.path.exists(out):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with locked(out, "building the Linux guest's /init", log), \
            tempfile.TemporaryDirectory(prefix="pyvmm-init-") as tmp:
        if os.path.exists(out):
            return out
        exe = os.path.join(tmp, "init")
        p = subprocess.run([gcc, "-static", "-Os", "-Wall", "-o", exe, INIT_SOURCE],
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise LabError("building the Linux guest's /init failed: "
                           + (p.stderr.strip().splitlines() or ["?"])[-1]
                           + " (the static C library: apt-get install libc6-dev)")
        with open(exe, "rb") as f:
            init = f.read()
        blob = gzip.compress(cpio_newc([Entry("dev", 0o040755),
                                        Entry("dev/console", 0o020600, b"", (5, 1)),
                                        Entry("init", 0o100755, init)]), mtime=0)
        part = out + f".tmp{os.getpid()}"
        with open(part, "wb") as f:
            f.write(blob)
        os.replace(part, out)
    return out


def build(kit: Kit, log=print, install: bool = True) -> LinuxGuest:
    """The guest kernel from the source of `kit`'s version, and the guest's initramfs."""
    built = gbuild.build_kernel(kit, log, install)
    kernel = os.path.join(built.path, "vmlinuz")
    initrd = build_init(log)
    meta = {"series": kit.series, "version": kit.meta["version"],
            "kernel_release": built.meta.get("kernel_release"),
            "build_s": built.meta.get("build_s"), "config": "lab-guest-x86_64.config",
            "kernel_bytes": os.path.getsize(kernel), "initrd": os.path.basename(initrd)}
    return LinuxGuest(kernel, initrd, meta)
