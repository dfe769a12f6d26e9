"""What each sleep inside a KVM ioctl waited for, and what the start-up paid (pure).

A sleep's kernel stack (a stacktrace trigger on sched_switch, innermost frame first)
says what the thread waited in: the first frame past the scheduler's own plumbing
(schedule, wait_for_completion, ...) is the wait, classified by what it belongs to
(an SRCU or RCU grace period, a mutex, a page fault, ...), and the frames from there up
to the KVM ioctl handler are the path that asked for it, e.g.
`__synchronize_srcu <- kvm_io_bus_unregister_dev <- kvm_deassign_ioeventfd_idx <-
kvm_vm_ioctl`. A stack proves where the thread slept; the sleep's length (switch-out
to switch-in) is what that wait cost the ioctl.
"""

from __future__ import annotations

import re

from ..analysis import stats
from .model import Ioctl, Sleep, Startup

# Frames of the scheduler and of generic waiting, skipped to find what was waited in.
PLUMBING = {
    "trace_event_raw_event_sched_switch", "__traceiter_sched_switch", "__schedule",
    "schedule", "schedule_idle", "schedule_timeout", "schedule_preempt_disabled",
    "schedule_hrtimeout_range", "schedule_hrtimeout_range_clock", "io_schedule",
    "io_schedule_timeout", "wait_for_completion", "wait_for_completion_timeout",
    "wait_for_completion_io", "wait_for_completion_killable",
    "wait_for_completion_interruptible", "__wait_for_common", "do_wait_for_common",
    "wait_for_common", "wait_for_common_io", "preempt_schedule_common",
    "preempt_schedule", "preempt_schedule_irq", "__cond_resched", "_cond_resched",
    "bit_wait", "bit_wait_io", "out_of_line_wait_on_bit", "__wait_on_bit",
    "rcuwait_wait_event", "finish_rcuwait",
}
# Function -> what a wait in it is, matched on the frames past the plumbing.
WAITS = [
    ({"__synchronize_srcu", "synchronize_srcu", "synchronize_srcu_expedited",
      "srcu_barrier"}, "srcu", "SRCU grace period"),
    ({"synchronize_rcu", "synchronize_rcu_expedited", "__wait_rcu_gp", "wait_rcu_gp",
      "synchronize_rcu_tasks", "rcu_barrier"}, "rcu", "RCU grace period"),
    ({"__mutex_lock", "mutex_lock", "__mutex_lock_slowpath", "mutex_lock_killable",
      "mutex_lock_interruptible", "__mutex_lock_killable_slowpath",
      "__mutex_lock_interruptible_slowpath"}, "mutex", "mutex"),
    ({"rwsem_down_read_slowpath", "rwsem_down_write_slowpath", "down_read", "down_write"},
     "rwsem", "rw semaphore"),
    ({"handle_mm_fault", "exc_page_fault", "do_user_addr_fault", "__get_user_pages",
      "get_user_pages_unlocked", "hva_to_pfn"}, "fault", "page fault"),
    ({"__flush_work", "flush_work", "__flush_workqueue", "drain_workqueue"}, "work",
     "work flush"),
    ({"kvm_vcpu_block", "kvm_vcpu_halt", "kvm_arch_vcpu_ioctl_run"}, "halt", "vCPU halt"),
    ({"msleep", "usleep_range_state", "schedule_hrtimeout"}, "sleep", "timed sleep"),
]
IOCTL_ENTRY = {"kvm_vm_ioctl", "kvm_vcpu_ioctl", "kvm_dev_ioctl", "kvm_device_ioctl"}
# KVM's other SRCU, kvm->irq_srcu: interrupt routing and irqfds wait for its grace
# periods, not for the buses' and memslots' (kvm->srcu) that the regression is about.
IRQ_SRCU = {"kvm_set_irq_routing", "kvm_irq_routing_update", "irqfd_update",
            "kvm_irqfd_deassign", "kvm_irqfd_release", "kvm_irqfd_assign",
            "kvm_arch_irq_routing_update"}
REGISTER = "kvm_io_bus_register_dev"     # a registration, whatever ioctl asked for it
LONG_WAIT_NS = stats.STALL_MIN_NS       # a grace-period wait worth a verdict (0.5 ms)
PATH_FRAMES = 6


class Wait:
    """What one sleep waited in: kind ('srcu', 'mutex', ..., 'preempted', 'unknown'),
    its words, the function, and the call path up to the ioctl handler."""

    __slots__ = ("kind", "label", "function", "path")

    def __init__(self, kind: str, label: str, function: str, path: list[str]):
        self.kind, self.label, self.function, self.path = kind, label, function, path

    @property
    def path_text(self) -> str:
        return " <- ".join(self.path)


def classify(sleep: Sleep) -> Wait:
    if sleep.state == "R":
        # Preempted. Inside a grace-period wait that is still the grace period's cost:
        # with one CPU the work that runs the grace period preempts its waiter, which
        # then finds it over and never sleeps. Anywhere else it is only the scheduler.
        w = _by_stack(sleep.stack) if sleep.stack else None
        if w is not None and w.kind in ("srcu", "irq_srcu", "rcu"):
            return Wait(w.kind, f"{w.label} (preempted in it)", w.function, w.path)
        return Wait("preempted", "preempted", "", [])
    if not sleep.stack:
        return Wait("unknown", "no stack (trigger missing)", "", [])
    return _by_stack(sleep.stack)


def _by_stack(stack: list[str]) -> Wait:
    frames = [f for f in stack if f not in PLUMBING]
    if not frames:
        return Wait("unknown", "scheduler only", "", [])
    for i, f in enumerate(frames):
        for names, kind, label in WAITS:
            if f in names:
                path = []
                for g in frames[i:]:
                    path.append(g)
                    if g in IOCTL_ENTRY or len(path) >= PATH_FRAMES:
                        break
                if kind == "srcu" and IRQ_SRCU & set(frames[i:]):
                    kind, label = "irq_srcu", "SRCU grace period (kvm->irq_srcu, routing)"
                return Wait(kind, label, f, path)
    path = []
    for g in frames:
        path.append(g)
        if g in IOCTL_ENTRY or len(path) >= PATH_FRAMES:
            break
    return Wait("other", frames[0], frames[0], path)


def jiffies(ns: float, hz: int | None) -> float | None:
    return ns / (1e9 / hz) if hz else None


INIT_MILESTONE = "init started"
PHASES = ("VMM set-up", "guest boot", "after init")


def phase_of(t_ns: float, milestones: dict) -> str:
    """Where in a start-up a moment falls: the VMM's set-up (before its first KVM_RUN),
    the guest's boot (its drivers probing the devices, until /init starts, or the end),
    or after init."""
    run = milestones.get("first KVM_RUN")
    init = milestones.get(INIT_MILESTONE)
    if run is None or t_ns < run:
        return "VMM set-up"
    if init is None or t_ns < init:
        return "guest boot"
    return "after init"


def srcu_waits(s: Startup) -> list[dict]:
    """Every KVM ioctl that waited for an SRCU grace period, in order: its name, what it
    did, how long it slept in the grace period, the path, and the registrations
    (KVM_IOEVENTFD assigns) issued since the previous SRCU wait."""
    out = []
    since = 0
    for c in s.ioctls:
        waits = [(sl, classify(sl)) for sl in c.sleeps]
        srcu = [(sl, w) for sl, w in waits if w.kind == "srcu"]
        registers = _is_assign(c) or any(REGISTER in w.path for _, w in waits)
        if srcu:
            out.append({"seq": c.seq, "name": c.name, "what": c.describe, "tid": c.tid,
                        "t_ms": c.t_in / 1e6, "ioctl_ms": c.ns / 1e6,
                        "wait_ms": sum(sl.ns for sl, _ in srcu) / 1e6,
                        "sleeps": len(srcu), "path": srcu[0][1].path_text,
                        "registrations_before": since,
                        "is_registration": registers})
            since = 0
        if registers:
            since += 1
    return out


def _is_assign(c: Ioctl) -> bool:
    return c.name == "KVM_IOEVENTFD" and c.args and not c.args.get("deassign")


_TSTART = re.compile(r"timer=(\S+) function=(\S+) expires=(\d+) \[timeout=(-?\d+)\]"
                     r"(?: bucket_expiry=(\d+))?")
_TEXPIRE = re.compile(r"timer=(\S+) function=(\S+) now=(\d+)")
_WORK = re.compile(r"function (\S+)")
GP_TIMER = "delayed_work_timer_fn"       # a delayed work's timer: SRCU's grace-period work
GP_WORK = "process_srcu"


def grace_period_chain(s: Startup, timer_events, waits: list[dict],
                       hz: int | None) -> None:
    """Why a wait lasted what it did, from the timer wheel (record(timers=True)): for each
    long SRCU wait, the last one-jiffy delayed-work timer a traced thread armed before it
    (the registration's call_srcu queueing a normal grace period's work), the jiffy it
    was due at and the bucket the wheel filed it in, when it fired, when process_srcu
    ran, and how long after that the wait ended. Adds 'why' to those waits."""
    if not timer_events or not hz:
        return
    jiffy = 1e9 / hz
    tids = {c.tid for c in s.ioctls}
    arms, fires, works = [], {}, []
    for e in timer_events:
        t = e.ts * s.scale - s.origin
        if e.name == "timer_start":
            m = _TSTART.search(e.body)
            if m and m.group(2) == GP_TIMER and m.group(4) == "1" and e.tid in tids:
                expires = int(m.group(3))
                arms.append({"t": t, "timer": m.group(1), "expires": expires,
                             "now": expires - 1, "tid": e.tid, "cpu": e.cpu,
                             "bucket": int(m.group(5)) if m.group(5) else None})
        elif e.name == "timer_expire_entry":
            m = _TEXPIRE.search(e.body)
            if m and m.group(2) == GP_TIMER:
                fires.setdefault(m.group(1), []).append((t, int(m.group(3))))
        elif e.name == "workqueue_execute_start":
            m = _WORK.search(e.body)
            if m and m.group(1) == GP_WORK:
                works.append(t)
    for w in waits:
        if w["wait_ms"] * 1e6 < LONG_WAIT_NS:
            continue
        start = w["t_ms"] * 1e6
        end = start + w["ioctl_ms"] * 1e6
        # the timer armed before the wait that fired while the call slept (a wait
        # that ended for another reason gets no chain)
        chain = None
        for a in reversed([a for a in arms if a["t"] < start]):
            fired = next(((t, now) for t, now in fires.get(a["timer"], []) if t > a["t"]),
                         None)
            if fired is not None and start <= fired[0] <= end:
                chain = a, fired
                break
        if chain is None:
            continue
        a, fired = chain
        ran = next((t for t in works if t >= fired[0]), None)
        after_j = (fired[0] - a["t"]) / jiffy
        ticks = fired[1] - a["now"]         # jiffies from arming to the tick that ran it
        w["why"] = {
            "armed_ms": a["t"] / 1e6, "armed_jiffy": a["now"], "due_jiffy": a["expires"],
            "bucket_jiffy": a["bucket"], "fired_jiffy": fired[1], "fired_ms": fired[0] / 1e6,
            "fired_after_jiffies": after_j, "ticks": ticks,
            # where in its jiffy the registration fell (the tick that fired it is a
            # jiffy boundary): the one unknown of the prediction, measured
            "armed_phase": ticks - after_j,
            "work_ms": None if ran is None else ran / 1e6,
            "wait_end_after_fire_ms": (end - fired[0]) / 1e6,
            "predicted_wait_ms": (fired[0] - start) / 1e6,
        }


def why_text(w: dict) -> str | None:
    """The chain of one wait in a sentence."""
    y = w.get("why")
    if not y:
        return None
    bucket = (f", which the timer wheel filed for jiffy {y['bucket_jiffy']} (it never fires "
              "a timer early)" if y["bucket_jiffy"] else "")
    phase = (f", {y['armed_phase']:.2f} into it" if 0 <= y["armed_phase"] < 1 else "")
    late = (f" (jiffy {y['fired_jiffy']}: the tick came late)"
            if y["bucket_jiffy"] and y["fired_jiffy"] > y["bucket_jiffy"] else "")
    return (f"why: at +{y['armed_ms']:.3f} ms (jiffy {y['armed_jiffy']}{phase}) a "
            f"registration queued the grace period's work for jiffy {y['due_jiffy']}{bucket}; "
            f"it fired at +{y['fired_ms']:.3f} ms{late}, {y['fired_after_jiffies']:.2f} "
            f"jiffies later, and the wait ended {y['wait_end_after_fire_ms']:.3f} ms after "
            "that")


def summary(s: Startup, hz: int | None, timer_events=None) -> dict:
    """The start-up in figures, and the verdict in the sweep's words (with
    `timer_events`, each long SRCU wait's timer chain: grace_period_chain)."""
    start = s.milestones.get("exec", 0.0)
    end = s.milestones.get("process end", 0.0)
    startup = max(end - start, 0.0)
    kvm = sum(c.ns for c in s.ioctls)
    waits = srcu_waits(s)
    grace_period_chain(s, timer_events, waits, hz)
    srcu_ns = sum(w["wait_ms"] for w in waits) * 1e6
    for w in waits:
        w["jiffies"] = jiffies(w["wait_ms"] * 1e6, hz)
    by_kind: dict[str, float] = {}
    for c in s.ioctls:
        for sl in c.sleeps:
            k = classify(sl).kind
            by_kind[k] = by_kind.get(k, 0.0) + sl.ns
    names: dict[str, list] = {}
    for c in s.ioctls:
        n = names.setdefault(c.name, [0, 0.0])
        n[0] += 1
        n[1] += c.ns
    behaviour, text, cost = verdict(s, waits, hz)
    irq = [(c, sl) for c in s.ioctls for sl in c.sleeps if classify(sl).kind == "irq_srcu"]
    irq_ms = sum(sl.ns for _, sl in irq) / 1e6
    ms = s.milestones
    init = ms.get(INIT_MILESTONE)
    for w in waits:
        w["phase"] = phase_of(w["t_ms"] * 1e6, ms)
    to_init = [w for w in waits if init is not None and w["t_ms"] * 1e6 < init]
    return {
        "irq_srcu_waits": len({c.seq for c, _ in irq}), "irq_srcu_wait_ms": irq_ms,
        "irq_srcu_by_ioctl": sorted({c.name for c, _ in irq}),
        "time_to_init_ms": None if init is None else (init - start) / 1e6,
        "srcu_wait_to_init_ms": None if init is None else sum(w["wait_ms"] for w in to_init),
        "srcu_share_of_init": (None if not init or init <= start else
                               sum(w["wait_ms"] for w in to_init) * 1e6 / (init - start)),
        "srcu_wait_by_phase_ms": {p: sum(w["wait_ms"] for w in waits if w["phase"] == p)
                                  for p in PHASES if any(w["phase"] == p for w in waits)},
        "startup_ms": startup / 1e6,
        "kvm_ioctls": len(s.ioctls),
        "kvm_ioctl_ms": kvm / 1e6,
        "kvm_ioctl_share": kvm / startup if startup else None,
        "srcu_waits": len(waits),
        "srcu_wait_ms": srcu_ns / 1e6,
        "srcu_share": srcu_ns / startup if startup else None,
        "sleep_ms_by_kind": {k: v / 1e6 for k, v in sorted(by_kind.items())},
        "by_ioctl": {k: {"count": v[0], "ms": v[1] / 1e6}
                     for k, v in sorted(names.items(), key=lambda kv: -kv[1][1])},
        "registrations": sum(1 for c in s.ioctls if _is_assign(c)),
        "deassigns": sum(1 for c in s.ioctls if c.name == "KVM_IOEVENTFD" and c.args
                         and c.args.get("deassign")),
        "waits": waits,
        "milestones_ms": {k: v / 1e6 for k, v in sorted(s.milestones.items(),
                                                         key=lambda kv: kv[1])},
        "process_ms": (s.milestones["process reaped"] / 1e6
                       if "process reaped" in s.milestones else None),
        "hz": hz,
        "behaviour": behaviour,
        "verdict": text,
        "cost": cost,
    }


def verdict(s: Startup, waits: list[dict], hz: int | None) \
        -> tuple[str, str, dict | None]:
    """('sync' | 'deferred' | 'none' | 'unknown', the sentence, what the regression cost:
    {'paid_by', 'wait_ms' (in all), 'longest_ms', 'waits'} or None). Registrations that
    each wait for a grace period are the pre-6.18 behaviour; a later ioctl that waits
    long behind the grace periods the registrations left is the 6.18 follow-up."""
    assigns = [c for c in s.ioctls if _is_assign(c)]
    sync = [w for w in waits if w["is_registration"]]
    if sync:
        total = sum(w["wait_ms"] for w in sync)
        of = f" of {len(assigns)}" if len(assigns) >= len(sync) else ""
        return "sync", (f"{stats.SYNC_TEXT}: {len(sync)}{of} registrations slept in a grace "
                        f"period, {total:.2f} ms in all"), \
            {"paid_by": f"{len(sync)}{of} registrations", "wait_ms": total,
             "longest_ms": max(w["wait_ms"] for w in sync), "waits": len(sync)}
    # The follow-up is a long wait behind registrations (a grace period they started);
    # one with none before it (a VM's first grace period, say) is someone else's. With
    # no uprobe, registrations cannot be counted and any long wait is taken for it.
    ioevs = [c for c in s.ioctls if c.name == "KVM_IOEVENTFD"]
    counted = not ioevs or any(c.args for c in ioevs)
    long = [w for w in waits if w["wait_ms"] * 1e6 >= LONG_WAIT_NS
            and (w["registrations_before"] or not counted)]
    if long:
        w = max(long, key=lambda x: x["wait_ms"])
        j = jiffies(w["wait_ms"] * 1e6, hz)
        jtext = f" ({j:.1f} jiffies at HZ={hz})" if j is not None else ""
        what = f"{w['name']} {w['what']}".strip() if w["what"] else w["name"]
        regs = w["registrations_before"]
        behind = (f" behind the grace period the {regs} registration"
                  f"{'s' if regs != 1 else ''} before it started" if regs else "")
        extra = f" ({len(long)} such waits)" if len(long) > 1 else ""
        return "deferred", (f"{stats.DEFERRED_TEXT} follow-up: {what} waited "
                            f"{w['wait_ms']:.2f} ms{jtext}{behind}{extra}"), \
            {"paid_by": what, "wait_ms": sum(x["wait_ms"] for x in long),
             "longest_ms": w["wait_ms"], "waits": len(long)}
    if not any(c.sleeps for c in s.ioctls) and not s.ioctls:
        return "unknown", "no KVM ioctls were traced", None
    if assigns and not any(c.args for c in assigns):
        return "unknown", "registrations could not be told from deassigns (no uprobe)", None
    other = [w for w in waits if w["wait_ms"] * 1e6 >= LONG_WAIT_NS]
    longest = ""
    if other:
        w = max(other, key=lambda x: x["wait_ms"])
        what = f"{w['name']} {w['what']}".strip() if w["what"] else w["name"]
        longest = f"{what} waited {w['wait_ms']:.2f} ms for one no ioeventfd started"
    if not ioevs:
        # QEMU 10 and later register their ioeventfds after start-up (none at all for a
        # machine with no virtio device at reset): nothing here for either regression
        return "none", ("the VMM made no KVM_IOEVENTFD call during start-up, so neither "
                        "regression had anything to cost it"
                        + (f" ({longest})" if longest else "")), None
    if other:
        return "none", (f"no ioctl waited behind the registrations' grace periods "
                        f"({longest})"), None
    return "none", "no KVM ioctl waited for an SRCU grace period", None
