"""What booting a lab kernel needs on this host: the emulator and a static busybox (it
runs inside the initramfs), installed with apt when missing (guarded: nothing is
reinstalled when both are present)."""

from __future__ import annotations

import os
import shutil
import subprocess

from ...errors import LabError
from ..arch import X86_64, Arch
from ..sources.elf import elf_is_dynamic

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


def missing_packages(wanted: dict[str, str]) -> list[str]:
    """The packages of `wanted` (a command, or an absolute path, -> its Debian package)
    whose command or file is not here."""
    out = []
    for what, pkg in wanted.items():
        present = os.path.exists(what) if what.startswith("/") else shutil.which(what)
        if not present and pkg not in out:
            out.append(pkg)
    return out


def apt_install(missing: list[str], log=print, install: bool = True,
                by_hand: str = "install them by hand") -> None:
    """Install Debian packages with apt-get (guarded by the caller: only what is
    missing); one clear error when that cannot be done here."""
    what = " and ".join(missing)
    if not install:
        raise LabError(f"{what} not installed: apt-get install {' '.join(missing)}")
    if not shutil.which("apt-get"):
        raise LabError(f"{what} missing and not installable here (no apt-get): {by_hand}")
    if os.geteuid() != 0:
        raise LabError(f"{what} missing; installing needs root: "
                       f"sudo apt-get install -y {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends"] + missing
    log(f"installing {what} with apt-get")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        log("  apt-get install failed; updating the package lists and trying once more")
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True, env=env)
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-5:])
        raise LabError(f"could not install {what}:\n{tail}")
