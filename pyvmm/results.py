"""One results envelope for everything pyvmm writes: run.json, stress, ptwrite, check,
lab matrix, lab run and soak documents all carry the same head, so a reader (or another
tool) can tell what wrote a file, from which commit, on which host and with which
command line, before it looks at the payload. Written atomically (temporary file, fsync,
rename), so an interrupted writer never leaves half a file.

    {"schema": "pyvmm.<kind>/<version>", "pyvmm": {"version", "commit"},
     "created": ISO time, "command": argv, "host": host facts,
     "writer": {"pid", "boot_id", "hostname"}, ...payload}

A document still marked 'running' whose writer is gone (killed with SIGKILL, the machine
restarted) is told apart from one being written: analysis.liveness.run_state().
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import sys
import time

from .analysis.liveness import run_state, writer
from .errors import NO_SPACE, DiskFull, disk_full


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


def new_doc(cfg, host: dict, environment: str, clock: dict | None) -> dict:
    """An empty run.json document for a sweep of `cfg` (a SweepConfig), status
    'running'; the bench and the lab append samples to it."""
    from .analysis.plan import SCHEMA
    return envelope(SCHEMA, host, status="running", finished=None,
                    environment=environment, config=cfg.to_dict(), clock=clock,
                    kernel_check=None, failures=[], samples=[])


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
