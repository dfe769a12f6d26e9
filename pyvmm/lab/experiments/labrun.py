"""One lab run, from the options to the document: the skeleton every single-kernel
experiment shares (the sweep in kernel_lab.py, the Python jobs in jobs.py).

    ready kernel -> initramfs -> results directory -> document with the lab's keys ->
    QEMU (TCG) under `finishing` -> the inner kernel's host facts -> the experiment's end

An experiment says only what differs: the initramfs it boots, the document it fills,
what each data line means, and when the run is complete (the hooks of LabRun)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from ... import hostinfo
from ...results import Saver, finishing, new_run_dir
from ..boot import qemu
from ..sources import kits
from .options import LabOptions, Ui, kernel_cmdline
from .ready import ReadyKernel, build_meta, ready

ENVIRONMENT = "qemu-tcg"


def inner_host(kit: kits.Kit, facts: dict[str, str], smp: int, outer: dict) -> dict:
    """Host facts for the kernel inside QEMU (same keys as hostinfo.collect()); `outer` is
    hostinfo.collect() of the machine running QEMU."""
    meta = kit.meta
    return {
        "hostname": ENVIRONMENT,
        "kernel": facts.get("kernel", meta["kernel_release"]),
        "kernel_version": facts.get("kernel_version", ""),
        "machine": facts.get("machine", kit.arch.name),
        "config_source": meta["config_source"],
        "config_hz": meta["config_hz"],
        "preemption": meta["preemption"],
        "cpu_model": facts.get("cpu_model", kit.arch.lab_cpu_model).strip(),
        "cpus": int(facts["cpus"]) if facts.get("cpus", "").isdigit() else smp,
        "backend": kit.arch.lab_backend,
        "rlimit_nofile": None, "python": None, "kvm_api_version": None, "caps": None,
        "kvm_error": None,
        "clocksource": facts.get("clocksource"),
        "modules": facts.get("modules", "").split(),
        "package": f"{meta['package']} {meta['version']}",
        "outer_host": {k: outer[k] for k in ("hostname", "kernel", "cpu_model", "cpus",
                                             "backend")},
    }


def emulator_argv(spec: str | None, ui: Ui) -> tuple[str, ...] | None:
    """The argv that starts another suite's QEMU as the lab's emulator, or None."""
    if not spec:
        return None
    import json
    from ..sources import qemus
    launcher = qemus.fetch(spec, ui.log)
    with open(os.path.join(launcher, qemus.LAUNCH)) as f:
        ln = json.load(f)
    return (ln["loader"], "--library-path", ln["library_path"], ln["binary"], "-L",
            ln["datadir"])


@dataclass
class Finished:
    """What a lab run leaves: its document, its directory and its stage timings."""
    doc: dict
    out_dir: str
    timings: dict = field(default_factory=dict)


class LabRun:
    """The skeleton; subclasses fill in the hooks below."""

    filename = "run.json"       # the document's name in the run directory
    dir_prefix: str | None = None   # the run directory's first word (default: the host's)

    def __init__(self, opts: LabOptions, ui: Ui | None = None):
        self.opts = opts
        self.ui = ui or Ui()
        self.doc: dict = {}
        self.save: Saver | None = None
        self.ready: ReadyKernel | None = None
        self.work = ""

    # --- hooks -------------------------------------------------------------------------
    def check(self) -> None:
        """Anything about the experiment's own arguments, before the kernel is made
        ready (nothing downloaded yet)."""

    def image(self, ready: ReadyKernel) -> bytes:
        raise NotImplementedError

    def new_doc(self, host: dict) -> dict:
        raise NotImplementedError

    def qemu_config(self, initrd: str) -> qemu.QemuConfig:
        o, kit = self.opts, self.ready.kit
        return qemu.QemuConfig(kernel=kit.vmlinuz, initrd=initrd, smp=o.smp, mem_mb=o.mem_mb,
                               boot_timeout_s=o.boot_timeout_s,
                               stall_timeout_s=o.stall_timeout_s,
                               total_timeout_s=o.total_timeout_s,
                               extra_args=kernel_cmdline(o, kit), arch=kit.arch,
                               emulator=emulator_argv(o.emulator, self.ui), mttcg=o.mttcg)

    def boot(self, qcfg: qemu.QemuConfig) -> tuple:
        """QEMU once; (stream, seconds). The sweep retries a hung boot here."""
        return qemu.run(qcfg, self.work, self.on_line, self.on_stage)

    def on_line(self, line: dict) -> None:
        pass

    def on_stage(self, name: str) -> None:
        pass

    def finish(self, stream) -> None:
        """Check that the run is complete and set the document's status."""
        raise NotImplementedError

    # --- the skeleton ---------------------------------------------------------------------
    def lab_keys(self, qcfg: qemu.QemuConfig, host: dict) -> dict:
        """What every lab document records of how it ran."""
        o, r = self.opts, self.ready
        return {"kernel_spec": o.variant.kernel, "variant": o.variant.label,
                "kvm_args": dict(o.kvm_args), "cmdline": o.cmdline,
                "kvm_patch": None if r.built is None else dict(r.built.meta),
                "kernel_build": build_meta(r), "package": host["package"], "smp": o.smp,
                "qemu": qemu.qemu_version(r.kit.arch.qemu, qcfg.emulator),
                "tcg": ("multi-threaded" if qcfg.mttcg else
                        "single-threaded" if o.smp > 1 else "one CPU"),
                "command": qemu.command(qcfg, "console.log", "data.log"),
                "timings": r.timings}

    def run(self) -> Finished:
        self.check()
        t_start = time.monotonic()
        self.ready = ready(self.opts, self.ui)      # checks the options before any download
        timings = self.ready.timings
        t = time.monotonic()
        image = self.image(self.ready)
        timings["build_s"] = time.monotonic() - t
        outer = hostinfo.collect(with_kvm=False)
        host = inner_host(self.ready.kit, {}, self.opts.smp, outer)
        out = new_run_dir(self.opts.out,
                          f"{self.dir_prefix or host['hostname']}-{host['kernel']}")
        self.work = os.path.join(out, "lab")
        os.makedirs(self.work)
        initrd = os.path.join(self.work, "initramfs.cpio.gz")
        with open(initrd, "wb") as f:
            f.write(image)
        qcfg = self.qemu_config(initrd)
        self.doc = doc = self.new_doc(host)
        doc["kernel_check"] = self.ready.kernel_check
        doc.setdefault("lab", {}).update(self.lab_keys(qcfg, host))
        self.save = Saver(os.path.join(out, self.filename), doc)
        self.save(force=True)
        with finishing(doc, lambda: self.save(force=True), timings, t_start):
            stream, qemu_s = self.boot(qcfg)
            timings["qemu_s"] = qemu_s
            doc["host"] = inner_host(self.ready.kit, stream.facts, self.opts.smp, outer)
            self.finish(stream)
        return Finished(doc, out, timings)
