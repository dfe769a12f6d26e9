"""The registration-count sweep on this host: many tiny boots, interleaved, written as
they happen.

run.json is rewritten atomically (temp file + rename) every couple of seconds and at
the end, so Ctrl-C or a crash leaves a valid file holding every sample taken so far.
The plan (cells, order, warm-up) is the one the lab runs too (pyvmm.analysis.plan).
"""

from __future__ import annotations

import os

from .. import hostinfo
from ..analysis.plan import SweepConfig, boot_order, cell_recipes, sweep_cells, warmup_cell
from ..errors import PyvmmError
from ..analysis.plan import new_doc
from ..results import Saver, finishing
from ..vmm.vm import check_nofile
from ..drivers import native


class Sweep:
    """Runs the sweep and owns run.json. `progress(done, total, cell)` is called per boot."""

    def __init__(self, cfg: SweepConfig, out_dir: str, host: dict | None = None,
                 environment: str = "host"):
        self.cfg = cfg
        self.host = host or hostinfo.collect()
        self.dir = out_dir
        self.path = os.path.join(out_dir, "run.json")
        self.doc = new_doc(cfg, self.host, environment, native.clock_cost())
        self._saver = Saver(self.path, self.doc)

    def cells(self) -> list[tuple[str, int, str]]:
        return sweep_cells(self.cfg)

    def save(self, force: bool = False) -> None:
        self._saver(force)

    def run(self, progress=None) -> dict:
        cfg = self.cfg
        check_nofile(max(cfg.ns + (cfg.control_n,)) + 64, f"a sweep up to N={max(cfg.ns)}")
        runner = native.NativeRunner(cfg.ioev_len, cfg.pin_cpu, cfg.timeout_ms)
        boots = {"c": runner.run}
        if "py" in cfg.drivers:
            from ..drivers import runner as pyrunner
            boots["py"] = lambda rec: _py_run(pyrunner, rec, cfg)
        if "floor" in cfg.drivers:
            boots["floor"] = _floor_driver(cfg)
        parsed = cell_recipes(cfg)
        order = boot_order(cfg)
        # Warm-up boots (discarded): page in the helper, KVM's caches, the guest image.
        warm = parsed[warmup_cell(cfg)]
        for _ in range(cfg.warmup):
            for boot in boots.values():
                boot(warm)
        total = len(order)
        self.save(force=True)
        with finishing(self.doc, lambda: self.save(force=True)):
            for seq, (rname, n, driver) in enumerate(order):
                res = boots[driver](parsed[(rname, n)])
                self.doc["samples"].append({"recipe": rname, "n": n, "driver": driver,
                                            "seq": seq, "result": res})
                if not res["ok"]:
                    self.doc["failures"].append({"recipe": rname, "n": n, "driver": driver,
                                                 "seq": seq, "error": res["error"]})
                    if len(self.doc["failures"]) >= 3:
                        raise PyvmmError(
                            f"boots keep failing ({len(self.doc['failures'])} so far); last: "
                            f"{rname} N={n}: {res['error']}")
                if progress:
                    progress(seq + 1, total, (rname, n, driver))
                self.save()
            self.doc["status"] = "complete"
        return self.doc


def _py_run(pyrunner, rec, cfg) -> dict:
    b = pyrunner.PyBoot(rec, ioev_len=cfg.ioev_len, timeout=cfg.timeout_ms / 1000 or None,
                        pin_cpu=cfg.pin_cpu)
    try:
        return b.run()
    except PyvmmError:
        b.res["ok"] = False
        return b.res


def _floor_driver(cfg):
    """The floor (pyvmm.drivers.floor) as a driver, pinned like the others when asked."""
    from ..drivers import floor
    boot = floor.make(cfg.ioev_len, cfg.timeout_ms / 1000 or None)
    if cfg.pin_cpu is None:
        return boot

    def pinned(rec):
        old = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {cfg.pin_cpu})
        try:
            res = boot(rec)
        finally:
            os.sched_setaffinity(0, old)
        res["pinned_cpu"] = cfg.pin_cpu
        return res
    return pinned
