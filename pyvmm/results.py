"""One results envelope for everything pyvmm writes: run.json, stress, ptwrite, check,
lab matrix, lab run and soak documents all carry the same head, so a reader (or another
tool) can tell what wrote a file, from which commit, on which host and with which
command line, before it looks at the payload. Written atomically (temporary file, fsync,
rename), so an interrupted writer never leaves half a file.

    {"schema": "pyvmm.<kind>/<version>", "pyvmm": {"version", "commit"},
     "created": ISO time, "command": argv, "host": host facts, ...payload}
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import sys


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


def write_json_atomic(path: str, doc: dict) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
