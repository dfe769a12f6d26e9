"""Per-syscall comparison of the C helper and the Python VMM on the same recipe.

Both drivers boot the recipe in this process, on this thread, while the kernel's
raw_syscalls tracepoints record every syscall the thread makes (tracefs, filtered to
the thread id). Neither driver is changed for it: both read CLOCK_THREAD_CPUTIME_ID
(a real syscall) at the start and the end of every phase, so those reads cut the trace
into boots and phases. Per phase this gives each syscall's time in the kernel, and the
time the thread spent in user space between them; the same ioctl should cost the
same from either side, so what differs is the extra syscalls one side makes and the
user-space time around them.

The tracefs session, its clock and the text parser are pyvmm.tracefs's; where the
x86-tsc clock is missing the trace clock is 'mono', which tracefs prints in whole
microseconds (the tables then say so).
"""

from __future__ import annotations

import difflib
import statistics
import threading

from .. import tracefs
from ..errors import PyvmmError
from ..tracefs import SYSCALL_NAMES, TRACEFS, ns_per_tick

CLOCK_THREAD_CPUTIME_ID = 3
NR_CLOCK_GETTIME = 228          # x86_64


def _ioctl_names() -> dict[int, str]:
    from ..vmm.abi import IOCTLS
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
        ev = tracefs.parse_line(line)
        if ev is None or ev[0] != tid:
            continue
        _, ts, kind, rest = ev
        if kind == "sys_enter":
            e = tracefs.sys_enter(rest)
            if e:
                open_call = Call(e[0], e[1], ts, faults)
                faults = 0
        elif kind == "sys_exit":
            e = tracefs.sys_exit(rest)
            if e and open_call is not None and open_call.nr == e[0]:
                open_call.t_out = ts
                open_call.ret = e[1]
                calls.append(open_call)
                open_call = None
        elif kind == "page_fault_user":
            faults += 1
        elif kind == "tracing_mark_write":
            k = tracefs.calibration_mark(rest)
            if k:
                marks.append((k[0], ts, k[1]))
    return calls, marks


class SyscallTrace(tracefs.Session):
    """raw_syscalls (and user page faults) of one thread, recorded in tracefs. Restores
    every setting it touched on exit."""

    EVENTS = ("raw_syscalls", "exceptions/page_fault_user")

    def __init__(self, tid: int | None = None, root: str = TRACEFS):
        self.tid = tid or threading.get_native_id()
        super().__init__({e: f"common_pid == {self.tid}" for e in self.EVENTS}, root)

    def __enter__(self) -> "SyscallTrace":
        self.check("raw_syscalls", "this kernel has no syscall tracepoints "
                                   "(CONFIG_FTRACE_SYSCALLS)")
        super().__enter__()
        return self

    def record(self, fn) -> list[Call]:
        """Run fn() with tracing on; return this thread's calls, timestamps in ns."""
        text = super().record(fn, less="trace fewer boots (--repeats)")
        calls, marks = parse_trace(text, self.tid)
        scale = ns_per_tick(self.clock, marks)
        for c in calls:
            c.t_in *= scale
            c.t_out *= scale
        return calls


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
    from ..drivers import runner as pyrunner
    from ..drivers.native import NativeRunner

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
