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

from ...analysis import findings, stats
from ...analysis.plan import SweepConfig, boot_order, cell_recipes, warmup_cell
from ...errors import LabError, LabHang
from ...analysis.plan import new_doc
from ..boot import initramfs, qemu
from ..boot.serial import boot_to_sample, plan_label
from .labrun import ENVIRONMENT, Finished, LabRun
from .options import LabOptions, Ui, module_args
from .ready import ReadyKernel

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


class SweepRun(LabRun):
    """The sweep's plan in a lab kernel, every boot a sample of a run.json."""

    def __init__(self, opts: LabOptions, cfg: SweepConfig, ui: Ui | None = None):
        super().__init__(opts, ui)
        self.cfg = cfg
        self.plan = make_plan(cfg)
        self.done = 0

    def image(self, ready: ReadyKernel) -> bytes:
        return initramfs.build(ready.busybox, ready.helper, ready.modules,
                               "\n".join(self.plan) + "\n", timeout_ms=HELPER_TIMEOUT_MS,
                               ioev_len=self.cfg.ioev_len,
                               module_args=module_args(ready.kit, self.opts.kvm_args),
                               data_tty=ready.kit.arch.data_tty)

    def new_doc(self, host: dict) -> dict:
        with open(os.path.join(self.work, "plan.txt"), "w") as f:
            f.write("\n".join(self.plan) + "\n")
        doc = new_doc(self.cfg, host, ENVIRONMENT, None)
        doc["lab"] = {"plan_boots": len(self.plan), "warmup": self.cfg.warmup, "attempts": []}
        return doc

    def on_line(self, line: dict) -> None:
        doc = self.doc
        sample = boot_to_sample(line)
        self.done += 1
        self.ui.boot(self.done, len(self.plan), line["label"])
        if sample is None:
            return
        doc["samples"].append(sample)
        if not sample["result"]["ok"]:
            doc["failures"].append({"recipe": sample["recipe"], "n": sample["n"],
                                    "driver": "c", "seq": sample["seq"],
                                    "error": sample["result"]["error"]})
        self.save()

    def on_stage(self, name: str) -> None:
        self.ui.stage("boot kernel" if name == "kernel" else "sweep",
                      len(self.plan) if name == "sweep" else None)

    def boot(self, qcfg: qemu.QemuConfig) -> tuple:
        """QEMU, again after a hang up to opts.retries times (each attempt recorded)."""
        doc, attempt = self.doc, 0
        while True:
            attempt += 1
            doc["samples"], doc["failures"], self.done = [], [], 0
            t = time.monotonic()
            try:
                stream, qemu_s = qemu.run(qcfg, self.work, self.on_line, self.on_stage)
            except LabHang as hang:
                first = str(hang).splitlines()[0]
                doc["lab"]["attempts"].append({"attempt": attempt, "ok": False,
                                               "error": str(hang),
                                               "boots": len(hang.stream.boots),
                                               "wall_s": time.monotonic() - t})
                if attempt <= self.opts.retries:
                    self.ui.log(f"[attempt {attempt}] {first}; retrying "
                                f"(attempt {attempt + 1} of {self.opts.retries + 1})")
                    self.save(force=True)
                    continue
                raise
            doc["lab"]["attempts"].append({"attempt": attempt, "ok": True,
                                           "boots": len(stream.boots), "wall_s": qemu_s})
            return stream, qemu_s

    def finish(self, stream) -> None:
        doc = self.doc
        doc["clock"] = stream.clock
        doc["lab"]["errors"] = stream.errors
        doc["lab"]["garbage_lines"] = len(stream.garbage)
        got, total = len(doc["samples"]), len(self.plan) - self.cfg.warmup
        if got != total or stream.rc not in (0, 1):
            doc["status"] = "failed"
            errs = stream.errors[-12:]
            raise LabError(f"the lab recorded {got} of {total} boots (exit status {stream.rc}); "
                           f"logs in {self.work}; errors:\n  " + ("\n  ".join(errs) or "none"))
        doc["status"] = "complete"
        a = findings.analyze(doc)
        kc = doc["kernel_check"]
        kc.update(stats.kernel_check_agreement(kc, a["verdict"].behaviour,
                                               a["verdict"].stall_ns,
                                               a["verdict"].first_deassign_excess_ns))
        doc["analysis"] = findings.findings(doc, a)


def run_lab(opts: LabOptions, cfg: SweepConfig, ui: Ui | None = None) -> Finished:
    """The sweep in the variant's lab kernel."""
    return SweepRun(opts, cfg, ui).run()
