"""`pyvmm lab run`: pyvmm's Python workloads (ptwrite, checks, stress) on a lab kernel.

The same kernel, patched modules and module parameters as `lab kernel`, but /init runs
the Python VMM (pyvmm.lab.experiments.inner) from a Python runtime appended to the
initramfs (pyvmm.lab.boot.pyruntime) instead of the C helper's plan. Each job's result comes back as
one JSON line on the data port and lands in results.json beside the usual host facts
of the inner kernel; the initramfs size, the runtime's file count and the time from
QEMU's start to /init and to the first result are recorded.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from ... import hostinfo
from ...analysis.plan import new_run_dir
from ...errors import LabError
from ...results import envelope, finishing, write_json_atomic
from ..boot import initramfs, pyruntime, qemu, vmmruntime
from . import inner
from .prepare import (ENVIRONMENT, LabOptions, Ui, build_meta, inner_host, kernel_cmdline,
                      module_args, prepare)

SCHEMA = "pyvmm.lab-jobs/1"


def parse_kvm_args(items: list[str]) -> dict[str, str]:
    """['kvm_amd:npt=0', 'kvm_amd:avic=0'] -> {'kvm_amd': 'npt=0 avic=0'}."""
    out: dict[str, list[str]] = {}
    for item in items:
        mod, sep, param = item.partition(":")
        if not sep or not mod or "=" not in param or any(c.isspace() for c in param):
            raise LabError(f"--kvm-arg '{item}': give MODULE:NAME=VALUE, e.g. kvm_amd:npt=0")
        out.setdefault(mod, []).append(param)
    return {m: " ".join(ps) for m, ps in out.items()}


@dataclass
class JobsRun:
    doc: dict
    out_dir: str
    timings: dict = field(default_factory=dict)


def run_jobs(opts: LabOptions, jobs: list[str], ui: Ui | None = None) -> JobsRun:
    ui = ui or Ui()
    if not jobs:
        raise LabError("no jobs: give e.g. ptwrite:2000 check:memslot-coherence stress:30")
    for j in jobs:                       # bad jobs fail before anything is installed
        inner.parse_job(j)
    t_start = time.monotonic()
    prep = prepare(opts, ui)
    timings = prep.timings
    ui.stage("python runtime")
    t = time.monotonic()
    rt = pyruntime.build(ui.log)
    timings["runtime_s"] = time.monotonic() - t
    env, extra, vmm = [], rt.archive, None
    if any(j.startswith("trace:") for j in jobs):
        env, vmm = _vmm_for_traces(prep.kit, ui)
        extra += vmm.archive
    command = rt.command[:1] + env + rt.command[1:] + list(jobs)
    image = initramfs.build(prep.busybox, prep.helper, prep.modules, "",
                            module_args=module_args(prep.kit, opts.kvm_args),
                            python=command, extra=extra)
    outer = hostinfo.collect(with_kvm=False)
    host = inner_host(prep.kit, {}, opts.smp, outer)
    out = new_run_dir(opts.out, dict(host, hostname="lab-run"))
    work = os.path.join(out, "lab")
    os.makedirs(work)
    initrd = os.path.join(work, "initramfs.cpio.gz")
    with open(initrd, "wb") as f:
        f.write(image)
    doc = envelope(SCHEMA, host, status="running", finished=None,
                   environment=ENVIRONMENT, jobs=list(jobs),
                   kernel_check=prep.kernel_check, results=[],
                   lab={"variant": opts.variant.label, "kvm_args": dict(opts.kvm_args),
                        "cmdline": opts.cmdline,
                        "kvm_patch": None if prep.built is None else dict(prep.built.meta),
                        "kernel_build": build_meta(prep),
                        "initramfs_bytes": len(image), "runtime_bytes": len(rt.archive),
                        "runtime_files": rt.files, "runtime_cached": rt.cached,
                        "qemu": qemu.qemu_version(prep.kit.arch.qemu), "timings": timings,
                        "traced_vmm": None if vmm is None else {
                            "binary": vmm.binary, "files": vmm.files,
                            "bytes": len(vmm.archive), "cached": vmm.cached}})
    path = os.path.join(out, "results.json")
    write_json_atomic(path, doc)
    # Jobs print only when they finish: the stall bound is the whole run's.
    qcfg = qemu.QemuConfig(kernel=prep.kit.vmlinuz, initrd=initrd, smp=opts.smp,
                           mem_mb=max(opts.mem_mb, 1024), boot_timeout_s=opts.boot_timeout_s,
                           stall_timeout_s=opts.total_timeout_s,
                           total_timeout_s=opts.total_timeout_s,
                           extra_args=kernel_cmdline(opts, prep.kit), arch=prep.kit.arch)
    t_q = time.monotonic()
    marks = {}

    def on_stage(name):
        marks.setdefault(name, time.monotonic() - t_q)
        ui.stage("boot kernel" if name == "kernel" else "jobs")

    def on_line(line):
        if line.get("type") == "result":
            marks.setdefault("first_result", time.monotonic() - t_q)
            doc["results"].append(line)
            ui.log(f"job {line['job']}: {'ok' if line['ok'] else 'FAILED: ' + str(line['error'])}"
                   f" ({line['wall_s']:.1f} s in the guest)")
            write_json_atomic(path, doc)
    with finishing(doc, lambda: write_json_atomic(path, doc), timings, t_start):
        stream, qemu_s = qemu.run(qcfg, work, on_line, on_stage)
        timings["qemu_s"] = qemu_s
        timings["to_init_s"] = marks.get("sweep")
        timings["to_first_result_s"] = marks.get("first_result")
        doc["host"] = inner_host(prep.kit, stream.facts, opts.smp, outer)
        doc["lab"]["errors"] = stream.errors[-40:]
        doc["lab"]["python_start_uptime_s"] = stream.facts.get("python_start")
        missing = len(jobs) - len(doc["results"])
        if missing:
            doc["status"] = "failed"
            raise LabError(f"{missing} of {len(jobs)} jobs sent no result (exit status "
                           f"{stream.rc}); logs in {work}; last errors:\n  "
                           + "\n  ".join(stream.errors[-12:] or ["none"]))
        doc["status"] = "complete" if all(r["ok"] for r in doc["results"]) else "failed"
    return JobsRun(doc, out, timings)


def _vmm_for_traces(kit, ui) -> tuple[list[str], "vmmruntime.VmmRuntime"]:
    """The QEMU the trace jobs run, copied in with its libraries, and what the inner
    tracer cannot find out in an initramfs without binutils: the uprobe's site in the
    C library, and the lab kernel's HZ."""
    from ...trace import record, workloads
    ui.stage("VMM for the trace")
    vmm = vmmruntime.build(workloads.QEMU, ui.log)
    env = [f"PYVMM_TRACE_QEMU={vmm.binary}", f"PYVMM_TRACE_HZ={kit.meta.get('config_hz') or 0}"]
    site = record.ioctl_site(vmm.binary)
    if site[0] is not None:
        env.append(f"PYVMM_TRACE_UPROBE={site.text()}")
    return env, vmm
