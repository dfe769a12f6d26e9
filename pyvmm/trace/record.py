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
said (`notes`): no uprobes means no arguments, no trigger means no stacks. Without
tracefs or root, strace -f -T gives the per-ioctl times alone (and slows the start-up
several times).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from typing import NamedTuple

from .. import tracefs
from ..errors import PyvmmError, TraceUnavailable
from . import model

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


class ProbeSite(NamedTuple):
    """Where the uprobe goes and where the third argument is when it fires: `arg` is
    '%dx' at the function's entry, or a slot of the stack ('+48(%sp)') after the syscall
    (`after`), where the function saved it; fd and request stay in %di and %si."""
    path: str
    offset: int
    arg: str = "%dx"
    after: bool = False

    @property
    def fetch(self) -> str:
        a = self.arg
        return (f"fd=%di:s32 cmd=%si:x64 arg={a}:x64 w0=+0({a}):x64 w1=+8({a}):x64 "
                f"w2=+16({a}):x64 w3=+24({a}):x64")

    @property
    def event(self) -> str:
        return model.UPROBE_AFTER if self.after else model.UPROBE_EVENT

    def text(self) -> str:
        """One line for a lab job's environment (parse() reads it back)."""
        return f"{self.path}:{self.offset:#x}:{self.arg}"

    @classmethod
    def parse(cls, text: str) -> "ProbeSite":
        path, off, arg = text.rsplit(":", 2)
        return cls(path, int(off, 0), arg, arg != "%dx")


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


# --- where ioctl() lives ------------------------------------------------------------------

def executable(argv0: str) -> str | None:
    """The ELF file that will run: the command itself, or a script's interpreter."""
    path = argv0 if os.sep in argv0 else shutil.which(argv0)
    if not path or not os.path.isfile(path):
        return None
    path = os.path.realpath(path)
    with open(path, "rb") as f:
        head = f.read(256)
    if head.startswith(b"#!"):
        words = head[2:].split(b"\n", 1)[0].split()
        if not words:
            return None
        interp = words[0].decode(errors="replace")
        if os.path.basename(interp) == "env" and len(words) > 1:
            return executable(words[1].decode(errors="replace"))
        return executable(interp)
    return path if head.startswith(b"\x7fELF") else None


def ioctl_site(exe: str) -> ProbeSite | tuple[None, str]:
    """Where to probe the ioctl() the executable calls: its C library's, or its own when
    it is linked statically; (None, why) when it cannot be found."""
    p = subprocess.run(["ldd", exe], capture_output=True, text=True)
    libc = None
    for line in p.stdout.splitlines():
        m = re.match(r"\s*libc\.so\.\d+ => (\S+)", line)
        if m:
            libc = m.group(1)       # the path the loader uses (a lab initramfs has only it)
    target = libc or exe
    vaddr = symbol_address(target, "ioctl")
    if vaddr is None:
        return None, f"no ioctl symbol in {target}"
    after = branch_after_syscall(target, vaddr)
    if after is not None:
        at, slot = after
        return ProbeSite(target, _file_offset(target, at), f"+{slot}(%sp)", True)
    return ProbeSite(target, _file_offset(target, vaddr))


_REGS = {r: {f"%r{r}", f"%e{r}", f"%{r}", f"%{r}l"} for r in ("di", "si", "dx", "sp")}
_INSN = re.compile(r"^\s*([0-9a-f]+):\s+(?:(?:ds|cs|fs|gs|notrack|bnd)\s+)*(\S+)\s*(.*?)\s*(?:#.*)?$")


def _dest(ops: str) -> str:
    """The operand an AT&T instruction writes (its last), '' for none."""
    depth, last = 0, 0
    for i, ch in enumerate(ops):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            last = i + 1
    return ops[last:].strip()


def branch_after_syscall(path: str, vaddr: int) -> tuple[int, int] | None:
    """(address of the conditional branch right after the function's syscall, stack
    slot where the function saved its third argument), or None when the code is not the
    plain shape this needs: straight-line code that saves %rdx to the stack below one
    frame adjustment, the syscall, and then a conditional branch, with %rdi, %rsi and
    %rsp untouched until it. Anything else keeps the probe at the entry."""
    if not shutil.which("objdump"):
        return None
    p = subprocess.run(["objdump", "-d", "--no-show-raw-insn", f"--start-address={vaddr:#x}",
                        f"--stop-address={vaddr + 192:#x}", path],
                       capture_output=True, text=True)
    return branch_in(p.stdout)


def branch_in(disassembly: str) -> tuple[int, int] | None:
    """branch_after_syscall on objdump's text (pure)."""
    slot, framed, called = None, False, False
    for line in disassembly.splitlines():
        m = _INSN.match(line)
        if not m:
            continue
        addr, mn, ops = int(m.group(1), 16), m.group(2), m.group(3)
        dest = _dest(ops)
        branch = mn.startswith(("j", "call", "ret", "loop")) or mn in ("syscall", "int3",
                                                                       "push", "pop")
        if called:
            if mn.startswith("j") and not mn.startswith("jmp"):
                return addr, slot
            if branch or dest in _REGS["di"] | _REGS["si"] | _REGS["sp"]:
                return None
            continue
        if mn == "syscall":
            if slot is None:
                return None
            called = True
            continue
        if branch or dest in _REGS["di"] | _REGS["si"]:
            return None
        if dest in _REGS["sp"]:
            if framed or slot is not None or not re.fullmatch(r"\$0x[0-9a-f]+,%rsp", ops) \
                    or mn != "sub":
                return None
            framed = True
            continue
        if dest in _REGS["dx"] and slot is None:
            return None             # the argument changed before it was saved
        save = re.fullmatch(r"%rdx,(0x[0-9a-f]+)?\(%rsp\)", ops)
        if mn == "mov" and save and slot is None:
            slot = int(save.group(1) or "0", 16)
    return None


def symbol_offset(path: str, name: str) -> int | None:
    """The file offset of a defined function symbol (dynamic or static), for a uprobe."""
    vaddr = symbol_address(path, name)
    return None if vaddr is None else _file_offset(path, vaddr)


def symbol_address(path: str, name: str) -> int | None:
    """The virtual address of a defined function symbol (dynamic or static)."""
    for args in (["nm", "-D", "--defined-only", path], ["nm", "--defined-only", path]):
        if not shutil.which("nm"):
            return None
        p = subprocess.run(args, capture_output=True, text=True)
        for line in p.stdout.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[2].split("@", 1)[0] == name and parts[1] in "TtWwiI":
                return int(parts[0], 16)
    return None


def _file_offset(path: str, vaddr: int) -> int:
    """A virtual address of an ELF file as an offset in it (through its PT_LOAD)."""
    p = subprocess.run(["readelf", "-lW", path], capture_output=True, text=True)
    for line in p.stdout.splitlines():
        parts = line.split()
        if parts and parts[0] == "LOAD" and len(parts) >= 6:
            off, va, filesz = int(parts[1], 16), int(parts[2], 16), int(parts[4], 16)
            if va <= vaddr < va + filesz:
                return vaddr - va + off
    return vaddr


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
        inst = stack.enter_context(tracefs.Instance(f"{PREFIX}-{os.getpid()}", root))
        also = []
        if timers:
            tinst = stack.enter_context(tracefs.Instance(f"{PREFIX}-{os.getpid()}-timers",
                                                         root, buffer_kb=8192))
            if all([tinst.enable(e) for e in TIMER_EVENTS]) and tinst.clock == inst.clock:
                also.append(tinst)
            else:
                rec.notes.append("no timer or workqueue events: the grace period's timer "
                                 "is not shown")
        rec.clock = inst.clock
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
        if not arguments:
            site = (None, "--no-args")
        elif site is None:
            site = ioctl_site(exe)
        group = f"pyvmm_{os.getpid()}"
        if site[0] is None:
            rec.notes.append(f"no uprobe ({site[1]}): ioctl arguments are not decoded")
        else:
            placed = _probe(inst, group, site)
            if not placed and site.after:
                # a kernel that refuses the probe after the syscall: the entry, then
                entry = symbol_offset(site.path, "ioctl")
                site = ProbeSite(site.path, entry or 0)
                placed = entry is not None and _probe(inst, group, site)
            if not placed:
                rec.notes.append("uprobes are not available: ioctl arguments are not "
                                 "decoded")
            elif not inst.enable(f"{group}/{site.event}"):
                rec.notes.append("the uprobe could not be enabled: ioctl arguments are not "
                                 "decoded")
            else:
                rec.probe = (f"{os.path.basename(site.path)}+{site.offset:#x} "
                             + ("after the syscall" if site.after else "at ioctl()'s entry"))
        inst.option("event-fork", True)
        rec.pid, rec.rc, rec.wall_ns, released = _run_held(argv, inst, timeout_s, output,
                                                            env, also)
        text = inst.text()
        rec.text = text
        if also:
            rec.timer_events = [e for e in tracefs.parse_events(also[0].text())
                                if e.name in TIMER_NAMES]
        lost = inst.lost()
        if lost:
            rec.notes.append(f"tracefs dropped {lost} events (buffer full): the trace has "
                             "holes")
    rec.events = tracefs.parse_events(text)
    marks = []
    for e in rec.events:
        if e.name == "tracing_mark_write":
            k = tracefs.calibration_mark(e.body)
            if k:
                marks.append((k[0], e.ts, k[1]))
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
    return rec


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


# --- without tracefs: strace -f -T ----------------------------------------------------------

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
