"""Per-syscall comparison of the C helper and the Python VMM on the same recipe.

Both drivers boot the recipe in this process, on this thread, while the kernel's
raw_syscalls tracepoints record every syscall the thread makes (tracefs, filtered to
the thread id). Neither driver is changed for it: both read CLOCK_THREAD_CPUTIME_ID
(a real syscall) at the start and the end of every phase, so those reads cut the trace
into boots and phases. Per phase this gives each syscall's time in the kernel, and the
time the thread spent in user space between them; the same ioctl should cost the
same from either side, so what differs is the extra syscalls one side makes and the
user-space time around them.

Timestamps come from trace_clock x86-tsc, converted to ns against CLOCK_MONOTONIC
with two trace_marker writes 50 ms apart; where that clock is missing, from 'mono',
which tracefs prints in whole microseconds (the tables then say so).
"""

from __future__ import annotations

import difflib
import os
import re
import statistics
import subprocess
import threading
import time

from ..errors import PyvmmError, TraceUnavailable

TRACEFS = "/sys/kernel/tracing"
CLOCK_THREAD_CPUTIME_ID = 3
NR_CLOCK_GETTIME = 228          # x86_64

# x86_64 syscall numbers a boot can make (others print as 'syscall N').
SYSCALL_NAMES = {
    0: "read", 1: "write", 3: "close", 9: "mmap", 10: "mprotect", 11: "munmap",
    13: "rt_sigaction", 14: "rt_sigprocmask", 16: "ioctl", 28: "madvise", 39: "getpid",
    186: "gettid", 202: "futex", 203: "sched_setaffinity", 204: "sched_getaffinity",
    228: "clock_gettime", 234: "tgkill", 257: "openat", 262: "newfstatat", 290: "eventfd2",
    302: "prlimit64", 309: "getcpu", 319: "memfd_create", 435: "clone3",
}

_LINE = re.compile(r"-(\d+)\s+\[\d+\]\s+\S+\s+(\d+(?:\.\d+)?): (\w+): (.*)$")
_ENTER = re.compile(r"NR (\d+) \(([0-9a-f, ]*)\)")
_EXIT = re.compile(r"NR (\d+) = (-?\d+)")
_MARK = re.compile(r"pyvmm-cal(\d) (\d+)")


def _ioctl_names() -> dict[int, str]:
    from ..abi import IOCTLS
    return {i.number: name for name, i in IOCTLS.items()}


class Call:
    """One syscall of the traced thread: number, arguments, entry and exit times (ns)."""

    __slots__ = ("nr", "args", "t_in", "t_out", "ret", "faults_before")

    def __init__(self, nr: int, args: tuple[int, ...], t_in: float, faults_before: int = 0):
        self.nr, self.args, self.t_in = nr, args, t_in
        self.t_out = t_in
        self.ret = 0
        self.faults_before = faults_before      # user page faults since the last call

    def name(self, ioctls: dict[int, str]) -> str:
        base = SYSCALL_NAMES.get(self.nr, f"syscall {self.nr}")
        if self.nr == 16 and len(self.args) > 1:
            return ioctls.get(self.args[1], f"ioctl {self.args[1]:#x}")
        return base

    @property
    def is_cpu_clock(self) -> bool:
        return (self.nr == NR_CLOCK_GETTIME and bool(self.args)
                and self.args[0] == CLOCK_THREAD_CPUTIME_ID)


def parse_trace(text: str, tid: int) -> tuple[list[Call], list[tuple[int, float]]]:
    """Calls of thread `tid` in order, and the calibration marks (index, raw timestamp).
    Timestamps stay in the trace's unit (seconds for 'mono', cycles for 'x86-tsc')."""
    calls: list[Call] = []
    marks: list[tuple[int, float, int]] = []
    open_call = None
    faults = 0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = _LINE.search(line)
        if not m or int(m.group(1)) != tid:
            continue
        ts = float(m.group(2))
        kind, rest = m.group(3), m.group(4)
        if kind == "sys_enter":
            e = _ENTER.match(rest)
            if e:
                args = tuple(int(a, 16) for a in e.group(2).split(",") if a.strip())
                open_call = Call(int(e.group(1)), args, ts, faults)
                faults = 0
        elif kind == "sys_exit":
            e = _EXIT.match(rest)
            if e and open_call is not None and open_call.nr == int(e.group(1)):
                open_call.t_out = ts
                open_call.ret = int(e.group(2))
                calls.append(open_call)
                open_call = None
        elif kind == "page_fault_user":
            faults += 1
        elif kind == "tracing_mark_write":
            k = _MARK.search(rest)
            if k:
                marks.append((int(k.group(1)), ts, int(k.group(2))))
    return calls, marks


class SyscallTrace:
    """raw_syscalls of one thread, recorded in tracefs. Restores every setting it
    touched on exit."""

    EVENTS = ("raw_syscalls", "exceptions/page_fault_user")
    FILES = ("trace_clock", "tracing_on") + tuple(
        f"events/{e}/{f}" for e in EVENTS for f in ("filter", "enable"))

    def __init__(self, tid: int | None = None, root: str = TRACEFS):
        self.tid = tid or threading.get_native_id()
        self.root = root
        self._saved: dict[str, str] = {}
        self.events: list[str] = []
        self.clock = "mono"
        self.ns_per_tick = 1e9      # 'mono' prints seconds

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def _read(self, name: str) -> str:
        with open(self._path(name)) as f:
            return f.read()

    def _write(self, name: str, value: str) -> None:
        with open(self._path(name), "w") as f:
            f.write(value)

    def __enter__(self) -> "SyscallTrace":
        if not os.path.exists(self._path("trace")) and os.geteuid() == 0:
            subprocess.run(["mount", "-t", "tracefs", "nodev", self.root],
                           capture_output=True)
        if not os.path.exists(self._path("events/raw_syscalls/enable")):
            if not os.path.exists(self._path("trace")):
                raise TraceUnavailable(
                    f"tracefs is not mounted at {self.root}: mount -t tracefs nodev "
                    f"{self.root} (as root)")
            raise TraceUnavailable(f"{self.root}/events/raw_syscalls is missing: this kernel "
                                   f"has no syscall tracepoints (CONFIG_FTRACE_SYSCALLS)")
        if not os.access(self._path("tracing_on"), os.W_OK):
            raise TraceUnavailable(f"{self.root} is not writable: run as root")
        self.events = [e for e in self.EVENTS
                       if os.path.exists(self._path(f"events/{e}/enable"))]
        for name in self.FILES:
            if os.path.exists(self._path(name)):
                self._saved[name] = self._read(name)
        clocks = self._saved["trace_clock"]
        self.clock = "x86-tsc" if "x86-tsc" in clocks.replace("[", " ").replace("]", " ") \
            .split() else "mono"
        self._write("tracing_on", "0")
        self._write("trace_clock", self.clock)
        self._write("trace", "")
        for e in self.events:
            self._write(f"events/{e}/filter", f"common_pid == {self.tid}")
            self._write(f"events/{e}/enable", "1")
        return self

    def __exit__(self, *exc) -> None:
        self._write("tracing_on", "0")
        for e in self.events:
            self._write(f"events/{e}/enable", "0")
        self._write("trace", "")
        for name, old in self._saved.items():
            old = old.strip()
            if name == "trace_clock":
                sel = re.search(r"\[(\S+)\]", old)
                old = sel.group(1) if sel else "local"
            elif name.endswith("/filter"):
                old = "0" if old == "none" else old
            else:
                old = old.lstrip("*") or "0"
            if name != "tracing_on":
                self._write(name, old)
        self._write("tracing_on", self._saved.get("tracing_on", "0").strip() or "0")

    def record(self, fn) -> list[Call]:
        """Run fn() with tracing on; return this thread's calls, timestamps in ns."""
        self._write("trace", "")
        self._write("tracing_on", "1")
        self._mark(0)
        try:
            fn()
        finally:
            time.sleep(0.05)
            self._mark(1)
            self._write("tracing_on", "0")
        text = self._read("trace")
        lost = self._lost()
        if lost:
            raise PyvmmError(f"tracefs dropped {lost} events (buffer too small): trace fewer "
                             f"boots (--repeats) or raise {self.root}/buffer_size_kb")
        calls, marks = parse_trace(text, self.tid)
        scale = ns_per_tick(self.clock, marks)
        for c in calls:
            c.t_in *= scale
            c.t_out *= scale
        return calls

    def _mark(self, k: int) -> None:
        with open(self._path("trace_marker"), "w") as f:
            f.write(f"pyvmm-cal{k} {time.monotonic_ns()}")

    def _lost(self) -> int:
        total = 0
        percpu = self._path("per_cpu")
        for cpu in os.listdir(percpu) if os.path.isdir(percpu) else ():
            try:
                with open(os.path.join(percpu, cpu, "stats")) as f:
                    for line in f:
                        if line.startswith("overrun:"):
                            total += int(line.split()[1])
            except (OSError, ValueError):
                continue
        return total

    @property
    def resolution_ns(self) -> float:
        return 1.0 if self.clock == "x86-tsc" else 1000.0


def ns_per_tick(clock: str, marks) -> float:
    """ns per trace timestamp unit: 1e9 for 'mono' (seconds); for 'x86-tsc', from the two
    calibration marks (k, tsc, CLOCK_MONOTONIC ns) written 50 ms apart."""
    if clock != "x86-tsc":
        return 1e9
    by = {k: (ts, mono) for k, ts, mono in marks}
    if 0 not in by or 1 not in by or by[1][0] <= by[0][0]:
        raise PyvmmError("could not calibrate the x86-tsc trace clock: the trace_marker "
                         "writes are missing from the trace")
    return (by[1][1] - by[0][1]) / (by[1][0] - by[0][0])


# --- splitting into boots and phases ---------------------------------------------------
def split_phases(calls: list[Call], nphases: int, boots: int) -> list[list[list[Call]]]:
    """calls -> [boot][phase] -> the syscalls inside that phase, bracketed by the
    CPU-clock reads (kept as the first and last element of each list)."""
    marks = [i for i, c in enumerate(calls) if c.is_cpu_clock]
    need = 2 * nphases * boots
    if len(marks) != need:
        raise PyvmmError(f"expected {need} CPU-clock reads ({boots} boots x {nphases} phases "
                         f"x 2) in the trace, found {len(marks)}: a driver reads the thread "
                         f"CPU clock outside its phase timing")
    out = []
    for b in range(boots):
        phases = []
        for p in range(nphases):
            i0 = marks[2 * (b * nphases + p)]
            i1 = marks[2 * (b * nphases + p) + 1]
            phases.append(calls[i0:i1 + 1])
        out.append(phases)
    return out


def phase_profile(phase_boots: list[list[Call]], ioctls: dict[int, str]) -> dict:
    """One phase over many boots: the usual syscall sequence with the median kernel
    time of each, and medians of the phase's span, kernel and user-space time."""
    seqs = [tuple(c.name(ioctls) for c in calls[1:-1]) for calls in phase_boots]
    common = statistics.mode(seqs)
    same = [calls for calls, s in zip(phase_boots, seqs) if s == common]
    rows = []
    for k, name in enumerate(common):
        rows.append({"name": name, "kernel_ns": statistics.median(
            c[1 + k].t_out - c[1 + k].t_in for c in same)})
    span = [calls[-1].t_in - calls[0].t_out for calls in phase_boots]
    kern = [sum(c.t_out - c.t_in for c in calls[1:-1]) for calls in phase_boots]
    faults = [sum(c.faults_before for c in calls[1:]) for calls in phase_boots]
    return {"syscalls": rows, "boots": len(phase_boots), "usual": len(same),
            "span_ns": statistics.median(span), "kernel_ns": statistics.median(kern),
            "user_ns": statistics.median(s - k for s, k in zip(span, kern)),
            "count": statistics.median(len(s) for s in seqs),
            "page_faults": statistics.median(faults)}


def profile(calls: list[Call], labels: list[str], boots: int) -> list[dict]:
    ioctls = _ioctl_names()
    per_boot = split_phases(calls, len(labels), boots)
    return [dict(phase_profile([b[p] for b in per_boot], ioctls), phase=label)
            for p, label in enumerate(labels)]


def align(c_rows: list[dict], py_rows: list[dict]) -> list[tuple[dict | None, dict | None]]:
    """Pair the two sides' syscall lists by name; a call only one side makes gets None
    on the other."""
    a = [r["name"] for r in c_rows]
    b = [r["name"] for r in py_rows]
    out = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op == "equal":
            out += list(zip(c_rows[i1:i2], py_rows[j1:j2]))
        else:
            out += [(r, None) for r in c_rows[i1:i2]]
            out += [(None, r) for r in py_rows[j1:j2]]
    return out


# --- the measurement -------------------------------------------------------------------
def compare(recipe, boots: int = 30, warmup: int = 5, ioev_len: int = 4,
            timeout_ms: int = 10000) -> dict:
    """Trace `boots` boots of `recipe` from each driver (C first, then Python) on this
    thread, after `warmup` untraced boots of each."""
    from .. import runner as pyrunner
    from .native import NativeRunner

    c_run = NativeRunner(ioev_len, None, timeout_ms)

    def c_boots():
        for _ in range(boots):
            r = c_run.run(recipe)
            if not r["ok"]:
                raise PyvmmError(f"C helper boot failed: {r['error']}")

    def py_boots():
        for _ in range(boots):
            pyrunner.PyBoot(recipe, ioev_len=ioev_len, timeout=timeout_ms / 1000).run()

    for _ in range(warmup):
        c_run.run(recipe)
        pyrunner.PyBoot(recipe, ioev_len=ioev_len, timeout=timeout_ms / 1000).run()
    labels = [str(s) for s in recipe.steps] + ["teardown"]
    with SyscallTrace() as tr:
        c_calls = tr.record(c_boots)
        py_calls = tr.record(py_boots)
        clock, res = tr.clock, tr.resolution_ns
    return {"recipe": recipe.text, "boots": boots, "trace_clock": clock,
            "resolution_ns": res, "c": profile(c_calls, labels, boots),
            "py": profile(py_calls, labels, boots)}
