"""What booting a lab kernel needs on this host: the emulator and a static busybox (it
runs inside the initramfs), installed with apt when missing (guarded: nothing is
reinstalled when both are present)."""

from __future__ import annotations

import os
import shutil

from ...errors import LabError
from ..arch import X86_64, Arch
from ..sources.elf import elf_is_dynamic
from ..sources.hostpkgs import apt_install

BUSYBOX_PATHS = ("/bin/busybox", "/usr/bin/busybox")
BUSYBOX_PACKAGE = "busybox-static"


def find_static_busybox() -> str | None:
    for p in BUSYBOX_PATHS + ((shutil.which("busybox") or ""),):
        if p and os.path.isfile(p):
            with open(p, "rb") as f:
                data = f.read()
            try:
                if not elf_is_dynamic(data):
                    return p
            except LabError:
                continue
    return None


def ensure_tools(log=print, install: bool = True, arch: Arch = X86_64) -> dict[str, str]:
    """The emulator and a static busybox, installed with apt when missing."""
    def find():
        return {"qemu": shutil.which(arch.qemu), "busybox": find_static_busybox()}
    packages = {"qemu": arch.qemu_package, "busybox": BUSYBOX_PACKAGE}
    found = find()
    missing = [packages[k] for k, v in found.items() if not v]
    if missing:
        apt_install(missing, log, install,
                    f"install QEMU ({arch.qemu}) and a statically linked busybox by hand")
        found = find()
        if not all(found.values()):
            raise LabError(f"{' and '.join(missing)} installed, but still not found")
    return found
