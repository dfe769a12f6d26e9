"""One results envelope for everything pyvmm writes: run.json, stress, ptwrite, check,
lab matrix, lab run and soak documents all carry the same head, so a reader (or another
tool) can tell what wrote a file, from which commit, on which host and with which
command line, before it looks at the payload. Written atomically (temporary file, fsync,
rename), so an interrupted writer never leaves half a file.

    {"schema": "pyvmm.<kind>/<version>", "pyvmm": {"version", "commit"},
     "created": ISO time, "command": argv, "host": host facts,
     "writer": {"pid", "boot_id", "hostname"}, ...payload}

A document still marked 'running' whose writer is gone (killed with SIGKILL, the machine
restarted) is told apart from one being written: run_state(). Run directories are made
here too (new_run_dir), and figures saved (save_figure): one home for what commands write.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import sys
import time

from .errors import NO_SPACE, DiskFull, disk_full


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def new_run_dir(parent: str, name: str) -> str:
    """A new directory PARENT/NAME-YYYYmmdd-HHMMSS (with -2, -3... when that exists) for
    one run of any command: `pyvmm bench` names it after the host and kernel, the lab
    and trace after theirs, multi-variant experiments after the experiment."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(parent, safe_name(f"{name}-{stamp}"))
    final, n = path, 1
    while True:
        try:
            os.makedirs(final)
            return final
        except FileExistsError:
            n += 1
            final = f"{path}-{n}"


def save_figure(fig, out_dir: str, stem: str) -> list[str]:
    """A matplotlib figure as STEM.png and STEM.svg in `out_dir`; the figure is closed."""
    import matplotlib.pyplot as plt
    paths = []
    fig.tight_layout()
    for ext in ("png", "svg"):
        p = os.path.join(out_dir, f"{stem}.{ext}")
        fig.savefig(p, dpi=110)
        paths.append(p)
    plt.close(fig)
    return paths


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def pyvmm_build() -> dict:
    """pyvmm's version and the git commit it was built from (recorded by the build)."""
    from . import __version__
    try:
        from ._build import COMMIT
    except ImportError:
        COMMIT = None
    return {"version": __version__, "commit": COMMIT}


def envelope(schema: str, host: dict | None = None, **payload) -> dict:
    """A new document: the common head, then the payload's keys."""
    if host is None:
        from .hostinfo import collect
        host = collect(with_kvm=False)
    doc = {"schema": schema, "pyvmm": pyvmm_build(), "created": now_iso(),
           "command": list(sys.argv), "host": host, "writer": writer()}
    doc.update(payload)
    return doc


def partial_lines(con, docs: list[dict], paths: list[str]) -> None:
    """A line on `con` for each document that is not complete: interrupted, failed,
    still being written, or died (run_state)."""
    for d, p in zip(docs, paths):
        if d.get("status") != "complete":
            con.print(f"[yellow]{p}: {run_state(d)}[/] (partial results)", highlight=False)


def write_json_atomic(path: str, doc: dict) -> None:
    """Write `doc` to a temporary file beside `path`, fsync, rename: an interrupted or
    failed write leaves the last complete copy. A full disk is DiskFull, one line."""
    text = json.dumps(doc, separators=(",", ":"))
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if e.errno in NO_SPACE:
            kept = ("the last complete copy is intact" if os.path.exists(path)
                    else "nothing was written")
            raise disk_full(path, len(text), kept) from None
        raise


SAVE_EVERY_S = 2.0      # a document being filled is rewritten at most this often


class Saver:
    """Writes `doc` to `path` atomically, at most every `every_s` seconds unless forced,
    so a long run's file is always valid and never far behind."""

    def __init__(self, path: str, doc: dict, every_s: float = SAVE_EVERY_S):
        self.path, self.doc, self.every_s = path, doc, every_s
        self._last = 0.0

    def __call__(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= self.every_s:
            try:
                write_json_atomic(self.path, self.doc)
            except DiskFull:
                # mid-run: keep going (the samples are in memory, the file on disk is
                # the last complete copy) and try again at the next save; the final,
                # forced save reports it
                if force:
                    raise
            self._last = now


@contextlib.contextmanager
def finishing(doc: dict, save, timings: dict | None = None, t_start: float | None = None):
    """A results document's life cycle around the work that fills it: an interrupted run
    (Ctrl-C, SIGTERM) is marked 'interrupted', any other failure 'failed' (unless the
    body set a status), and the document is saved with its end time (and total wall
    time, given `timings` and `t_start`) whatever happens."""
    try:
        yield
    except KeyboardInterrupt:
        doc["status"] = "interrupted"
        raise
    except BaseException:
        if doc.get("status") == "running":
            doc["status"] = "failed"
        raise
    finally:
        if timings is not None and t_start is not None:
            timings["total_s"] = round(time.monotonic() - t_start, 1)
        doc["finished"] = now_iso()
        save()


# --- a document's writer: alive, or gone ------------------------------------------------

def boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def writer() -> dict:
    """Who writes a document: enough to tell later whether that process still runs."""
    return {"pid": os.getpid(), "boot_id": boot_id(), "hostname": os.uname().nodename}


def _alive(pid: int) -> bool:
    """Whether `pid` runs and is a Python process (a pid reused by something else is not
    the writer)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return True
    return b"python" in cmd or b"pyvmm" in cmd


def run_state(doc: dict, saved: float | None = None) -> str:
    """A document's status as a reader should see it: 'complete', 'interrupted',
    'failed', 'running', or, for one marked running whose writer is gone, 'died (last
    saved at ...)'. `saved`: the file's mtime (load_run records it)."""
    status = doc.get("status")
    if status != "running":
        return str(status)
    w = doc.get("writer") or {}
    saved = saved if saved is not None else (doc.get("_source") or {}).get("mtime")
    when = (" (last saved at " + _dt.datetime.fromtimestamp(saved).astimezone().isoformat(
        timespec="seconds") + ")") if saved else ""
    if not w.get("pid"):
        return "running (written before pyvmm recorded its writer; cannot tell if it died)"
    if w.get("hostname") != os.uname().nodename:
        return f"running on {w.get('hostname')}, or died there: cannot tell from here{when}"
    if w.get("boot_id") and boot_id() and w["boot_id"] != boot_id():
        return f"died: the machine restarted since{when}"
    if not _alive(int(w["pid"])):
        return f"died: its process ({w['pid']}) is gone{when}"
    return "running"


