"""One results envelope for everything pyvmm writes: run.json, stress, ptwrite, check,
lab matrix, lab run and soak documents all carry the same head, so a reader (or another
tool) can tell what wrote a file, from which commit, on which host and with which
command line, before it looks at the payload. Written atomically (temporary file, fsync,
rename), so an interrupted writer never leaves half a file.

    {"schema": "pyvmm.<kind>/<version>", "pyvmm": {"version", "commit"},
     "created": ISO time, "command": argv, "host": host facts, ...payload}
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import sys
import time


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
           "command": list(sys.argv), "host": host}
    doc.update(payload)
    return doc


def new_doc(cfg, host: dict, environment: str, clock: dict | None) -> dict:
    """An empty run.json document for a sweep of `cfg` (a SweepConfig), status
    'running'; the bench and the lab append samples to it."""
    from .analysis.plan import SCHEMA
    return envelope(SCHEMA, host, status="running", finished=None,
                    environment=environment, config=cfg.to_dict(), clock=clock,
                    kernel_check=None, failures=[], samples=[])


def write_json_atomic(path: str, doc: dict) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
            write_json_atomic(self.path, self.doc)
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
