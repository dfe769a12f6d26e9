"""Whether the process that writes a results document still does (pure but for /proc):
the writer's pid, boot id and host are recorded in the document's head; a document
marked 'running' whose writer is gone is reported as died, with when it was last saved."""

from __future__ import annotations

import datetime as _dt
import os


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


