"""The lab's cache: PYVMM_CACHE, else $XDG_CACHE_HOME/pyvmm, else ~/.cache/pyvmm.
Downloads, kits, module builds and runtimes live under it, each entry written under a
temporary name and renamed into place."""

from __future__ import annotations

import os


def cache_dir() -> str:
    base = os.environ.get("PYVMM_CACHE")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(xdg, "pyvmm")
    os.makedirs(base, exist_ok=True)
    return base
