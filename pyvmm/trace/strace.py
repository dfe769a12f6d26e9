"""Without tracefs: the per-ioctl times of a start-up from `strace -f -T` (no sleeps, no
stacks, and the start-up runs several times slower under it)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

from ..errors import PyvmmError, TraceUnavailable
from . import model
from .record import Recording

_STRACE = re.compile(r"^(\d+)\s+(\d+\.\d+) ioctl\((\d+), ([A-Z0-9_]+|0x[0-9a-f]+)"
                     r"(?:, (.*))?\) = (-?\d+|\?)(?: \w+ \([^)]*\))? <(\d+\.\d+)>")


def record_strace(argv: list[str], timeout_s: float = 120.0, output=subprocess.DEVNULL,
                  tmpdir: str = "/tmp") -> Recording:
    """The fallback: per-ioctl times from strace (no sleeps, no stacks, slower)."""
    if not shutil.which("strace"):
        raise TraceUnavailable("neither tracefs (as root) nor strace is available: run "
                               "as root, or apt-get install strace")
    rec = Recording()
    rec.method = "strace"
    rec.notes.append("traced with strace -f -T (no tracefs here): the start-up runs several "
                     "times slower under it, and there are no sleeps or stacks")
    out = os.path.join(tmpdir, f"pyvmm-strace-{os.getpid()}.txt")
    t0 = time.monotonic_ns()
    p = subprocess.Popen(["strace", "-f", "-T", "-ttt", "-qq", "-e", "trace=ioctl", "-o",
                          out] + argv, stdin=subprocess.DEVNULL, stdout=output, stderr=output)
    try:
        rec.rc = p.wait(timeout_s)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise PyvmmError(f"{argv[0]} did not exit within {timeout_s:g} s under strace")
    rec.wall_ns = time.monotonic_ns() - t0
    rec.pid = p.pid
    try:
        with open(out) as f:
            text = f.read()
    finally:
        try:
            os.unlink(out)
        except OSError:
            pass
    rec.startup = from_strace(text, rec.wall_ns)
    return rec


def from_strace(text: str, wall_ns: int) -> model.Startup:
    """A Startup from `strace -f -T -ttt` output (pure): KVM ioctls with their times."""
    from . import ioctls
    s = model.Startup()
    t0 = None
    for line in text.splitlines():
        m = _STRACE.match(line)
        if not m:
            continue
        tid, ts, fd, req, rest, ret, dur = m.groups()
        t = float(ts) * 1e9
        if t0 is None:
            t0 = t
        if not req.startswith("KVM_") and not (req.startswith("0x") and
                                               ioctls.is_kvm(int(req, 16))):
            continue
        c = model.Ioctl(int(tid), int(tid), int(fd), 0, 0, t - t0)
        c.name = req if req.startswith("KVM_") else ioctls.name(int(req, 16))
        c.t_out = c.t_in + float(dur) * 1e9
        c.ret = int(ret) if ret != "?" else 0
        c.seq = len(s.ioctls)
        s.ioctls.append(c)
    s.milestones["exec"] = 0.0
    first: dict[str, float] = {}
    for c in s.ioctls:
        first.setdefault(c.name, c.t_in)
    for label, name in (("KVM_CREATE_VM", "KVM_CREATE_VM"),
                        ("first KVM_CREATE_VCPU", "KVM_CREATE_VCPU"),
                        ("first KVM_RUN", "KVM_RUN")):
        if name in first:
            s.milestones[label] = first[name]
    s.milestones["process end"] = float(wall_ns)
    return s
