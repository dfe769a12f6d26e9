"""This host's own Debian packages that the lab needs (the emulator, compilers, cross
tools): which are missing, and apt-get install of just those, with one clear error
where that cannot be done here. Every stage that needs a tool asks here."""

from __future__ import annotations

import os
import shutil
import subprocess

from ...errors import LabError


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
