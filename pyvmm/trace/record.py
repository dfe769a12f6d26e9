"""Recording a start-up: the command is started held at its exec, a tracefs instance of
our own follows its whole process tree (set_event_pid with event-fork) with

- raw_syscalls enter/exit, filtered in the kernel to ioctl and close: each KVM ioctl's
  time in the kernel, and the fds that go away;
- sched_switch, with a stacktrace trigger on every switch-out of a sleeping task (S or
  D), and sched_wakeup: each sleep inside an ioctl, its kernel stack and its waker;
- sched_process_exec/fork/exit: the tree and the start-up's ends;
- kvm_userspace_exit and kvm_pio: the guest's first exit, and writes to a named port;
- a uprobe on the ioctl() of the C library the command uses (or on the command itself
  when it is static), reading the first 32 bytes its third argument points to: the
  ioeventfd address, length and flags, the memslot, the coalesced-MMIO zone. Where the
  function's code allows, the probe sits on the conditional branch right after its
  `syscall` instruction rather than on its first one: the kernel emulates a branch, so
  a hit costs one trap instead of a trap and a single-step (on a host where traps are
  dear, most of what tracing costs a start-up); the data is then read after the call.

Then the command is released and waited for. Whatever the kernel lacks is left out and
said (`notes`): no uprobes means no arguments, no trigger means no stacks. Where the
uprobe goes is probesite.py's; without tracefs or root, strace.py's fallback gives the
per-ioctl times alone (and slows the start-up several times).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time

from .. import tracefs
from ..errors import PyvmmError, TraceUnavailable
from . import model
from .probesite import ProbeSite, executable, ioctl_site, symbol_offset

PREFIX = "pyvmm-trace"
# A stack for every switch-out but an interruptible sleep: uninterruptible sleeps (D:
# grace periods, mutexes, I/O) and preemptions (R+: on one CPU, a grace period's own
# work preempts the thread that waits for it before it can sleep). Interruptible ones
# (S) are the VMM's threads idling in poll and futex most of the time, and a stack for
# each would cost the start-up for nothing.
SLEEP_TRIGGER = "stacktrace if prev_state != 1"

TIMER_EVENTS = ("timer/timer_start", "timer/timer_expire_entry",
                "workqueue/workqueue_execute_start")
TIMER_NAMES = {e.split("/")[1] for e in TIMER_EVENTS}


class Recording:
    """One traced run: the trace's events, how to scale their timestamps, the command's
    pid and exit status, wall time, and what was missing."""

    def __init__(self):
        self.events: list[tracefs.Event] = []
        self.scale = 1e9
        self.clock = "mono"
        self.pid = 0
        self.rc: int | None = None
        self.wall_ns = 0
        self.notes: list[str] = []
        self.method = "tracefs"
        self.startup: model.Startup | None = None
        self.text = ""              # the trace as tracefs printed it
        self.timer_events: list[tracefs.Event] = []    # with timers=True
        self.probe: str | None = None   # where the uprobe sat, when there was one


# --- the tracefs run ----------------------------------------------------------------------

def _clean_stale(root: str) -> None:
    for path in tracefs.stale_instances(PREFIX, root):
        tracefs.remove_instance(path)


def record(argv: list[str], port: int | None = None, timeout_s: float = 120.0,
           output=subprocess.DEVNULL, root: str = tracefs.TRACEFS,
           env: dict | None = None, stacks: bool = True, arguments: bool = True,
           site: ProbeSite | None = None, timers: bool = False) -> Recording:
    """Run `argv` traced; raises TraceUnavailable when tracefs cannot be used at all.
    `stacks` and `arguments` turn off the stacktrace trigger and the uprobe (less
    overhead, less said); `site` gives the uprobe's place when this machine has no ldd
    or binutils to find it (inside a lab kernel). `timers` also records, machine-wide in
    an instance of its own, the timer wheel and the workqueue (timer_start,
    timer_expire_entry, workqueue_execute_start): where SRCU's grace-period work was
    queued and when it ran (attribute.grace_period_chain)."""
    rec = Recording()
    exe = executable(argv[0])
    if exe is None:
        raise PyvmmError(f"{argv[0]}: not found or not an executable (give a path, or a "
                         "command on PATH)")
    if os.geteuid() != 0:
        raise TraceUnavailable("tracing another process's KVM ioctls needs root (tracefs)")
    if os.path.isdir(os.path.join(root, "instances")):
        _clean_stale(root)
    with contextlib.ExitStack() as stack:
        inst = stack.enter_context(tracefs.Instance(f"{PREFIX}-{tracefs.owner()}", root))
        also = _timer_instance(stack, inst, root, rec) if timers else []
        rec.clock = inst.clock
        _enable_events(inst, rec, root, port, stacks)
        if not arguments:
            site = (None, "--no-args")
        elif site is None:
            site = ioctl_site(exe)
        _place_uprobe(inst, rec, site)
        inst.option("event-fork", True)
        rec.pid, rec.rc, rec.wall_ns, released = _run_held(argv, inst, timeout_s, output,
                                                            env, also)
        rec.text = inst.text()
        if also:
            rec.timer_events = [e for e in tracefs.parse_events(also[0].text())
                                if e.name in TIMER_NAMES]
        lost = inst.lost()
        if lost:
            rec.notes.append(f"tracefs dropped {lost} events (buffer full): the trace has "
                             "holes")
    _model(rec, port, released)
    return rec


def _timer_instance(stack, inst: tracefs.Instance, root: str, rec: Recording) -> list:
    """A second instance, machine-wide, for the timer wheel and the workqueue."""
    tinst = stack.enter_context(tracefs.Instance(f"{PREFIX}-{tracefs.owner()}-timers", root,
                                                 buffer_kb=8192))
    if all([tinst.enable(e) for e in TIMER_EVENTS]) and tinst.clock == inst.clock:
        return [tinst]
    rec.notes.append("no timer or workqueue events: the grace period's timer is not shown")
    return []


def _enable_events(inst: tracefs.Instance, rec: Recording, root: str, port: int | None,
                   stacks: bool) -> None:
    """The events of a start-up; what the kernel lacks is said in rec.notes."""
    if not inst.enable("raw_syscalls", f"id == {model.NR_IOCTL} || id == {model.NR_CLOSE}"):
        raise TraceUnavailable(f"{root}/events/raw_syscalls is missing: this kernel has "
                               "no syscall tracepoints (CONFIG_FTRACE_SYSCALLS)")
    for ev in ("sched/sched_process_exec", "sched/sched_process_fork",
               "sched/sched_process_exit", "sched/sched_wakeup"):
        if not inst.enable(ev):
            rec.notes.append(f"no {ev} event")
    if not inst.enable("sched/sched_switch"):
        rec.notes.append("no sched_switch event: sleeps inside ioctls are not seen")
    elif not stacks:
        rec.notes.append("stacks off (--no-stacks): what sleeps waited for is unknown")
    elif not inst.trigger("sched/sched_switch", SLEEP_TRIGGER):
        rec.notes.append("the stacktrace trigger was refused: sleeps have no kernel "
                         "stacks, so what they waited for is unknown")
    if not inst.enable("kvm/kvm_userspace_exit"):
        rec.notes.append("no kvm:kvm_userspace_exit event: no first guest exit")
    if port is not None and not inst.enable("kvm/kvm_pio"):
        rec.notes.append("no kvm:kvm_pio event: port writes are not seen")


def _place_uprobe(inst: tracefs.Instance, rec: Recording, site) -> None:
    """The uprobe at `site` (a ProbeSite, or (None, why)); after the syscall where the
    kernel takes it, else at the function's entry; what failed is said in rec.notes."""
    group = "pyvmm_" + tracefs.owner().replace("-", "_")
    if site[0] is None:
        rec.notes.append(f"no uprobe ({site[1]}): ioctl arguments are not decoded")
        return
    placed = _probe(inst, group, site)
    if not placed and site.after:
        # a kernel that refuses the probe after the syscall: the entry, then
        entry = symbol_offset(site.path, "ioctl")
        site = ProbeSite(site.path, entry or 0)
        placed = entry is not None and _probe(inst, group, site)
    if not placed:
        rec.notes.append("uprobes are not available: ioctl arguments are not decoded")
    elif not inst.enable(f"{group}/{site.event}"):
        rec.notes.append("the uprobe could not be enabled: ioctl arguments are not decoded")
    else:
        rec.probe = (f"{os.path.basename(site.path)}+{site.offset:#x} "
                     + ("after the syscall" if site.after else "at ioctl()'s entry"))


def _model(rec: Recording, port: int | None, released: int) -> None:
    """The start-up from the recorded text: events, clock scale, the model, the release
    and reap milestones, and a note when the uprobe saw nothing."""
    rec.events = tracefs.parse_events(rec.text)
    marks = tracefs.calibration_marks(rec.events)
    rec.scale = tracefs.ns_per_tick(rec.clock, marks)
    rec.startup = model.build(rec.events, rec.scale, rec.pid, port)
    cal = [(ts, mono) for k, ts, mono in marks if k == 0]
    if cal and "exec" in rec.startup.milestones:
        # When the command was released and when it was reaped, on the trace's clock:
        # the whole process, exit teardown (the VM's destruction) included.
        released_t = cal[0][0] * rec.scale + (released - cal[0][1]) - rec.startup.origin
        rec.startup.milestones["process reaped"] = released_t + rec.wall_ns
    if rec.startup.uprobe_hits == 0 and not any("uprobe" in n for n in rec.notes) \
            and rec.startup.ioctls:
        rec.notes.append("the uprobe on ioctl() saw no call: the command calls the kernel "
                         "without the C library's ioctl(); arguments are not decoded")


def _probe(inst: tracefs.Instance, group: str, site: ProbeSite) -> bool:
    return inst.add_uprobe(group, site.event, f"{site.path}:{site.offset:#x} {site.fetch}")


def run_untraced(argv: list[str], timeout_s: float = 120.0, output=subprocess.DEVNULL,
                 env: dict | None = None) -> tuple[int, int]:
    """The same start, release and wait as a traced run, without tracing: (exit status,
    wall ns from release to exit), for the overhead A/B."""
    _, rc, wall, _ = _run_held(argv, None, timeout_s, output, env)
    return rc, wall


def _run_held(argv, inst: tracefs.Instance | None, timeout_s: float, output, env,
              also: list | None = None):
    """Start the command held before its exec, point the instance at it, release it and
    wait. Returns (pid, exit status, wall ns from release to reaped, CLOCK_MONOTONIC ns
    of the release).

    A small shell holds it: `sh -c 'read _ <&R; exec "$@"'` blocks on a pipe, and the
    same process then execs the command, so the pid the instance follows is the
    command's. (subprocess cannot hold a child before its exec itself: Popen waits for
    the exec, and a fork of this interpreter would make the exec slow.)"""
    r, w = os.pipe()
    script = f'read _ <&{r}; exec {r}<&-; exec "$@"'
    try:
        proc = subprocess.Popen(["/bin/sh", "-c", script, "sh", *argv], pass_fds=(r,),
                                stdin=subprocess.DEVNULL, stdout=output, stderr=output,
                                env=env)
    except OSError as e:
        os.close(r)
        os.close(w)
        raise PyvmmError(f"cannot start /bin/sh to hold {argv[0]}: {e.strerror}") from None
    os.close(r)
    try:
        if inst is not None:
            inst.set_pids([proc.pid])
            for other in also or []:
                other.start()
            inst.start()
            inst.mark(0)
        # The shell is held for the same time traced or not: long enough to be blocked
        # in its read (so the release times the command alone) and for the calibration
        # marks to be apart.
        time.sleep(0.02)
        t0 = time.monotonic_ns()
        os.write(w, b"g\n")
        os.close(w)
        w = -1
        # A blocking wait (Popen.wait with a timeout polls, up to 50 ms late); a timer
        # kills the command if it overruns.
        killed = []
        timer = threading.Timer(timeout_s, lambda: (killed.append(1), proc.kill()))
        timer.start()
        try:
            rc = proc.wait()
        finally:
            timer.cancel()
        wall = time.monotonic_ns() - t0
        if killed:
            raise PyvmmError(f"{argv[0]} did not exit within {timeout_s:g} s: killed "
                             "(give --timeout for a longer start-up)")
        if inst is not None:
            time.sleep(0.03)
            inst.mark(1)
            inst.stop()
            for other in also or []:
                other.stop()
        if rc == 127 and not shutil.which(argv[0]) and not os.path.exists(argv[0]):
            raise PyvmmError(f"{argv[0]}: command not found")
        return proc.pid, rc, wall, t0
    except BaseException:
        if w >= 0:
            os.close(w)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        raise
