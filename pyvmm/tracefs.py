"""The kernel's tracefs, below every room that traces: a session that mounts it when
needed, changes settings (events, their filters and triggers, the trace clock) and
restores every one it changed, records with calibration marks, and the parser of the
text the kernel prints. `pyvmm bench --per-ioctl` and the tracer of other processes
both read through here.

Timestamps come from trace_clock x86-tsc where the kernel has it, converted to ns
against CLOCK_MONOTONIC with two trace_marker writes 50 ms apart; elsewhere from
'mono', which tracefs prints in whole microseconds.
"""

from __future__ import annotations

import os
import re
import subprocess
import time

from .errors import PyvmmError, TraceUnavailable

TRACEFS = "/sys/kernel/tracing"

# x86_64 syscall numbers a boot can make (others print as 'syscall N').
SYSCALL_NAMES = {
    0: "read", 1: "write", 3: "close", 9: "mmap", 10: "mprotect", 11: "munmap",
    13: "rt_sigaction", 14: "rt_sigprocmask", 16: "ioctl", 28: "madvise", 39: "getpid",
    186: "gettid", 202: "futex", 203: "sched_setaffinity", 204: "sched_getaffinity",
    228: "clock_gettime", 234: "tgkill", 257: "openat", 262: "newfstatat", 290: "eventfd2",
    302: "prlimit64", 309: "getcpu", 319: "memfd_create", 435: "clone3",
}

# One event line: "  comm-PID  [CPU] flags  TIMESTAMP: EVENT: BODY"
_LINE = re.compile(r"-(\d+)\s+\[\d+\]\s+\S+\s+(\d+(?:\.\d+)?): (\w+): (.*)$")
_ENTER = re.compile(r"NR (\d+) \(([0-9a-f, ]*)\)")
_EXIT = re.compile(r"NR (\d+) = (-?\d+)")
_MARK = re.compile(r"pyvmm-cal(\d) (\d+)")


def parse_line(line: str) -> tuple[int, float, str, str] | None:
    """(pid, raw timestamp, event, body) of one event line, None for anything else."""
    if line.startswith("#"):
        return None
    m = _LINE.search(line)
    if not m:
        return None
    return int(m.group(1)), float(m.group(2)), m.group(3), m.group(4)


def sys_enter(body: str) -> tuple[int, tuple[int, ...]] | None:
    """A raw_syscalls:sys_enter body -> (syscall number, arguments)."""
    e = _ENTER.match(body)
    if not e:
        return None
    return int(e.group(1)), tuple(int(a, 16) for a in e.group(2).split(",") if a.strip())


def sys_exit(body: str) -> tuple[int, int] | None:
    """A raw_syscalls:sys_exit body -> (syscall number, return value)."""
    e = _EXIT.match(body)
    return (int(e.group(1)), int(e.group(2))) if e else None


# sched_switch's body: "prev_comm=C prev_pid=P ... prev_state=S ==> next_comm=C next_pid=P"
_SWITCH = re.compile(r"(?:prev_comm=(.*?) )?prev_pid=(\d+) .*?prev_state=(\S+) ==> "
                     r"next_comm=(.*?) next_pid=(\d+)")


def sched_switch(body: str) -> tuple[str | None, int, str, str, int] | None:
    """A sched_switch body -> (prev_comm, prev_pid, prev_state, next_comm, next_pid)."""
    m = _SWITCH.search(body)
    if not m:
        return None
    return m.group(1), int(m.group(2)), m.group(3), m.group(4), int(m.group(5))


def calibration_mark(body: str) -> tuple[int, int] | None:
    """A trace_marker write of Session.mark -> (k, CLOCK_MONOTONIC ns)."""
    k = _MARK.search(body)
    return (int(k.group(1)), int(k.group(2))) if k else None


def calibration_marks(events) -> list[tuple[int, float, int]]:
    """(k, trace timestamp, CLOCK_MONOTONIC ns) of each calibration mark among parsed
    events (parse_events), for ns_per_tick."""
    return [(k[0], e.ts, k[1]) for e in events if e.name == "tracing_mark_write"
            for k in [calibration_mark(e.body)] if k]


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


def overruns(percpu: str) -> int:
    """Events the ring buffer dropped, summed over a tracing directory's per_cpu/*/stats."""
    total = 0
    for cpu in os.listdir(percpu) if os.path.isdir(percpu) else ():
        try:
            with open(os.path.join(percpu, cpu, "stats")) as f:
                for line in f:
                    if line.startswith("overrun:"):
                        total += int(line.split()[1])
        except (OSError, ValueError):
            continue
    return total


class _Files:
    """A tracefs directory's files (the top one, or an instance's): `dir` is set by
    the subclass."""

    dir = TRACEFS

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def read(self, name: str) -> str:
        with open(self.path(name)) as f:
            return f.read()

    def write(self, name: str, value: str) -> None:
        with open(self.path(name), "w") as f:
            f.write(value)

    def has(self, name: str) -> bool:
        return os.path.exists(self.path(name))


class Session(_Files):
    """One use of tracefs. `events` maps an event ('raw_syscalls', 'sched/sched_switch')
    to its filter ('' for none); events the kernel lacks are left out (`self.events`
    says which are on). Every file written is read first and restored on exit."""

    def __init__(self, events: dict[str, str], root: str = TRACEFS):
        self.root = self.dir = root
        self.wanted = dict(events)
        self.events: list[str] = []
        self.clock = "mono"
        self._saved: dict[str, str] = {}

    def set(self, name: str, value: str) -> None:
        """Write a setting, keeping its old value for the restore."""
        if name not in self._saved and os.path.exists(self.path(name)):
            self._saved[name] = self.read(name)
        self.write(name, value)

    # --- life cycle ----------------------------------------------------------------------
    def check(self, required: str, lacking: str = "this kernel lacks that tracepoint") -> None:
        """Mount tracefs if it is missing and we are root, then make sure `required`
        (an events directory) exists (else `lacking` says why) and the settings are
        writable."""
        if not self.has("trace") and os.geteuid() == 0:
            subprocess.run(["mount", "-t", "tracefs", "nodev", self.root],
                           capture_output=True)
        if not self.has(f"events/{required}/enable"):
            if not self.has("trace"):
                raise TraceUnavailable(
                    f"tracefs is not mounted at {self.root}: mount -t tracefs nodev "
                    f"{self.root} (as root)")
            raise TraceUnavailable(f"{self.root}/events/{required} is missing: {lacking}")
        if not os.access(self.path("tracing_on"), os.W_OK):
            raise TraceUnavailable(f"{self.root} is not writable: run as root")

    def __enter__(self) -> "Session":
        self.events = [e for e in self.wanted if self.has(f"events/{e}/enable")]
        self._saved["tracing_on"] = self.read("tracing_on")
        clocks = self.read("trace_clock")
        self.clock = "x86-tsc" if "x86-tsc" in clocks.replace("[", " ").replace("]", " ") \
            .split() else "mono"
        self.write("tracing_on", "0")
        self.set("trace_clock", self.clock)
        self.write("trace", "")
        for e in self.events:
            self.set(f"events/{e}/filter", self.wanted[e] or "0")
            self.set(f"events/{e}/enable", "1")
        return self

    def __exit__(self, *exc) -> None:
        self.write("tracing_on", "0")
        for e in self.events:
            self.write(f"events/{e}/enable", "0")
        self.write("trace", "")
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
                self.write(name, old)
        self.write("tracing_on", self._saved.get("tracing_on", "0").strip() or "0")

    # --- recording -----------------------------------------------------------------------
    def record(self, fn, less: str = "trace less") -> str:
        """Run fn() with tracing on, between two calibration marks; the trace's text.
        Dropped events are an error (`less` says how to trace less): a trace with holes
        would mislead."""
        self.write("trace", "")
        self.write("tracing_on", "1")
        self.mark(0)
        try:
            fn()
        finally:
            time.sleep(0.05)
            self.mark(1)
            self.write("tracing_on", "0")
        text = self.read("trace")
        lost = self.lost()
        if lost:
            raise PyvmmError(f"tracefs dropped {lost} events (buffer too small): {less} "
                             f"or raise {self.root}/buffer_size_kb")
        return text

    def mark(self, k: int) -> None:
        with open(self.path("trace_marker"), "w") as f:
            f.write(f"pyvmm-cal{k} {time.monotonic_ns()}")

    def lost(self) -> int:
        return overruns(self.path("per_cpu"))

    @property
    def resolution_ns(self) -> float:
        return 1.0 if self.clock == "x86-tsc" else 1000.0


# --- a private instance (pyvmm trace) -----------------------------------------------------

# One event line with the tgid column (options/record-tgid): "comm-TID (TGID) [CPU] ..."
_LINE_TGID = re.compile(r"^\s*(.*?)-(\d+)\s+\(\s*(\d+|-+)\)\s+\[(\d+)\]\s+\S+\s+"
                        r"(\d+(?:\.\d+)?): (<stack trace>|[^:]+)(?:: ?(.*))?$")
_FRAME = re.compile(r"^\s*=> (\S+)")


class Event:
    """One trace event: thread, process (tgid, or None), timestamp in trace units, the
    event's name and body, and the kernel stack a stacktrace trigger recorded after it."""

    __slots__ = ("comm", "tid", "tgid", "cpu", "ts", "name", "body", "stack")

    def __init__(self, comm, tid, tgid, cpu, ts, name, body):
        self.comm, self.tid, self.tgid, self.cpu = comm, tid, tgid, cpu
        self.ts, self.name, self.body = ts, name, body
        self.stack: list[str] | None = None

    def __repr__(self) -> str:
        return f"Event({self.name} tid={self.tid} ts={self.ts} {self.body!r})"


def parse_events(text: str) -> list[Event]:
    """Every event line of a trace written with record-tgid, in order. A '<stack trace>'
    record and its '=> function' lines become the `stack` (innermost first, offsets
    dropped) of the thread's last event before it; damaged lines are skipped."""
    out: list[Event] = []
    last: dict[int, Event] = {}
    frames: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        f = _FRAME.match(line)
        if f:
            if frames is not None:
                frames.append(f.group(1).split("+", 1)[0])
            continue
        m = _LINE_TGID.match(line)
        if not m:
            frames = None
            continue
        comm, tid, tgid, cpu, ts, name, body = m.groups()
        tid, body = int(tid), body or ""
        if name == "<stack trace>":
            owner = last.get(tid)
            frames = [] if owner is not None else None
            if owner is not None:
                owner.stack = frames
            continue
        frames = None
        ev = Event(comm, tid, int(tgid) if tgid.isdigit() else None, int(cpu), float(ts),
                   name, body)
        out.append(ev)
        last[tid] = ev
    return out


class Instance(_Files):
    """A tracefs instance of our own (instances/NAME): its own buffer, events, filters,
    triggers, options and pid list, so nothing of the main buffer is touched; removed
    on exit with the uprobes it defined. Use as a context manager."""

    def __init__(self, name: str, root: str = TRACEFS, buffer_kb: int = 16384):
        self.root = root
        self.name = name
        self.dir = os.path.join(root, "instances", name)
        self.buffer_kb = buffer_kb
        self.clock = "mono"
        self._triggers: list[tuple[str, str]] = []
        self._events: list[str] = []
        self._uprobes: list[str] = []

    def __enter__(self) -> "Instance":
        if not os.path.exists(os.path.join(self.root, "trace")):
            if os.geteuid() == 0:
                subprocess.run(["mount", "-t", "tracefs", "nodev", self.root],
                               capture_output=True)
            if not os.path.exists(os.path.join(self.root, "trace")):
                raise TraceUnavailable(
                    f"tracefs is not mounted at {self.root}: mount -t tracefs nodev "
                    f"{self.root} (as root)")
        if not os.path.isdir(os.path.join(self.root, "instances")):
            raise TraceUnavailable(f"{self.root} has no instances/ (tracefs instances need "
                                   "Linux 3.10 or later)")
        if os.path.isdir(self.dir):
            _remove_instance(self.dir)
        try:
            os.mkdir(self.dir)
        except PermissionError:
            raise TraceUnavailable(f"cannot create a tracefs instance under {self.root}: "
                                   "run as root") from None
        except OSError as e:
            raise TraceUnavailable(f"cannot create a tracefs instance: {e.strerror}") from None
        try:
            clocks = self.read("trace_clock").replace("[", " ").replace("]", " ").split()
            self.clock = "x86-tsc" if "x86-tsc" in clocks else "mono"
            self.write("trace_clock", self.clock)
            self.write("buffer_size_kb", str(self.buffer_kb))
            self.option("record-tgid", True)
        except BaseException:
            _remove_instance(self.dir)
            raise
        return self

    def option(self, name: str, on: bool) -> bool:
        p = f"options/{name}"
        if not self.has(p):
            return False
        self.write(p, "1" if on else "0")
        return True

    def enable(self, event: str, filter: str = "") -> bool:
        """Enable an event ('sched/sched_switch', or a whole group), with a filter;
        False when the kernel lacks it or refuses the filter."""
        if not self.has(f"events/{event}/enable"):
            return False
        try:
            if filter:
                self.write(f"events/{event}/filter", filter)
            self.write(f"events/{event}/enable", "1")
        except OSError:
            return False
        self._events.append(event)
        return True

    def trigger(self, event: str, spec: str) -> bool:
        """Add an event trigger ('stacktrace if prev_state & 3'); False when refused."""
        try:
            self.write(f"events/{event}/trigger", spec)
        except OSError:
            return False
        self._triggers.append((event, spec))
        return True

    def set_pids(self, pids) -> None:
        self.write("set_event_pid", " ".join(str(p) for p in pids))

    def add_uprobe(self, group: str, event: str, spec: str) -> bool:
        """Define a uprobe event group/event (spec: 'PATH:0xOFFSET args...') in the
        global uprobe_events; False when the kernel has no uprobes or refuses it."""
        path = os.path.join(self.root, "uprobe_events")
        if not os.path.exists(path):
            return False
        try:
            _append(path, f"p:{group}/{event} {spec}\n")
        except OSError:
            return False
        self._uprobes.append(f"{group}/{event}")
        return True

    def start(self) -> None:
        self.write("trace", "")
        self.write("tracing_on", "1")

    def stop(self) -> None:
        self.write("tracing_on", "0")

    def mark(self, k: int) -> None:
        with open(self.path("trace_marker"), "w") as f:
            f.write(f"pyvmm-cal{k} {time.monotonic_ns()}")

    def text(self) -> str:
        return self.read("trace")

    def lost(self) -> int:
        return overruns(self.path("per_cpu"))

    def __exit__(self, *exc) -> None:
        try:
            self.write("tracing_on", "0")
        except OSError:
            pass
        for event, spec in self._triggers:
            try:
                self.write(f"events/{event}/trigger", "!" + spec)
            except OSError:
                pass
        for event in self._events:
            try:
                self.write(f"events/{event}/enable", "0")
            except OSError:
                pass
        _remove_instance(self.dir)
        path = os.path.join(self.root, "uprobe_events")
        for name in self._uprobes:
            try:
                _append(path, f"-:{name}\n")
            except OSError:
                pass


def _append(path: str, text: str) -> None:
    """Append a line to a tracefs control file (uprobe_events): one write(2) with
    O_APPEND; Python's append mode seeks first, which tracefs refuses."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _remove_instance(path: str) -> None:
    """Remove an instance directory; tracefs refuses while a trigger holds an event, so
    those are dropped first."""
    events = os.path.join(path, "events")
    for dirpath, _, files in os.walk(events) if os.path.isdir(events) else ():
        if "trigger" in files:
            try:
                with open(os.path.join(dirpath, "trigger")) as f:
                    specs = [l.split(" [")[0].strip() for l in f if l.strip()
                             and not l.startswith("#")]
                for spec in specs:
                    with open(os.path.join(dirpath, "trigger"), "w") as f:
                        f.write("!" + spec)
            except OSError:
                pass
    try:
        os.rmdir(path)
    except OSError:
        pass


def pid_namespace() -> int:
    """This process's PID namespace (its inode): tracefs is one per kernel, shared by every
    container and namespace on it, so names made from a pid carry it."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def owner() -> str:
    """What names this process's instances and uprobe groups: NS-PID."""
    return f"{pid_namespace()}-{os.getpid()}"


def stale_instances(prefix: str, root: str = TRACEFS) -> list[str]:
    """Instances named PREFIX-NS-PID (or PREFIX-PID, older) whose process is gone (a run
    killed with SIGKILL). Only those of this PID namespace: a pid of another namespace
    cannot be looked up from here, and its instance may be in use."""
    base = os.path.join(root, "instances")
    ours = str(pid_namespace())
    out = []
    for name in os.listdir(base) if os.path.isdir(base) else ():
        if not name.startswith(prefix + "-"):
            continue
        parts = name[len(prefix) + 1:].split("-")
        if parts[-1] == "timers":       # the run's second instance (trace --timers)
            parts = parts[:-1]
        if len(parts) == 2 and parts[0] == ours and parts[1].isdigit():
            pid = parts[1]
        elif len(parts) == 1 and parts[0].isdigit():
            pid = parts[0]
        else:
            continue
        if not os.path.exists(f"/proc/{pid}"):
            out.append(os.path.join(base, name))
    return out


def remove_instance(path: str) -> None:
    _remove_instance(path)
