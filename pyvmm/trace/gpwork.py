"""Where SRCU's grace-period work runs while a VMM registers ioeventfds, and what it
takes from the registering thread.

A registration that frees the replaced bus through SRCU (call_srcu, or the RFC's
call_srcu_expedited) starts a grace period whose work is a work item on the rcu_gp
workqueue: process_srcu (the grace period's state machine) and srcu_invoke_callbacks
(the callbacks, the old buses' kfree). Whether that work runs a jiffy later or at once,
on the registrant's CPU or another, decides whether registration pays for it. The
kernel's own tracepoints say which: workqueue_queue_work / workqueue_execute_start /
workqueue_execute_end (the work, its function and its CPU) and sched_switch (when the
registrant was switched out, for whom, for how long).

`run` pins the calling thread to one CPU, registers N ioeventfds one at a time on a
fresh VM with a tracefs instance recording those events between two trace_marker writes,
then deassigns them outside the window; `summarize` is pure (unit-tested on hand-written
trace text): per window, the SRCU work items run (on the registrant's CPU and on
others, with their summed time), the registrant's switches out (preempted or asleep, to
whom, time off its CPU) and its own wall and CPU time per registration.
"""

from __future__ import annotations

import os
import re
import threading
import time

from .. import tracefs
from ..errors import PyvmmError
from ..latency import median

SRCU_FUNCTIONS = ("process_srcu", "srcu_invoke_callbacks")
EVENTS = ("sched/sched_switch", "workqueue/workqueue_queue_work",
          "workqueue/workqueue_execute_start", "workqueue/workqueue_execute_end")
BEGIN, END = "pyvmm-gpwork-begin", "pyvmm-gpwork-end"
BASE_ADDR = 0xd000_0000            # the MMIO addresses registered: BASE + 8*i

_FUNC = re.compile(r"function[= ](\w+)")
_WORK = re.compile(r"work struct[= ]?(?:0x)?([0-9a-f]+)")
_QCPU = re.compile(r"\bcpu=(\d+)")
_WQ = re.compile(r"workqueue=(\S+)")
_MARK = re.compile(rf"({BEGIN}|{END}) (\d+)")


def _kind(comm: str) -> str:
    """A thread's name without its numbers after the slash: kworker/0:1H -> kworker/N:NH."""
    head, slash, tail = comm.partition("/")
    return head + slash + re.sub(r"\d+", "N", tail)


def summarize(events: list, tid: int, cpu: int, scale: float) -> list[dict]:
    """Per window (BEGIN k .. END k, written by the registrant): what ran. `events`:
    tracefs.parse_events of the instance's text; `scale`: ns per trace unit."""
    windows, open_at = [], {}
    for i, e in enumerate(events):
        if e.name == "tracing_mark_write":
            m = _MARK.search(e.body)
            if m and m.group(1) == BEGIN:
                open_at[int(m.group(2))] = i
            elif m and int(m.group(2)) in open_at:
                windows.append((int(m.group(2)), open_at.pop(int(m.group(2))), i))
    return [_window(events[a:b + 1], k, tid, cpu, scale) for k, a, b in windows]


def _window(evs: list, k: int, tid: int, cpu: int, scale: float) -> dict:
    t0, t1 = evs[0].ts, evs[-1].ts
    running: dict[tuple[int, str], tuple[float, str]] = {}   # (cpu, work) -> start, fn
    work = {"here": 0, "elsewhere": 0, "here_ns": 0.0, "elsewhere_ns": 0.0}
    queued = {"here": 0, "elsewhere": 0, "workqueues": set()}
    functions: dict[str, int] = {}
    out_since: float | None = None
    switches = {"preempted": 0, "slept": 0, "off_cpu_ns": 0.0, "to": {}}
    for e in evs:
        if e.name == "workqueue_queue_work":
            fn = _FUNC.search(e.body)
            if fn and fn.group(1) in SRCU_FUNCTIONS:
                q = _QCPU.search(e.body)
                queued["here" if q and int(q.group(1)) == cpu else "elsewhere"] += 1
                wq = _WQ.search(e.body)
                if wq:
                    queued["workqueues"].add(wq.group(1))
        elif e.name == "workqueue_execute_start":
            fn, w = _FUNC.search(e.body), _WORK.search(e.body)
            if fn and w and fn.group(1) in SRCU_FUNCTIONS:
                running[(e.cpu, w.group(1))] = (e.ts, fn.group(1))
        elif e.name == "workqueue_execute_end":
            w = _WORK.search(e.body)
            start = running.pop((e.cpu, w.group(1)), None) if w else None
            if start is not None:
                where = "here" if e.cpu == cpu else "elsewhere"
                work[where] += 1
                work[f"{where}_ns"] += (e.ts - start[0]) * scale
                functions[start[1]] = functions.get(start[1], 0) + 1
        elif e.name == "sched_switch":
            sw = tracefs.sched_switch(e.body)
            if not sw:
                continue
            _, prev, state, nxt_comm, nxt = sw
            if prev == tid:
                switches["preempted" if state.startswith("R") else "slept"] += 1
                to = _kind(nxt_comm)
                switches["to"][to] = switches["to"].get(to, 0) + 1
                out_since = e.ts
            elif nxt == tid and out_since is not None:
                switches["off_cpu_ns"] += (e.ts - out_since) * scale
                out_since = None
    for (c, _), (start, fn) in running.items():     # still running at the window's end
        where = "here" if c == cpu else "elsewhere"
        work[where] += 1
        work[f"{where}_ns"] += (t1 - start) * scale
        functions[fn] = functions.get(fn, 0) + 1
    if out_since is not None:
        switches["off_cpu_ns"] += (t1 - out_since) * scale
    queued["workqueues"] = sorted(queued["workqueues"])
    return {"window": k, "window_ns": (t1 - t0) * scale, "srcu_work": work,
            "srcu_functions": functions, "srcu_queued": queued, "switches": switches}


def run(n: int = 32, repeats: int = 5, cpu: int | None = None) -> dict:
    """N registrations, REPEATS times, each burst on a fresh VM, traced; the thread
    pinned to `cpu` (default: the one it is on)."""
    from ..vmm.kvm import Kvm
    if n < 1 or repeats < 1:
        raise PyvmmError(f"gpwork: give N >= 1 and REPEATS >= 1 (got {n}, {repeats})")
    cpu = min(os.sched_getaffinity(0)) if cpu is None else cpu
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    tid = threading.get_native_id()
    per_reg = []
    try:
        with tracefs.Instance(f"pyvmm-gpwork-{os.getpid()}", buffer_kb=8192) as inst:
            missing = [ev for ev in EVENTS if not inst.enable(ev)]
            if missing:
                raise PyvmmError("gpwork needs the tracepoints " + ", ".join(missing)
                                 + ": this kernel lacks them (CONFIG_TRACING, workqueue "
                                 "and sched events)")
            with Kvm() as kvm:
                inst.start()
                inst.mark(0)
                for k in range(repeats):
                    per_reg.append(_burst(kvm, inst, n, k))
                time.sleep(0.03)
                inst.mark(1)
                inst.stop()
            text = inst.text()
            lost = inst.lost()
    finally:
        os.sched_setaffinity(0, old)
    events = tracefs.parse_events(text)
    scale = tracefs.ns_per_tick(inst.clock, tracefs.calibration_marks(events))
    windows = summarize(events, tid, cpu, scale)
    if len(windows) != repeats:
        raise PyvmmError(f"gpwork: {len(windows)} of {repeats} traced windows came back "
                         f"({lost} events lost): give a smaller N")
    for w, r in zip(windows, per_reg):
        w.update(r)
    return {"n": n, "repeats": repeats, "cpu": cpu, "cpus": os.cpu_count(),
            "clock": inst.clock, "lost": lost, "windows": windows,
            "summary": _summary(windows, n)}


def _burst(kvm, inst, n: int, k: int) -> dict:
    """One fresh VM, N registrations one at a time inside the window, then teardown."""
    wall, cpu_t = [], []
    with kvm.create_vm() as vm:
        _write_mark(inst, f"{BEGIN} {k}")
        w0, c0 = time.monotonic_ns(), time.thread_time_ns()
        for i in range(n):
            a, b = time.monotonic_ns(), time.thread_time_ns()
            vm.ioeventfd(BASE_ADDR + 8 * i, 4)
            wall.append(time.monotonic_ns() - a)
            cpu_t.append(time.thread_time_ns() - b)
        w1, c1 = time.monotonic_ns(), time.thread_time_ns()
        _write_mark(inst, f"{END} {k}")
    return {"burst_wall_ns": w1 - w0, "burst_cpu_ns": c1 - c0,
            "reg_wall_ns": median(wall), "reg_cpu_ns": median(cpu_t)}


def _write_mark(inst, text: str) -> None:
    with open(inst.path("trace_marker"), "w") as f:
        f.write(text)


def _summary(windows: list[dict], n: int) -> dict:
    """Medians over the windows, per registration where that reads better."""
    def med(f):
        return median([f(w) for w in windows])
    return {
        "burst_wall_us_per_reg": med(lambda w: w["burst_wall_ns"] / n / 1e3),
        "burst_cpu_us_per_reg": med(lambda w: w["burst_cpu_ns"] / n / 1e3),
        "srcu_work_here": med(lambda w: w["srcu_work"]["here"]),
        "srcu_work_elsewhere": med(lambda w: w["srcu_work"]["elsewhere"]),
        "srcu_work_here_us_per_reg": med(lambda w: w["srcu_work"]["here_ns"] / n / 1e3),
        "srcu_work_elsewhere_us_per_reg": med(lambda w: w["srcu_work"]["elsewhere_ns"]
                                              / n / 1e3),
        "preempted": med(lambda w: w["switches"]["preempted"]),
        "slept": med(lambda w: w["switches"]["slept"]),
        "off_cpu_us_per_reg": med(lambda w: w["switches"]["off_cpu_ns"] / n / 1e3),
        "switched_to": sorted({t for w in windows for t in w["switches"]["to"]}),
        "workqueues": sorted({q for w in windows for q in w["srcu_queued"]["workqueues"]}),
    }


def table(data: dict, title: str):
    """One row per traced burst: the registrant's time per registration, the SRCU work
    items that ran on its CPU and elsewhere with their time, and its switches out."""
    from ..tables import Grid
    n = data["n"]
    t = Grid(title=title, title_justify="left")
    for c, left in (("burst", False), ("wall / CPU us per reg.", False),
                    ("SRCU work on its CPU: items, us per reg.", False),
                    ("elsewhere: items, us per reg.", False),
                    ("switched out: preempted, slept; off-CPU us per reg.", False),
                    ("to", True)):
        t.add_column(c, justify="left" if left else "right")
    for w in data["windows"]:
        wk, sw = w["srcu_work"], w["switches"]
        t.add_row(str(w["window"] + 1),
                  f"{w['burst_wall_ns'] / n / 1e3:.1f} / {w['burst_cpu_ns'] / n / 1e3:.1f}",
                  f"{wk['here']}, {wk['here_ns'] / n / 1e3:.1f}",
                  f"{wk['elsewhere']}, {wk['elsewhere_ns'] / n / 1e3:.1f}",
                  f"{sw['preempted']}, {sw['slept']}; {sw['off_cpu_ns'] / n / 1e3:.1f}",
                  ", ".join(f"{k} x{v}" for k, v in sorted(sw["to"].items())) or "-")
    t.caption = (f"{n} KVM_IOEVENTFD assigns per burst on a fresh VM, the registrant pinned "
                 f"to CPU {data['cpu']} of {data['cpus']}; SRCU work: {', '.join(SRCU_FUNCTIONS)} "
                 "on the rcu_gp workqueue (workqueue_execute_start/end); switched out: "
                 "sched_switch away from the registrant (preempted: still runnable)")
    return t
