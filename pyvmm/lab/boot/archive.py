"""Host files packed for the initramfs at their own absolute paths (a gzip'd newc cpio the
kernel unpacks after the initramfs proper), cached under <cache>/NAME/ by the file list
with each file's size and mtime: the Python runtime, the VMM a lab job traces."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import tempfile

from ..sources.cache import cache_dir, locked
from .initramfs import Entry, cpio_newc


def pack(files: list[str], name: str, what: str, log=print) -> tuple[bytes, bool, int]:
    """(archive, whether it came from the cache, bytes of the files uncompressed)."""
    stat = []
    for f in files:
        st = os.stat(f)
        stat.append((f, st.st_size, int(st.st_mtime)))
    key = hashlib.sha256(json.dumps(stat).encode()).hexdigest()[:16]
    size = sum(s for _, s, _ in stat)
    path = os.path.join(cache_dir(), name, f"{name}-{key}.cpio.gz")
    hit = _cached(path, what, log)
    if hit is not None:
        return hit, True, size
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with locked(path, f"building {what}", log):
        hit = _cached(path, what, log)
        if hit is not None:
            return hit, True, size
        return _pack(stat, path, what, log), False, size


def _cached(path: str, what: str, log) -> bytes | None:
    """The archive at `path` if its sidecar manifest (PATH.json: size and SHA-256, written
    after it) matches; a damaged or unfinished one is said and removed."""
    side = path + ".json"
    if not os.path.exists(path):
        return None
    try:
        with open(side) as f:
            want = json.load(f)
    except (OSError, ValueError):
        want = None
    with open(path, "rb") as f:
        blob = f.read()
    if want and len(blob) == want.get("size") and \
            hashlib.sha256(blob).hexdigest() == want.get("sha256"):
        return blob
    log(f"the cached {what} ({os.path.basename(path)}) is damaged or unfinished: building "
        "it again")
    for p in (path, side):
        with contextlib.suppress(OSError):
            os.unlink(p)
    return None


def _pack(stat, path: str, what: str, log) -> bytes:
    files = [f for f, _, _ in stat]
    size = sum(s for _, s, _ in stat)
    log(f"building {what} ({len(files)} files, {size / 2**20:.1f} MiB)")
    entries, dirs = [], set()
    for f, _, mtime in stat:
        parent = os.path.dirname(f).lstrip("/")
        chain = []
        while parent and parent not in dirs:
            chain.append(parent)
            dirs.add(parent)
            parent = os.path.dirname(parent)
        entries += [Entry(d, 0o040755) for d in reversed(chain)]
        mode = os.stat(f).st_mode
        with open(f, "rb") as fh:
            entries.append(Entry(f.lstrip("/"), 0o100000 | (mode & 0o777), fh.read(),
                                 mtime=mtime))
    blob = gzip.compress(cpio_newc(entries), compresslevel=6, mtime=0)
    folder = os.path.dirname(path)
    for target, data in ((path, blob),
                         (path + ".json", json.dumps({"size": len(blob), "sha256":
                                                      hashlib.sha256(blob).hexdigest()})
                          .encode())):
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".pack-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return blob


def ldd(path: str) -> list[str]:
    """The shared libraries (and loader) `path` loads, by absolute path."""
    import re
    import subprocess
    p = subprocess.run(["ldd", path], capture_output=True, text=True)
    out = []
    for line in p.stdout.splitlines():
        m = re.search(r"(/\S+)\s+\(0x", line)
        if m:
            out.append(m.group(1))
    return out
