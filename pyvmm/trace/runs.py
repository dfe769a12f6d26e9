"""K traced start-ups of one command, as one results document (schema pyvmm.trace/1, in
the common envelope): every run's KVM ioctls, sleeps and summary, the medians and spread
over the runs, and with `overhead` K untraced start-ups interleaved with the traced ones
(A/B) to say what tracing costs. trace.json is rewritten after every run, so an
interrupted trace keeps the runs it finished, marked as such; each run's raw trace text
is kept beside it (trace-N.txt)."""

from __future__ import annotations

import os
import statistics
import time

from .. import hostinfo
from ..errors import PyvmmError
from ..results import Saver, envelope, finishing, new_run_dir
from . import attribute, probesite, record, strace

SCHEMA = "pyvmm.trace/1"
SETTLE_S = 0.05             # a pause before every start-up
MEDIAN_KEYS = ("startup_ms", "process_ms", "kvm_ioctl_ms", "srcu_wait_ms", "srcu_waits",
               "kvm_ioctls")


def ioctl_dict(c) -> dict:
    return {"seq": c.seq, "tid": c.tid, "fd": c.fd, "kind": c.kind, "name": c.name,
            "cmd": c.cmd, "args": c.args, "what": c.describe, "t_ms": c.t_in / 1e6,
            "ms": c.ns / 1e6, "ret": c.ret,
            "sleeps": [sleep_dict(sl) for sl in c.sleeps]}


def sleep_dict(sl) -> dict:
    w = attribute.classify(sl)
    return {"t_ms": sl.t_out / 1e6, "ms": sl.ns / 1e6, "state": sl.state, "kind": w.kind,
            "label": w.label, "function": w.function, "path": w.path,
            "waker": sl.waker}


def run_dict(rec: record.Recording, hz: int | None) -> dict:
    s = rec.startup
    return {"rc": rec.rc, "pid": rec.pid, "wall_ms": rec.wall_ns / 1e6,
            "method": rec.method, "clock": rec.clock, "notes": rec.notes,
            "probe": rec.probe,
            "summary": attribute.summary(s, hz, rec.timer_events),
            "ioctls": [ioctl_dict(c) for c in s.ioctls],
            "ports": [{"t_ms": t / 1e6, "dir": d, "port": p, "value": v}
                      for t, d, p, v in s.ports]}


def spread(values) -> dict | None:
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def medians(runs: list[dict]) -> dict:
    out = {k: spread(r["summary"][k] for r in runs) for k in MEDIAN_KEYS}
    names = []
    for r in runs:
        for k in r["summary"]["milestones_ms"]:
            if k not in names:
                names.append(k)
    out["milestones_ms"] = {k: spread(r["summary"]["milestones_ms"].get(k) for r in runs)
                            for k in names}
    verdicts = [r["summary"]["behaviour"] for r in runs]
    out["behaviour"] = max(set(verdicts), key=verdicts.count) if verdicts else None
    return out


TRACE_VERDICTS = {"sync": "sync-on-register", "deferred": "deferred-free follow-up",
                  "none": "no SRCU stall", "unknown": "unknown"}


def findings(runs: list[dict]) -> dict | None:
    """What the traced start-ups found, for machines (trace.json's "analysis"): the
    majority's verdict, the regressions it shows ('sync-on-register': registrations
    waited; 'stall': a later ioctl waited behind the grace periods they started), the
    sentence of a run that gave it, and what it cost (medians over those runs)."""
    if not runs:
        return None
    kinds = [r["summary"]["behaviour"] for r in runs]
    behaviour = max(set(kinds), key=kinds.count)
    same = [r["summary"] for r in runs if r["summary"]["behaviour"] == behaviour]
    costs = [x["cost"] for x in same if x.get("cost")]
    paid = [c["paid_by"] for c in costs]

    def med(xs):
        xs = [x for x in xs if x is not None]
        return statistics.median(xs) if xs else None
    return {"verdict": TRACE_VERDICTS.get(behaviour, behaviour), "behaviour": behaviour,
            "runs": len(runs), "runs_agreeing": len(same),
            "regressions": {"sync": ["sync-on-register"], "deferred": ["stall"]}.get(
                behaviour, []),
            "answer": same[0]["verdict"],
            "startup_ms": med(x["startup_ms"] for x in same),
            "srcu_wait_ms": med(x["srcu_wait_ms"] for x in same),
            "srcu_share": med(x["srcu_share"] for x in same),
            "regression_ms": med(c["wait_ms"] for c in costs),
            "longest_wait_ms": med(c["longest_ms"] for c in costs),
            "paid_by": max(set(paid), key=paid.count) if paid else None,
            "hz": same[0].get("hz")}


class TraceRun:
    """Runs the traces and owns trace.json."""

    def __init__(self, argv: list[str], out: str, repeat: int = 1, port: int | None = None,
                 timeout_s: float = 120.0, overhead: bool = False, workload: str | None = None,
                 ok_status: set[int] | None = None, host: dict | None = None,
                 hz: int | None = None, use_strace: bool = False,
                 captures_json: bool = False, arguments: bool = True,
                 stacks: bool = True, timers: bool = False, libc: str | None = None):
        if repeat < 1:
            raise PyvmmError("--repeat must be at least 1")
        self.argv, self.repeat, self.port, self.timeout_s = argv, repeat, port, timeout_s
        self.overhead, self.ok_status, self.use_strace = overhead, ok_status, use_strace
        self.captures_json = captures_json
        self.arguments, self.stacks, self.timers = arguments, stacks, timers
        self.libc = libc            # the C library the command's ioctl() is in, if not ldd's
        self.host = host or hostinfo.collect(with_kvm=False)
        self.hz = hz if hz is not None else self.host.get("config_hz")
        self.dir = new_run_dir(out, f"trace-{self.host['hostname']}-{self.host['kernel']}")
        self.path = os.path.join(self.dir, "trace.json")
        self.doc = envelope(SCHEMA, self.host, status="running", finished=None,
                            traced=list(argv), workload=workload, port=port, hz=self.hz,
                            repeat=repeat, arguments=arguments, stacks=stacks,
                            timers=timers,
                            analysis=None, runs=[], untraced=[], medians=None,
                            overhead=None)
        self._save = Saver(self.path, self.doc)

    def run(self, progress=None) -> dict:
        total = self.repeat * (2 if self.overhead else 1)
        done = 0
        self._save(force=True)
        with finishing(self.doc, lambda: self._save(force=True)):
            for i in range(self.repeat):
                # A/B in turns (untraced first in even pairs, traced first in odd ones),
                # with a pause before each start-up so the previous one's teardown (the
                # VM's destruction, deferred frees) is over.
                if self.overhead and i % 2 == 0:
                    done = self._untraced(done, total, progress)
                time.sleep(SETTLE_S)
                out_path = os.path.join(self.dir, f"output-{i + 1}.txt")
                with open(out_path, "wb") as out:
                    if self.use_strace:
                        rec = strace.record_strace(self.argv, self.timeout_s, out.fileno())
                    else:
                        site = None
                        if self.libc and self.arguments:
                            site = probesite.ioctl_site(self.argv[0], self.libc)
                            site = site if site[0] is not None else None
                        rec = record.record(self.argv, self.port, self.timeout_s,
                                            out.fileno(), arguments=self.arguments,
                                            stacks=self.stacks, timers=self.timers,
                                            site=site)
                self._check(rec.rc, "traced")
                with open(os.path.join(self.dir, f"trace-{i + 1}.txt"), "w") as f:
                    f.write(rec.text)
                run = run_dict(rec, self.hz)
                if self.captures_json:
                    run["vmm_report"] = _own_report(out_path)
                    run["agreement"] = phase_agreement(run)
                self.doc["runs"].append(run)
                self.doc["medians"] = medians(self.doc["runs"])
                self.doc["analysis"] = findings(self.doc["runs"])
                if self.overhead:
                    self.doc["overhead"] = overhead_figures(self.doc)
                self._save(force=True)
                done += 1
                if progress:
                    progress(done, total)
                if self.overhead and i % 2 == 1:
                    done = self._untraced(done, total, progress)
            self.doc["status"] = "complete"
        return self.doc

    def _untraced(self, done: int, total: int, progress) -> int:
        time.sleep(SETTLE_S)
        rc, wall = record.run_untraced(self.argv, self.timeout_s)
        self._check(rc, "untraced")
        self.doc["untraced"].append({"rc": rc, "wall_ms": wall / 1e6})
        if self.doc["runs"]:
            self.doc["overhead"] = overhead_figures(self.doc)
        if progress:
            progress(done + 1, total)
        return done + 1

    def _check(self, rc: int | None, what: str) -> None:
        if self.ok_status is not None and rc not in self.ok_status:
            raise PyvmmError(f"the {what} run of {self.argv[0]} exited with status {rc} "
                             f"(expected {', '.join(map(str, sorted(self.ok_status)))}): "
                             "run the command by hand to see why")


def overhead_figures(doc: dict) -> dict | None:
    """Traced against untraced start-up (wall time from exec to exit), medians and the
    paired ratios."""
    traced = [r["wall_ms"] for r in doc["runs"]]
    plain = [u["wall_ms"] for u in doc["untraced"]]
    if not traced or not plain:
        return None
    pairs = [t / u for t, u in zip(traced, plain) if u]
    return {"traced_ms": spread(traced), "untraced_ms": spread(plain),
            "ratio_of_medians": statistics.median(traced) / statistics.median(plain),
            "paired_ratio": spread(pairs)}


def _own_report(path: str) -> dict | None:
    """The traced VMM's own JSON report (pyvmm boot --json), or None."""
    import json
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def phase_agreement(run: dict) -> list[dict]:
    """pyvmm boot's own phase timer beside the trace: for each memslot change and vCPU
    creation (the steps that pay a pending grace period), the phase's wall time against
    the ioctl's time in the kernel."""
    rep = run.get("vmm_report") or {}
    result = rep.get("result") or rep
    phases = result.get("phases") or []
    want = {"memslot": ("KVM_SET_USER_MEMORY_REGION", lambda a: a.get("slot", 0) >= 1),
            "vcpu": ("KVM_CREATE_VCPU", lambda a: True)}
    out = []
    for op, (name, pick) in want.items():
        timed = [p for p in phases if p.get("op") == op]
        calls = [c for c in run["ioctls"] if c["name"] == name and pick(c["args"])]
        for p, c in zip(timed, calls):
            srcu = sum(s["ms"] for s in c["sleeps"] if s["kind"] == "srcu")
            if srcu * 1e6 < attribute.LONG_WAIT_NS:
                continue        # a step of microseconds: its Python outweighs the ioctl
            phase_ms = p["wall_ns"] / 1e6
            out.append({"step": op, "phase_ms": phase_ms, "ioctl_ms": c["ms"],
                        "srcu_ms": srcu, "ratio": c["ms"] / phase_ms if phase_ms else None})
    return out
