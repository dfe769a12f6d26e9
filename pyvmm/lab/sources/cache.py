"""The lab's cache: PYVMM_CACHE, else $XDG_CACHE_HOME/pyvmm, else ~/.cache/pyvmm.
Downloads, kits, module and kernel builds and runtimes live under it, each entry written
under a temporary name and renamed into place, so an interrupted writer never leaves half
an entry. Two more guarantees:

- Concurrency: an entry is filled under an exclusive lock of its own (flock on a file
  under <cache>/locks/, released by the kernel when its holder exits, however it exits),
  so two
  pyvmm commands never download or build the same entry at once; the one that waits says
  for what, and then finds the entry made.
- Integrity: a derived entry (kit, build, runtime) carries a manifest of its files' sizes
  and SHA-256, checked before the entry is used; a damaged entry is said in one line and
  made again. Downloads are checked against the size and SHA-256 of the package index.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile


def cache_dir() -> str:
    base = os.environ.get("PYVMM_CACHE")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(xdg, "pyvmm")
    os.makedirs(base, exist_ok=True)
    return base


@contextlib.contextmanager
def locked(entry: str, what: str, log=print):
    """Hold the lock of one cache entry (a path) while filling it: an exclusive flock; a
    second holder waits, after saying which process it waits for and for what. The
    caller checks again, inside, whether the entry is now there."""
    # one lock file per entry, kept apart (<cache>/locks/) so that entry folders hold
    # entries only
    key = hashlib.sha256(os.path.abspath(entry).encode()).hexdigest()[:24]
    lock = os.path.join(cache_dir(), "locks", f"{key}.lock")
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            except OSError:
                holder = "?"
            log(f"waiting for another pyvmm (pid {holder}), which is {what}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest(folder: str, names) -> dict[str, list]:
    """{name: [size, sha256]} of files under `folder` (relative names)."""
    out = {}
    for name in names:
        path = os.path.join(folder, name)
        out[name] = [os.path.getsize(path), sha256_file(path)]
    return out


def manifest_problem(folder: str, files: dict | None) -> str | None:
    """What is wrong with an entry against its manifest, or None. An entry written before
    manifests existed (None) passes."""
    if files is None:
        return None
    for name, (size, digest) in sorted(files.items()):
        path = os.path.join(folder, name)
        try:
            have = os.path.getsize(path)
        except OSError:
            return f"{name} is missing"
        if have != size:
            return f"{name} has {have} bytes, its manifest {size}"
        if sha256_file(path) != digest:
            return f"{name} does not match its SHA-256"
    return None


def whole_entry(final: str, meta_name: str, what: str, log=print) -> dict | None:
    """The metadata of the entry at `final` (META_NAME, written last: without it there is
    no entry) if the files its manifest lists are whole; a damaged entry is said, removed,
    and None returned, so that the caller makes it again. `what`: how the message names
    it and what happens next ('kit X ... unpacking it again')."""
    path = os.path.join(final, meta_name)
    if not os.path.exists(path):
        return None
    import json
    import shutil
    with open(path) as f:
        meta = json.load(f)
    problem = manifest_problem(final, meta.get("files"))
    if problem is None:
        return meta
    name, _, again = what.partition("|")
    log(f"the cached {name} {os.path.basename(final)} is damaged ({problem}): {again}")
    shutil.rmtree(final, ignore_errors=True)
    return None


def atomic_dir(parent: str, final: str, fill, prefix: str, what: str = "filling the cache",
                log=print) -> str:
    """Create `final` by filling a temporary sibling and renaming it, under the entry's
    lock (another command filling it meanwhile: this one waits and uses theirs)."""
    if os.path.isdir(final):
        return final
    os.makedirs(parent, exist_ok=True)
    with locked(final, what, log):
        if os.path.isdir(final):
            return final
        return fill_dir(parent, final, fill, prefix, log)


# what tempfile.mkdtemp appends to a prefix
_MKDTEMP_TAIL = re.compile(r"[a-z0-9_]{8}")


def remove_leftovers(parent: str, stem: str, log=print) -> None:
    """Temporary siblings named STEM + mkdtemp's 8 characters that a killed fill left
    (SIGKILL, a machine restart). The caller holds the entry's lock, so no live fill owns
    them; another entry whose name starts with this one's is not matched."""
    try:
        names = os.listdir(parent)
    except FileNotFoundError:
        return
    for name in names:
        if name.startswith(stem) and _MKDTEMP_TAIL.fullmatch(name[len(stem):]):
            log(f"removing {name}, left by an earlier fill of the cache that did not finish")
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def fill_dir(parent: str, final: str, fill, prefix: str, log=print) -> str:
    """`final` made by fill(tmp) in a temporary sibling named after it (PREFIX + the
    entry's name), then renamed. Called with the entry's lock held: what an earlier fill
    of the same entry left when it was killed is removed first."""
    stem = f"{prefix}{os.path.basename(final)}-"
    remove_leftovers(parent, stem, log)
    tmp = tempfile.mkdtemp(prefix=stem, dir=parent)
    try:
        fill(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            # another lab command filled the same entry meanwhile: keep theirs
            if not os.path.isdir(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def made_entry(final: str, meta_name: str, what: str, fill, log=print) -> dict:
    """The entry at `final` (its META_NAME, written last by fill(tmp), with a manifest):
    made in a temporary sibling under the entry's lock when it is missing or damaged."""
    meta = whole_entry(final, meta_name, f"{what}|making it again", log)
    if meta is not None:
        return meta
    os.makedirs(os.path.dirname(final), exist_ok=True)
    with locked(final, f"making the {what}", log):
        meta = whole_entry(final, meta_name, f"{what}|making it again", log)
        if meta is None:
            if os.path.exists(final):
                shutil.rmtree(final)
            fill_dir(os.path.dirname(final), final, fill, f".{meta_name.split('.')[0]}-",
                     log)
            with open(os.path.join(final, meta_name)) as f:
                meta = json.load(f)
    return meta
