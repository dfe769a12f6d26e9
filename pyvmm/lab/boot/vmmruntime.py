"""A VMM for the lab kernel to run: the binary, every shared library it loads and the
loader, packed at their own paths (archive.pack), so a lab job can start the same QEMU
inside the lab kernel as on the host (its firmware is pyvmm's, in the Python runtime)."""

from __future__ import annotations

import os
import shutil

from ...errors import LabError
from .archive import ldd, pack


# microvm's BIOS: Debian's QEMU asks for qboot.rom, upstream names it bios-microvm.bin
FIRMWARE = ("/usr/share/qemu/bios-microvm.bin", "/usr/share/qemu/qboot.rom")


class VmmRuntime:
    def __init__(self, binary: str, archive: bytes, files: int, size: int, cached: bool):
        self.binary, self.archive, self.files = binary, archive, files
        self.size, self.cached = size, cached


def build(binary: str, log=print) -> VmmRuntime:
    path = binary if os.sep in binary else shutil.which(binary)
    if not path or not os.path.isfile(path):
        raise LabError(f"{binary} not found on this host: the lab copies it into the lab "
                       "kernel's initramfs (apt-get install qemu-system-x86)")
    path = os.path.realpath(path)
    # microvm's own BIOS (qboot), which it loads from QEMU's data directory when it boots
    # a kernel (-kernel) rather than a -bios of its own
    data = [f for f in FIRMWARE if os.path.exists(f)]
    files = sorted({path, *ldd(path), *data})
    blob, cached, size = pack(files, "vmmruntime", f"the lab's copy of {os.path.basename(path)}",
                              log)
    return VmmRuntime(path, blob, len(files), size, cached)


def build_launcher(launcher: str, files: list[str], log=print) -> VmmRuntime:
    """Another suite's QEMU (sources/qemus.py): its loader, libraries, binary, firmware and
    launch.json, packed at their cache paths (the launcher directory is the same inside
    the lab kernel)."""
    blob, cached, size = pack(files, "vmmruntime", f"the lab's copy of the QEMU in {launcher}",
                              log)
    return VmmRuntime(launcher, blob, len(files), size, cached)
