"""What runs inside a lab kernel: `python -m pyvmm.lab.experiments.inside JOB [JOB ...]`.

Each JOB is one of the workloads that need the Python VMM, run through the same library
functions the host commands use, with its result printed as one JSON line on stdout
({"type": "result", "job": ..., "ok": ..., "data": ...}), which the lab's /init sends
to the data port:

  ptwrite:COUNT[:REPEATS]      pyvmm bench ptwrite (both configurations)
  check:NAME[:ITERATIONS]      pyvmm check ioeventfd-ordering | memslot-coherence |
                               guest-memfd
  stress:SECONDS[:SEED]        pyvmm stress
  xen:SECONDS[:SEEDS[:BOUND]]  pyvmm stress --xen, once per seed 1..SEEDS, each until the
                               watchdog sees a hang (BOUND seconds without return) or
                               SECONDS pass
  trace:qemu-microvm[:K[:R]]   pyvmm trace of QEMU microvm with K virtio devices, R
                               start-ups (QEMU is copied into the initramfs by the host)
  trace:linux-microvm[:BxQ[:R]]  the same QEMU booting the lab's Linux guest to its /init
                               with B virtio-blk devices of Q queues (the guest is copied
                               in too)
  gpwork:N[:REPEATS]           N ioeventfd registrations per burst, traced: where SRCU's
                               grace-period work ran and what it took from the registrant

Nothing here imports rich, matplotlib or numpy: the lab's initramfs carries only what
these jobs need (pyvmm.lab.boot.pyruntime collects it by importing this module's JOBS).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import traceback

from ...errors import PyvmmError


def _ptwrite(count: str = "2000", repeats: str = "3") -> dict:
    from ... import ptwrite
    res = ptwrite.run(int(count), int(repeats))
    return {"count": res["count"], "repeats": res["repeats"], "summary": res["summary"]}


def _check(name: str, iterations: str = "2000") -> dict:
    from ...checks import gmem, races
    if name == "guest-memfd":
        why = gmem.supported()
        if why:
            return {"skipped": why}
        return {"cases": [c.to_dict() for c in gmem.run_cases()]}
    fn = {"ioeventfd-ordering": races.ioeventfd_ordering,
          "memslot-coherence": races.memslot_coherence}.get(name)
    if fn is None:
        raise PyvmmError(f"unknown check '{name}': ioeventfd-ordering, memslot-coherence or "
                         "guest-memfd")
    res = fn(iterations=int(iterations), duration_s=600)
    out = res.to_dict()
    out["latency"] = res.latency_summary()
    return out


def _stress(seconds: str = "10", seed: str = "1") -> dict:
    from ...stress import Stress, StressConfig
    res = Stress(StressConfig(duration_s=float(seconds), seed=int(seed))).run()
    return res.to_dict()


_STUCK = []     # set when a job leaves threads stuck in the kernel (a deadlock)


def _xen(seconds: str = "30", seeds: str = "1", bound: str = "5") -> dict:
    from ...stress.xen import XenStressConfig, run
    runs = []
    for seed in range(1, int(seeds) + 1):
        r = run(XenStressConfig(duration_s=float(seconds), seed=seed, bound_s=float(bound)))
        runs.append(r.to_dict())
        if r.skipped:
            break
        if r.hang:
            _STUCK.append(seed)
    return {"runs": runs}


def _trace(workload: str = "qemu-microvm", k: str = "", repeats: str = "1") -> dict:
    """pyvmm trace of a workload, REPEATS start-ups; what the host found out for it comes
    in the environment (the QEMU copied in, the uprobe's site, the kernel's HZ)."""
    from ...trace import attribute, probesite, record, workloads
    w = workloads.parse(f"{workload}:{k}" if k else workload,
                        qemu=os.environ.get("PYVMM_TRACE_QEMU"))
    site = None
    if os.environ.get("PYVMM_TRACE_UPROBE"):
        site = probesite.ProbeSite.parse(os.environ["PYVMM_TRACE_UPROBE"])
    hz = int(os.environ.get("PYVMM_TRACE_HZ") or 0) or None
    runs = []
    for i in range(int(repeats)):
        out = f"/tmp/trace-output-{i}.txt"
        with open(out, "wb") as f:
            rec = record.record(w.argv, w.port, timeout_s=300.0, site=site, timers=True,
                                output=f.fileno())
        with open(out, errors="replace") as f:
            tail = f.read().strip().splitlines()[-6:]
        if rec.rc not in w.ok_status:
            raise PyvmmError(f"{w.spec} exited with status {rec.rc} in the lab kernel: "
                             + " | ".join(tail))
        if w.name == "linux-microvm" and "init started" not in rec.startup.milestones:
            raise PyvmmError(f"{w.spec}: the guest never reached /init (status {rec.rc}): "
                             + (" | ".join(tail) or "no output"))
        summ = attribute.summary(rec.startup, hz, rec.timer_events)
        summ.pop("by_ioctl", None)
        runs.append({"rc": rec.rc, "wall_ms": rec.wall_ns / 1e6, "notes": rec.notes,
                     "probe": rec.probe, "summary": summ})
    return {"workload": w.spec, "runs": runs}


def _gpwork(n: str = "32", repeats: str = "5") -> dict:
    """N ioeventfd registrations, REPEATS bursts, traced: where SRCU's grace-period work
    ran and what it took from the registrant (pyvmm.trace.gpwork)."""
    from ...trace import gpwork
    return gpwork.run(int(n), int(repeats))


JOBS = {"ptwrite": _ptwrite, "check": _check, "stress": _stress, "xen": _xen,
        "trace": _trace, "gpwork": _gpwork}


def parse_job(text: str) -> tuple[str, list[str]]:
    """'ptwrite:2000:3' -> ('ptwrite', ['2000', '3']), checked without running it."""
    name, *args = text.split(":")
    if name not in JOBS:
        raise PyvmmError(f"unknown lab job '{name}': {', '.join(JOBS)} "
                         "(e.g. ptwrite:2000, check:memslot-coherence, stress:30, xen:30:3, "
                         "trace:qemu-microvm:2, gpwork:32:5)")
    for a in args:
        if not a or any(c.isspace() for c in a):
            raise PyvmmError(f"lab job '{text}': empty or spaced argument")
    if name in ("ptwrite", "stress", "xen", "gpwork") and not all(
            a.replace(".", "", 1).isdigit() for a in args):
        raise PyvmmError(f"lab job '{text}': {name} takes numbers")
    if name == "trace":
        ok = args and len(args) <= 3 and all(a.isdigit() for a in args[2:3])
        if ok and args[0] == "qemu-microvm":
            ok = all(a.isdigit() for a in args[1:2])
        elif ok and args[0] == "linux-microvm":
            ok = len(args) < 2 or bool(re.fullmatch(r"\d+x\d+", args[1]))
        else:
            ok = False
        if not ok:
            raise PyvmmError(f"lab job '{text}': give trace:qemu-microvm[:K[:REPEATS]] or "
                             "trace:linux-microvm[:BxQ[:REPEATS]]")
    return name, args


def main(argv: list[str]) -> int:
    rc = 0
    for text in argv:
        t0 = time.monotonic()
        try:
            name, args = parse_job(text)
            data, ok, error = JOBS[name](*args), True, None
        except Exception as e:          # reported to the host, and the next job runs
            data, ok, error = None, False, f"{type(e).__name__}: {e}"
            traceback.print_exc(file=sys.stderr)
            rc = 1
        print(json.dumps({"type": "result", "job": text, "ok": ok, "error": error,
                          "wall_s": round(time.monotonic() - t0, 3), "data": data}),
              flush=True)
    if _STUCK and os.environ.get("PYVMM_LAB_INNER") == "1":
        # Threads are stuck in the kernel for good: this process cannot exit, so end the
        # lab from here (the END marker, then power off through sysrq).
        print(f"PYVMM-LAB-END rc={rc}", flush=True)
        try:
            with open("/proc/sysrq-trigger", "w") as f:
                f.write("o")
        except OSError:
            pass
        os._exit(rc)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
