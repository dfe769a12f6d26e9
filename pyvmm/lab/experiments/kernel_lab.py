"""The kernel lab: the registration sweep on any Debian kernel (6.1 ... latest), with
its stock KVM modules or with kvm.ko and kvm-amd.ko rebuilt with one of the project's
patches (a *variant*, e.g. 6.1+defer-free).

Steps: check the arguments; make sure QEMU and a static busybox are installed; resolve
and download the kernel's packages; unpack them into a kit (kernel, config, KVM
modules); rebuild the KVM modules with the patch when one is asked for; check
statically how kvm_io_bus_register_dev frees the old bus; build an initramfs with the
static helper and an interleaved plan; boot it under TCG; stream the boots into a
run.json of the same schema as `pyvmm bench` writes (environment 'qemu-tcg', host facts
of the inner kernel).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from ... import hostinfo
from ...analysis import report, stats
from ...analysis.plan import (SweepConfig, boot_order, cell_recipes, new_run_dir,
                              warmup_cell)
from ...errors import LabError, LabHang
from ...results import Saver, finishing, new_doc
from ..boot import initramfs, qemu
from ..boot.serial import boot_to_sample, plan_label
from .prepare import (ENVIRONMENT, LabOptions, Ui, build_meta, inner_host, kernel_cmdline,
                      module_args, prepare)

LAB_REPEATS = 10
LAB_WARMUP = 2
HELPER_TIMEOUT_MS = 60000


def make_plan(cfg: SweepConfig) -> list[str]:
    """Plan lines ('LABEL RECIPE'): warm-up boots, then every cell `repeats` times in
    seeded interleaved rounds, exactly as `pyvmm bench` orders them."""
    recipes = cell_recipes(cfg)
    warm = warmup_cell(cfg)
    lines = [f"{plan_label(None, *warm)} {recipes[warm].text}"] * cfg.warmup
    for seq, (rname, n, _driver) in enumerate(boot_order(cfg)):
        lines.append(f"{plan_label(seq, rname, n)} {recipes[(rname, n)].text}")
    return lines


@dataclass
class LabRun:
    doc: dict
    out_dir: str
    timings: dict = field(default_factory=dict)


def run_lab(opts: LabOptions, cfg: SweepConfig, ui: Ui | None = None) -> LabRun:
    ui = ui or Ui()
    t_start = time.monotonic()
    prep = prepare(opts, ui)            # checks the options first, before any download
    kit, built, kc, timings = prep.kit, prep.built, prep.kernel_check, prep.timings
    t = time.monotonic()
    plan = make_plan(cfg)
    image = initramfs.build(prep.busybox, prep.helper, prep.modules, "\n".join(plan) + "\n",
                            timeout_ms=HELPER_TIMEOUT_MS, ioev_len=cfg.ioev_len,
                            module_args=module_args(kit, opts.kvm_args),
                            data_tty=kit.arch.data_tty)
    timings["build_s"] = time.monotonic() - t

    outer = hostinfo.collect(with_kvm=False)
    host = inner_host(kit, {}, opts.smp, outer)
    out = new_run_dir(opts.out, host)
    work = os.path.join(out, "lab")
    os.makedirs(work)
    initrd = os.path.join(work, "initramfs.cpio.gz")
    with open(initrd, "wb") as f:
        f.write(image)
    with open(os.path.join(work, "plan.txt"), "w") as f:
        f.write("\n".join(plan) + "\n")
    doc = new_doc(cfg, host, ENVIRONMENT, None)
    doc["kernel_check"] = kc
    qcfg = qemu.QemuConfig(kernel=kit.vmlinuz, initrd=initrd, smp=opts.smp, mem_mb=opts.mem_mb,
                           boot_timeout_s=opts.boot_timeout_s,
                           stall_timeout_s=opts.stall_timeout_s,
                           total_timeout_s=opts.total_timeout_s,
                           extra_args=kernel_cmdline(opts, kit), arch=kit.arch)
    doc["lab"] = {"kernel_spec": opts.kernel, "variant": opts.variant.label,
                  "kvm_args": dict(opts.kvm_args), "cmdline": opts.cmdline,
                  "kvm_patch": None if built is None else dict(built.meta),
                  "kernel_build": build_meta(prep),
                  "package": host["package"], "smp": opts.smp,
                  "qemu": qemu.qemu_version(kit.arch.qemu),
                  "command": qemu.command(qcfg, "console.log", "data.log"),
                  "plan_boots": len(plan), "warmup": cfg.warmup, "attempts": [],
                  "timings": timings}
    path = os.path.join(out, "run.json")
    total = len(plan) - cfg.warmup
    save = Saver(path, doc)

    save(force=True)
    attempt = 0
    with finishing(doc, lambda: save(force=True), timings, t_start):
        while True:
            attempt += 1
            doc["samples"], doc["failures"] = [], []
            done = [0]

            def on_boot(line):
                sample = boot_to_sample(line)
                done[0] += 1
                ui.boot(done[0], len(plan), line["label"])
                if sample is None:
                    return
                doc["samples"].append(sample)
                if not sample["result"]["ok"]:
                    doc["failures"].append({"recipe": sample["recipe"], "n": sample["n"],
                                            "driver": "c", "seq": sample["seq"],
                                            "error": sample["result"]["error"]})
                save()

            def on_stage(name):
                ui.stage("boot kernel" if name == "kernel" else "sweep",
                         len(plan) if name == "sweep" else None)
            t = time.monotonic()
            try:
                stream, qemu_s = qemu.run(qcfg, work, on_boot, on_stage)
            except LabHang as hang:
                first = str(hang).splitlines()[0]
                doc["lab"]["attempts"].append({"attempt": attempt, "ok": False,
                                               "error": str(hang),
                                               "boots": len(hang.stream.boots),
                                               "wall_s": time.monotonic() - t})
                if attempt <= opts.retries:
                    ui.log(f"[attempt {attempt}] {first}; retrying "
                           f"(attempt {attempt + 1} of {opts.retries + 1})")
                    save(force=True)
                    continue
                raise
            doc["lab"]["attempts"].append({"attempt": attempt, "ok": True,
                                           "boots": len(stream.boots), "wall_s": qemu_s})
            break
        timings["qemu_s"] = qemu_s
        doc["host"] = inner_host(kit, stream.facts, opts.smp, outer)
        doc["clock"] = stream.clock
        doc["lab"]["errors"] = stream.errors
        doc["lab"]["garbage_lines"] = len(stream.garbage)
        got = len(doc["samples"])
        if got != total or stream.rc not in (0, 1):
            doc["status"] = "failed"
            errs = stream.errors[-12:]
            raise LabError(f"the lab recorded {got} of {total} boots (exit status {stream.rc}); "
                           f"logs in {work}; errors:\n  " + ("\n  ".join(errs) or "none"))
        doc["status"] = "complete"
        a = report.analyze(doc)
        kc.update(stats.kernel_check_agreement(kc, a["verdict"].behaviour,
                                               a["verdict"].stall_ns))
    return LabRun(doc, out, timings)
