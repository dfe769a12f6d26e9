"""Debian package metadata (pure): version comparison as dpkg does it, `apt-cache show`
records, which kernel a series names, the parts of a split (7.x) image package, and the
kernel specs the lab accepts."""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass

from ...errors import LabError
from ..arch import X86_64, Arch

# Packages a split (7.x) image depends on that hold its files.
SPLIT_PARTS = ("linux-binary-", "linux-modules-", "linux-base-")


def _order(c: str) -> int:
    if c == "~":
        return -1
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


def _cmp_part(a: str, b: str) -> int:
    while a or b:
        na = re.match(r"[^\d]*", a).group()
        nb = re.match(r"[^\d]*", b).group()
        for i in range(max(len(na), len(nb))):
            ca = _order(na[i]) if i < len(na) else 0
            cb = _order(nb[i]) if i < len(nb) else 0
            if ca != cb:
                return -1 if ca < cb else 1
        a, b = a[len(na):], b[len(nb):]
        da = re.match(r"\d*", a).group()
        db = re.match(r"\d*", b).group()
        if int(da or 0) != int(db or 0):
            return -1 if int(da or 0) < int(db or 0) else 1
        a, b = a[len(da):], b[len(db):]
    return 0


def compare_versions(a: str, b: str) -> int:
    """Debian version comparison (epoch, upstream, revision), as dpkg does it."""
    def split(v):
        epoch, _, rest = v.partition(":") if ":" in v else ("0", "", v)
        if not epoch.isdigit():
            raise LabError(f"{' '.join(v.split())[:60]!r} is not a Debian version "
                           "(the epoch before ':' must be a number)")
        up, _, rev = rest.rpartition("-") if "-" in rest else (rest, "", "0")
        return int(epoch), up, rev
    ea, ua, ra = split(a)
    eb, ub, rb = split(b)
    if ea != eb:
        return -1 if ea < eb else 1
    return _cmp_part(ua, ub) or _cmp_part(ra, rb)


def parse_records(text: str) -> list[dict[str, str]]:
    """Split `apt-cache show` output into one dict per package record."""
    records, cur, key = [], {}, None
    for line in text.splitlines():
        if not line.strip():
            if cur:
                records.append(cur)
            cur, key = {}, None
        elif line[0] in " \t" and key:
            cur[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, val = line.partition(":")
            cur[key] = val.strip()
    if cur:
        records.append(cur)
    return records


@dataclass(frozen=True)
class KernelPackage:
    name: str           # e.g. linux-image-6.1.0-50-amd64
    version: str        # e.g. 6.1.176-1
    series: str         # e.g. 6.1
    arch: str = X86_64.debian

    @property
    def filename(self) -> str:
        return f"{self.name}_{self.version.replace(':', '%3a')}_{self.arch}.deb"


def _image_dep(depends: str, metapackage: str) -> str | None:
    """The versioned linux-image-R package a metapackage depends on (7.x lists
    linux-base-amd64 first)."""
    for part in depends.split(","):
        m = re.match(r"\s*(linux-image-[\w.+-]+)", part)
        if m and m.group(1) != metapackage:
            return m.group(1)
    return None


def pick_kernel(records: list[dict[str, str]], series: str,
                arch: Arch = X86_64) -> KernelPackage:
    """From metapackage records, the newest whose version is in `series` (e.g. '6.1'),
    or the newest of all for 'latest'."""
    found = []
    for r in records:
        ver = r.get("Version", "")
        upstream = ver.split(":")[-1]
        if series != "latest" and not upstream.startswith(series + "."):
            continue
        name = _image_dep(r.get("Depends", ""), arch.image_metapackage)
        if name:
            found.append(KernelPackage(name, ver, ".".join(upstream.split(".")[:2]),
                                       arch.debian))
    if not found:
        have = sorted({m.group(0) for r in records
                       if (m := re.match(r"\d+\.\d+", r.get("Version", "").split(":")[-1]))},
                      key=lambda v: tuple(int(x) for x in v.split(".")))
        raise LabError(f"unknown kernel version '{series}': the Debian archives offer "
                       f"{', '.join(have) or 'none'}; give one of those, 'latest' or a path "
                       "to a linux-image .deb")
    return max(found, key=functools.cmp_to_key(lambda a, b: compare_versions(a.version,
                                                                            b.version)))


def split_parts(depends: str, version: str) -> list[str]:
    """The linux-binary/modules/base packages of a split image record, pinned to its
    version (empty for an image package that holds everything itself)."""
    out = []
    for part in depends.split(","):
        for alt in part.split("|"):
            m = re.match(r"\s*([\w.+-]+)\s*(?:\(=\s*([^)]+)\))?", alt)
            if m and m.group(1).startswith(SPLIT_PARTS) and (m.group(2) or version) == version:
                out.append(m.group(1))
    return out


KERNEL_SPEC_FORMS = ("a Debian series such as 6.1, 6.12, 7.2 or 7.3, 'latest' (the newest "
                     "in the archives), or a path to a linux-image .deb")


def check_spec(spec: str) -> str:
    """Validate a kernel spec without touching the network or the disk beyond a stat;
    returns it normalised. Raises LabError naming the accepted forms."""
    spec = spec.strip()
    if spec.endswith(".deb") or os.sep in spec:
        if not os.path.isfile(spec):
            raise LabError(f"kernel package {spec} does not exist")
        return spec
    if spec == "latest" or re.fullmatch(r"\d+\.\d+", spec):
        return spec
    raise LabError(f"unknown kernel version '{spec}': give {KERNEL_SPEC_FORMS}")
