"""Run recipes through the C helper in-process (pyvmm._native)."""

from __future__ import annotations

from ..vmm import guests
from ..recipe import OPS, Recipe, native_module

SAMPLE_CAP = 1 << 20


class NativeRunner:
    """Holds the cffi buffers so repeated boots allocate nothing."""

    def __init__(self, ioev_len: int = 4, pin_cpu: int | None = None, timeout_ms: int = 10000):
        nat = native_module()
        self.ffi, self.lib = nat.ffi, nat.lib
        self._guest = self.ffi.from_buffer(guests.load("doorbell"))
        self.opt = self.ffi.new("struct bb_options *")
        self.opt.ioev_len = ioev_len
        self.opt.pin_cpu = -1 if pin_cpu is None else pin_cpu
        self.opt.timeout_ms = timeout_ms
        self.opt.guest = self.ffi.cast("const uint8_t *", self._guest)
        self.opt.guest_len = len(self._guest)
        self.res = self.ffi.new("struct bb_result *")
        self.samples = self.ffi.new("struct bb_sample[]", SAMPLE_CAP)
        self._recipes: dict[str, object] = {}

    def _c_recipe(self, recipe: Recipe):
        c = self._recipes.get(recipe.text)
        if c is None:
            c = self.ffi.new("struct bb_recipe *")
            err = self.ffi.new("char[]", self.lib.BB_ERR_LEN)
            if self.lib.bb_parse_recipe(recipe.text.encode(), c, err, self.lib.BB_ERR_LEN):
                raise ValueError(self.ffi.string(err).decode())
            self._recipes[recipe.text] = c
        return c

    def run(self, recipe: Recipe) -> dict:
        self.lib.bb_run(self._c_recipe(recipe), self.opt, self.res, self.samples, SAMPLE_CAP)
        return result_dict(self.ffi, self.res, self.samples)


def result_dict(ffi, r, samples) -> dict:
    """Convert a struct bb_result to the dict shape shared with the Python runner."""
    phases = []
    for i in range(r.nphases):
        p = r.phases[i]
        ph = {
            "op": OPS.get(p.op, "?"), "count": p.count, "target": p.target,
            "end_marker": p.end_marker, "wall_ns": p.wall_ns, "cpu_ns": p.cpu_ns,
            "samples": [samples[p.sample_start + k].wall_ns for k in range(p.nsamples)],
        }
        if p.batch_ops:
            ph["batch_ns"], ph["batch_ops"] = p.batch_ns, p.batch_ops
        phases.append(ph)
    return {
        "ok": bool(r.ok), "error": ffi.string(r.err).decode(errors="replace"),
        "errno": r.err_errno, "failed_step": r.failed_step,
        "boot_wall_ns": r.boot_wall_ns, "boot_cpu_ns": r.boot_cpu_ns, "phases": phases,
        "events": [[r.events[i].marker, r.events[i].t_ns] for i in range(r.nevents)],
        "doorbells_expected": r.doorbells_expected,
        "doorbells_completed": r.doorbells_completed,
        "doorbell_mmio_exits": r.doorbell_mmio_exits,
        "other_mmio_exits": r.other_mmio_exits, "io_exits": r.io_exits, "exits": r.exits,
        "bar_value": r.bar_value, "halted": bool(r.halted), "cpu_start": r.cpu_start,
        "cpu_end": r.cpu_end, "pinned_cpu": r.pinned_cpu, "samples_dropped": r.samples_dropped,
    }


def clock_cost(iters: int = 200000) -> dict:
    """Cost of one clock read in the helper: CLOCK_MONOTONIC and CLOCK_THREAD_CPUTIME_ID."""
    nat = native_module()
    w = nat.ffi.new("double *")
    c = nat.ffi.new("double *")
    nat.lib.bb_clock_cost(iters, w, c)
    return {"wall_read_ns": w[0], "cpu_read_ns": c[0]}
