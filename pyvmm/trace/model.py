"""A traced start-up, built from tracefs events (pure: unit tests feed it hand-made
events). Every KVM ioctl of the process tree, with its thread, fd and the fd's kind,
name, decoded arguments, time in the kernel and the sleeps inside it (state, kernel
stack, who woke it); the processes; and the start-up's milestones.

The fd's kind comes from following the fds: the fd KVM_CREATE_VM is issued on is the
system fd, what it returns a VM fd, what KVM_CREATE_VCPU returns a vCPU fd, a closed fd
is forgotten; an fd never seen created is named by where the header lists the ioctl.
"""

from __future__ import annotations

import re

from .. import tracefs
from . import ioctls

NR_CLOSE, NR_IOCTL = 3, 16

_PID = re.compile(r"\bpid=(\d+)")
_CHILD = re.compile(r"child_pid=(\d+)")
_EXEC = re.compile(r"filename=(\S+) pid=(\d+)")
_UPROBE = re.compile(r"fd=(-?\d+) cmd=(0x[0-9a-f]+) arg=(0x[0-9a-f]+)"
                     r"(?: w0=(\S+) w1=(\S+) w2=(\S+) w3=(\S+))?")
_PIO = re.compile(r"pio_(read|write) at (0x[0-9a-f]+) size (\d+) count (\d+)(?: val (0x[0-9a-f]+))?")
_EXIT_REASON = re.compile(r"reason (\S+)")

UPROBE_EVENT = "kvm_ioctl"      # the uprobe event at libc's ioctl() entry
UPROBE_AFTER = "kvm_ioctl_done"  # the same, right after its syscall: it follows the call


class Sleep:
    """The thread off the CPU inside an ioctl: from switch-out to switch-in (ns)."""

    __slots__ = ("t_out", "t_in", "state", "stack", "waker", "t_wake")

    def __init__(self, t_out: float, state: str, stack: list[str] | None):
        self.t_out, self.t_in, self.state, self.stack = t_out, t_out, state, stack
        self.waker: str | None = None
        self.t_wake: float | None = None

    @property
    def ns(self) -> float:
        return self.t_in - self.t_out


class Ioctl:
    """One KVM ioctl: times in ns from the start-up's origin."""

    __slots__ = ("tid", "tgid", "fd", "cmd", "arg", "words", "name", "kind", "args",
                 "t_in", "t_out", "ret", "sleeps", "seq")

    def __init__(self, tid, tgid, fd, cmd, arg, t_in, words=None):
        self.tid, self.tgid, self.fd, self.cmd, self.arg = tid, tgid, fd, cmd, arg
        self.words = words
        self.t_in = self.t_out = t_in
        self.ret = 0
        self.name = ioctls.name(cmd)
        self.kind: str | None = None
        self.args: dict = {}
        self.sleeps: list[Sleep] = []
        self.seq = 0

    @property
    def ns(self) -> float:
        return self.t_out - self.t_in

    @property
    def describe(self) -> str:
        return ioctls.describe(self.name, self.args)


class Process:
    __slots__ = ("pid", "parent", "filename", "t_exec", "t_exit", "threads")

    def __init__(self, pid: int, parent: int | None = None):
        self.pid, self.parent = pid, parent
        self.filename: str | None = None
        self.t_exec: float | None = None
        self.t_exit: float | None = None
        self.threads: set[int] = {pid}


class Startup:
    """Everything one traced start-up holds (times in ns from `origin`, the root's exec
    or, without one, the first event)."""

    def __init__(self):
        self.root: int | None = None
        self.origin = 0.0
        self.scale = 1.0            # ns per trace clock unit
        self.ioctls: list[Ioctl] = []
        self.processes: dict[int, Process] = {}
        self.milestones: dict[str, float] = {}
        self.ports: list[tuple[float, str, int, int | None]] = []   # (t, r/w, port, val)
        self.exits: list[tuple[float, str]] = []                   # guest exits to the VMM
        self.unmatched = 0          # ioctl exits without an entry (trace began mid-call)
        self.uprobe_hits = 0

    @property
    def end(self) -> float:
        return self.milestones.get("process end", 0.0)


def build(events: list[tracefs.Event], scale: float, root: int | None,
          port: int | None = None) -> Startup:
    """A Startup from parsed events: `scale` is ns per trace unit, `root` the pid of the
    traced command (its exec is the origin; None: the first process that execs), `port`
    an I/O port whose first guest write is a milestone (or {port: the milestone's name}). Never raises on damaged events:
    what cannot be read is skipped."""
    if root is None:        # the traced command: the first process that execs
        first = next((e for e in events if e.name == "sched_process_exec"), None)
        m = _EXEC.search(first.body) if first else None
        root = int(m.group(2)) if m else None
    b = _Builder(root, scale)
    for ev in sorted(events, key=lambda e: e.ts):     # tracefs merges CPUs in order already
        b.feed(ev)
    s = b.s
    # Calls still open at the end (the trace stopped first) are dropped; their sleeps too.
    s.scale = scale
    s.origin = s.milestones.get("exec", b.origin or 0.0)
    _rebase(s, s.origin)
    s.milestones = _milestones(s, b.first_run, port)
    return s


class _Builder:
    """The state of one pass over the events: which fds are what, the calls open on each
    thread, the sleeps in progress; one method per kind of event."""

    def __init__(self, root: int | None, scale: float):
        self.s = Startup()
        self.s.root = self.root = root
        self.scale = scale
        self.fds: dict[int, dict[int, str]] = {}            # tgid -> fd -> kind
        self.open_call: dict[int, Ioctl] = {}
        self.closing: dict[int, int] = {}                   # tid -> fd being closed
        self.pending: dict[int, tuple] = {}                 # tid -> uprobe (fd, cmd, arg, words)
        self.done: dict[int, Ioctl] = {}                    # tid -> the ioctl that just returned
        self.asleep: dict[int, tuple[Ioctl, Sleep, tracefs.Event]] = {}
        self.tgid_of: dict[int, int] = {}
        self.origin: float | None = None
        self.first_run: float | None = None
        self.handlers = {"sched_process_exec": self.exec_, "sched_process_fork": self.fork,
                         "sched_process_exit": self.exit_, UPROBE_EVENT: self.uprobe,
                         UPROBE_AFTER: self.uprobe, "sys_enter": self.sys_enter,
                         "sys_exit": self.sys_exit, "sched_switch": self.switch,
                         "sched_wakeup": self.wakeup, "sched_waking": self.wakeup,
                         "kvm_userspace_exit": self.kvm_exit, "kvm_pio": self.pio}

    def proc(self, pid: int) -> Process:
        p = self.s.processes.get(pid)
        if p is None:
            p = self.s.processes[pid] = Process(pid)
        return p

    def feed(self, ev: tracefs.Event) -> None:
        t = ev.ts * self.scale
        tid = ev.tid
        tgid = ev.tgid if ev.tgid else self.tgid_of.get(tid, tid)
        self.tgid_of.setdefault(tid, tgid)
        if self.origin is None:
            self.origin = t
        if tid in self.asleep and not (ev.name == "sched_switch" and ev is self.asleep[tid][2]):
            # The thread runs again: tracefs may not show the switch back in (the idle
            # task's switch is filtered by pid), so its next event of any kind ends the
            # sleep, at the latest.
            c, sl, _ = self.asleep.pop(tid)
            sl.t_in = t
            c.sleeps.append(sl)
        handler = self.handlers.get(ev.name)
        if handler is not None:
            handler(ev, t, tid, tgid)

    def exec_(self, ev, t, tid, tgid) -> None:
        m = _EXEC.search(ev.body)
        if m:
            p = self.proc(int(m.group(2)))
            p.filename = m.group(1)
            if p.t_exec is None:
                p.t_exec = t
            if self.root is not None and p.pid == self.root \
                    and self.s.milestones.get("exec") is None:
                self.s.milestones["exec"] = t

    def fork(self, ev, t, tid, tgid) -> None:
        c = _CHILD.search(ev.body)
        if c:
            # A thread shares its parent's tgid; record-tgid says which it is later.
            self.tgid_of.setdefault(int(c.group(1)), int(c.group(1)))

    def exit_(self, ev, t, tid, tgid) -> None:
        m = _PID.search(ev.body)
        if m:
            pid = int(m.group(1))
            if pid == self.tgid_of.get(pid, pid):
                self.proc(pid).t_exit = t
                if pid == self.root:
                    self.s.milestones["process end"] = t

    def uprobe(self, ev, t, tid, tgid) -> None:
        m = _UPROBE.search(ev.body)
        if not m:
            return
        self.s.uprobe_hits += 1
        words = tuple(int(w, 16) for w in m.groups()[3:7]) if m.group(4) else None
        up = (int(m.group(1)), int(m.group(2), 16), int(m.group(3), 16), words)
        if ev.name == UPROBE_EVENT:
            self.pending[tid] = up
            return
        call = self.done.pop(tid, None)     # after the call: the ioctl that just returned
        if call is not None and call.words is None and call.fd == up[0] \
                and (call.cmd & 0xFFFFFFFF) == (up[1] & 0xFFFFFFFF):
            call.words = words
            call.args = ioctls.args(call.name, call.arg, words)

    def sys_enter(self, ev, t, tid, tgid) -> None:
        e = tracefs.sys_enter(ev.body)
        if not e:
            return
        nr, a = e
        if nr == NR_IOCTL:
            self.done.pop(tid, None)
        if nr == NR_IOCTL and len(a) >= 3 and ioctls.is_kvm(a[1]):
            words = None
            up = self.pending.pop(tid, None)
            if up and up[0] == a[0] and (up[1] & 0xFFFFFFFF) == (a[1] & 0xFFFFFFFF):
                words = up[3]
            call = Ioctl(tid, tgid, a[0], a[1], a[2], t, words)
            call.kind = self.fds.get(tgid, {}).get(a[0])
            call.name = ioctls.name(a[1], call.kind or ioctls.listed_kind(a[1]))
            call.args = ioctls.args(call.name, a[2], words)
            self.open_call[tid] = call
        elif nr == NR_CLOSE and a:
            self.closing[tid] = a[0]

    def sys_exit(self, ev, t, tid, tgid) -> None:
        e = tracefs.sys_exit(ev.body)
        if not e:
            return
        nr, ret = e
        if nr == NR_CLOSE:
            fd = self.closing.pop(tid, None)
            if fd is not None and ret == 0:
                self.fds.get(tgid, {}).pop(fd, None)
            return
        call = self.open_call.pop(tid, None) if nr == NR_IOCTL else None
        if call is None:
            return
        call.t_out, call.ret = t, ret
        call.seq = len(self.s.ioctls)
        table = self.fds.setdefault(call.tgid, {})
        if call.name == "KVM_CREATE_VM" and ret >= 0:
            table[call.fd], table[ret] = "system", "vm"
        elif call.name == "KVM_CREATE_VCPU" and ret >= 0:
            table[ret] = "vcpu"
        elif call.name in ("KVM_GET_API_VERSION", "KVM_GET_VCPU_MMAP_SIZE"):
            table[call.fd] = "system"
        if call.kind is None:
            call.kind = table.get(call.fd) or ioctls.listed_kind(call.cmd)
        self.s.ioctls.append(call)
        self.done[tid] = call
        if call.name == "KVM_RUN" and self.first_run is None:
            self.first_run = call.t_in

    def switch(self, ev, t, tid, tgid) -> None:
        sw = tracefs.sched_switch(ev.body)
        if not sw:
            return
        _, prev, state, _, nxt = sw
        call = self.open_call.get(prev)
        if call is not None and prev not in self.asleep:
            self.asleep[prev] = (call, Sleep(t, state.rstrip("+")[:1] or "R", ev.stack), ev)
        back = self.asleep.pop(nxt, None)
        if back is not None:
            c, sl, _ = back
            sl.t_in = t
            c.sleeps.append(sl)

    def wakeup(self, ev, t, tid, tgid) -> None:
        m = _PID.search(ev.body)
        if m:
            pid = int(m.group(1))
            if pid in self.asleep and self.asleep[pid][1].t_wake is None:
                self.asleep[pid][1].waker = ev.comm
                self.asleep[pid][1].t_wake = t

    def kvm_exit(self, ev, t, tid, tgid) -> None:
        m = _EXIT_REASON.search(ev.body)
        self.s.exits.append((t, m.group(1) if m else "?"))

    def pio(self, ev, t, tid, tgid) -> None:
        m = _PIO.search(ev.body)
        if m:
            self.s.ports.append((t, m.group(1)[0], int(m.group(2), 16),
                                 int(m.group(5), 16) if m.group(5) else None))


def _rebase(s: Startup, o: float) -> None:
    """Every time of the start-up made relative to its origin `o`."""
    for c in s.ioctls:
        c.t_in -= o
        c.t_out -= o
        for sl in c.sleeps:
            sl.t_out -= o
            sl.t_in -= o
            if sl.t_wake is not None:
                sl.t_wake -= o
    for p in s.processes.values():
        if p.t_exec is not None:
            p.t_exec -= o
        if p.t_exit is not None:
            p.t_exit -= o
    s.ports = [(t - o, d, port_, v) for t, d, port_, v in s.ports]
    s.exits = [(t - o, r) for t, r in s.exits]


def _milestones(s: Startup, first_run: float | None, port) -> dict[str, float]:
    """The start-up's milestones in time order (times relative to the origin)."""
    o = s.origin
    ms = {k: v - o for k, v in s.milestones.items()}
    ms["exec"] = 0.0
    first = {}
    for c in s.ioctls:
        first.setdefault(c.name, c.t_in)
    for label, ioctl in (("KVM_CREATE_VM", "KVM_CREATE_VM"),
                         ("first KVM_CREATE_VCPU", "KVM_CREATE_VCPU"),
                         ("first KVM_RUN", "KVM_RUN")):
        if ioctl in first:
            ms[label] = first[ioctl]
    if first_run is not None:
        after = [t for t, _ in s.exits if t >= first_run - o]
        if after:
            ms["first guest exit"] = after[0]
    labels = port if isinstance(port, dict) else (
        {} if port is None else {port: f"first write to port {port:#x}"})
    for pt, label in labels.items():
        hits = [t for t, d, p, _ in s.ports if p == pt and d == "w"]
        if hits:
            ms[label] = hits[0]
    if "process end" not in ms and s.ioctls:
        ms["process end"] = max(c.t_out for c in s.ioctls)
    return dict(sorted(ms.items(), key=lambda kv: kv[1]))
