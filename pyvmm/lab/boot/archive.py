"""Host files packed for the initramfs at their own absolute paths (a gzip'd newc cpio the
kernel unpacks after the initramfs proper), cached under <cache>/NAME/ by the file list
with each file's size and mtime: the Python runtime, the VMM a lab job traces."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tempfile

from ..sources.cache import cache_dir
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
    if os.path.exists(path):
        with open(path, "rb") as f:
            return f.read(), True, size
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
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{name}-")
    with os.fdopen(fd, "wb") as f:
        f.write(blob)
    os.replace(tmp, path)
    return blob, False, size


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
