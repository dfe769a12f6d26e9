"""`pyvmm lab run`: pyvmm's Python workloads (ptwrite, checks, stress) on a lab kernel.

The same kernel, patched modules and module parameters as `lab kernel`, but /init runs
the Python VMM (pyvmm.lab.experiments.inside) from a Python runtime appended to the
initramfs (pyvmm.lab.boot.pyruntime) instead of the C helper's plan. Each job's result comes back as
one JSON line on the data port and lands in results.json beside the usual host facts
of the inner kernel; the initramfs size, the runtime's file count and the time from
QEMU's start to /init and to the first result are recorded.
"""

from __future__ import annotations

import json
import os
import time

from ...errors import LabError
from ...results import envelope
from ..boot import initramfs, pyruntime, qemu, vmmruntime
from . import inside
from .labrun import ENVIRONMENT, Finished, LabRun
from .options import LabOptions, Ui, module_args
from .ready import ReadyKernel

SCHEMA = "pyvmm.lab-jobs/1"


class JobsRun(LabRun):
    """pyvmm's Python jobs in a lab kernel, each result a line of results.json."""

    filename = "results.json"
    dir_prefix = "lab-run"

    def __init__(self, opts: LabOptions, jobs: list[str], ui: Ui | None = None):
        super().__init__(opts, ui)
        self.jobs = list(jobs)
        self.rt = self.vmm = None
        self.image_bytes = 0
        self.t_q = 0.0
        self.marks: dict[str, float] = {}

    def check(self) -> None:
        if not self.jobs:
            raise LabError("no jobs: give e.g. ptwrite:2000 check:memslot-coherence stress:30")
        for j in self.jobs:                       # bad jobs fail before anything is installed
            inside.parse_job(j)

    def image(self, ready: ReadyKernel) -> bytes:
        ui, timings = self.ui, ready.timings
        ui.stage("python runtime")
        t = time.monotonic()
        self.rt = rt = pyruntime.build(ui.log)
        timings["runtime_s"] = time.monotonic() - t
        env, extra = [], rt.archive
        if any(j.startswith("trace:") for j in self.jobs):
            env, self.vmm = _vmm_for_traces(ready.kit, ui, self.opts.qemu)
            extra += self.vmm.archive
        if any(j.startswith("trace:linux-microvm") for j in self.jobs):
            genv, garchive = _linux_guest(ui, self.opts.install, ready.timings)
            env += genv
            extra += garchive
        command = rt.command[:1] + env + rt.command[1:] + self.jobs
        image = initramfs.build(ready.busybox, ready.helper, ready.modules, "",
                                module_args=module_args(ready.kit, self.opts.kvm_args),
                                python=command, extra=extra)
        self.image_bytes = len(image)
        return image

    def new_doc(self, host: dict) -> dict:
        rt, vmm = self.rt, self.vmm
        return envelope(SCHEMA, host, status="running", finished=None,
                        environment=ENVIRONMENT, jobs=list(self.jobs), results=[],
                        lab={"initramfs_bytes": self.image_bytes,
                             "runtime_bytes": len(rt.archive), "runtime_files": rt.files,
                             "runtime_cached": rt.cached,
                             "traced_vmm": None if vmm is None else {
                                 "binary": vmm.binary, "files": vmm.files,
                                 "version": getattr(vmm, "version", None),
                                 "bytes": len(vmm.archive), "cached": vmm.cached}})

    def qemu_config(self, initrd: str) -> qemu.QemuConfig:
        # Jobs print only when they finish: the stall bound is the whole run's.
        cfg = super().qemu_config(initrd)
        cfg.mem_mb = max(cfg.mem_mb, 1024)
        cfg.stall_timeout_s = self.opts.total_timeout_s
        return cfg

    def boot(self, qcfg: qemu.QemuConfig) -> tuple:
        self.t_q = time.monotonic()
        return super().boot(qcfg)

    def on_stage(self, name: str) -> None:
        self.marks.setdefault(name, time.monotonic() - self.t_q)
        self.ui.stage("boot kernel" if name == "kernel" else "jobs")

    def on_line(self, line: dict) -> None:
        if line.get("type") == "result":
            self.marks.setdefault("first_result", time.monotonic() - self.t_q)
            self.doc["results"].append(line)
            self.ui.log(f"job {line['job']}: "
                        f"{'ok' if line['ok'] else 'FAILED: ' + str(line['error'])}"
                        f" ({line['wall_s']:.1f} s in the guest)")
            self.save(force=True)

    def finish(self, stream) -> None:
        doc, timings = self.doc, self.ready.timings
        timings["to_init_s"] = self.marks.get("sweep")
        timings["to_first_result_s"] = self.marks.get("first_result")
        doc["lab"]["errors"] = stream.errors[-40:]
        doc["lab"]["python_start_uptime_s"] = stream.facts.get("python_start")
        missing = len(self.jobs) - len(doc["results"])
        if missing:
            doc["status"] = "failed"
            raise LabError(f"{missing} of {len(self.jobs)} jobs sent no result (exit status "
                           f"{stream.rc}); logs in {self.work}; last errors:\n  "
                           + "\n  ".join(stream.errors[-12:] or ["none"]))
        doc["status"] = "complete" if all(r["ok"] for r in doc["results"]) else "failed"


def run_jobs(opts: LabOptions, jobs: list[str], ui: Ui | None = None) -> Finished:
    """The jobs in the variant's lab kernel."""
    return JobsRun(opts, jobs, ui).run()


def _vmm_for_traces(kit, ui, qemu: str | None = None) \
        -> tuple[list[str], "vmmruntime.VmmRuntime"]:
    """The QEMU the trace jobs run (this host's, or with `qemu` = debian:SUITE that suite's
    with its own loader and libraries), copied in, and what the inner tracer cannot find
    out in an initramfs without binutils: the uprobe's site in the C library QEMU calls,
    and the lab kernel's HZ."""
    from ...trace import probesite, workloads
    ui.stage("VMM for the trace")
    if qemu:
        from ..sources import qemus
        launcher = qemus.fetch(qemu, ui.log)
        vmm = vmmruntime.build_launcher(launcher, qemus.files(launcher), ui.log)
        with open(os.path.join(launcher, qemus.LAUNCH)) as f:
            ln = json.load(f)
        site = probesite.ioctl_site(ln["loader"], ln["libc"])
        target = launcher
    else:
        vmm = vmmruntime.build(workloads.QEMU, ui.log)
        site = probesite.ioctl_site(vmm.binary)
        target = vmm.binary
    from ..sources.qemus import version_of
    vmm.version = version_of(target)
    env = [f"PYVMM_TRACE_QEMU={target}", f"PYVMM_TRACE_HZ={kit.meta.get('config_hz') or 0}"]
    if site[0] is not None:
        env.append(f"PYVMM_TRACE_UPROBE={site.text()}")
    return env, vmm


def _linux_guest(ui, install: bool, timings: dict) -> tuple[list[str], bytes]:
    """The Linux guest of the linux-microvm workload (its kernel built from Debian's
    source of GUEST_SERIES, cached), packed at its cache paths, and where it is."""
    from ..boot import archive, linuxguest
    from ..builds.guest import GUEST_SERIES
    from ..sources import apt, kits
    ui.stage("Linux guest")
    t = time.monotonic()
    kit = kits.build_kit(apt.resolve(GUEST_SERIES, log=ui.log), log=ui.log)
    g = linuxguest.build(kit, ui.log, install)
    timings["linux_guest_s"] = round(time.monotonic() - t, 1)
    blob, _, _ = archive.pack(g.files, "linuxguest-pack", "the Linux guest", ui.log)
    return [f"PYVMM_TRACE_LINUX_KERNEL={g.kernel}", f"PYVMM_TRACE_LINUX_INITRD={g.initrd}"], blob
