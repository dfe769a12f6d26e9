"""The registration-count sweep: many tiny boots, interleaved, written as they happen.

run.json is rewritten atomically (temp file + rename) every couple of seconds and at
the end, so Ctrl-C or a crash leaves a valid file holding every sample taken so far.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import time
from dataclasses import dataclass, field

from .. import hostinfo
from ..errors import PyvmmError
from ..results import Saver, envelope, finishing
from ..vm import check_nofile
from .. import recipe as rmod
from . import native
from .stats import interleaved_order

SCHEMA = "pyvmm.run/1"
DEFAULT_NS = (0, 1, 10, 100, 300, 1000)
DEFAULT_RECIPES = ("before-vcpu", "during-boot")
CONTROL_N = 32


@dataclass
class SweepConfig:
    ns: tuple[int, ...] = DEFAULT_NS
    recipes: tuple[str, ...] = DEFAULT_RECIPES
    repeats: int = 30
    warmup: int = 5
    seed: int | None = None
    ioev_len: int = 4
    pin_cpu: int | None = None
    control_n: int = CONTROL_N
    timeout_ms: int = 10000
    drivers: tuple[str, ...] = ("c",)
    templates: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.repeats < 1:
            raise PyvmmError("--repeats must be at least 1")
        if not self.ns:
            raise PyvmmError("the sweep needs at least one N")
        if any(n < 0 for n in self.ns):
            raise PyvmmError(f"N values must be >= 0, got {list(self.ns)}")
        if self.seed is None:
            self.seed = int(time.time()) & 0xFFFFFFFF
        for name in self.recipes:
            tmpl = rmod.PRESETS.get(name, name)
            self.templates[name] = tmpl
            for n in self.ns:
                rmod.parse(tmpl, n)     # validate every cell before the first boot
        if self.control_n:
            rmod.parse("control", self.control_n)
            self.templates["control"] = rmod.PRESETS["control"]

    def to_dict(self) -> dict:
        return {"ns": list(self.ns), "recipes": {k: v for k, v in self.templates.items()},
                "repeats": self.repeats, "warmup": self.warmup, "seed": self.seed,
                "ioev_len": self.ioev_len, "pin_cpu": self.pin_cpu,
                "control_n": self.control_n, "timeout_ms": self.timeout_ms,
                "drivers": list(self.drivers)}


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def new_run_dir(base: str, host: dict) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(base, safe_name(f"{host['hostname']}-{host['kernel']}-{stamp}"))
    n = 1
    final = path
    while os.path.exists(final):
        n += 1
        final = f"{path}-{n}"
    os.makedirs(final)
    return final


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def load_run(path: str) -> dict:
    """Load a run.json (or the run.json inside a directory), checking it against the
    schema (runschema.RUN): any problem is one PyvmmError naming the file and the field."""
    if os.path.isdir(path):
        path = os.path.join(path, "run.json")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise PyvmmError(f"{path} does not exist: give a results directory or its run.json") \
            from None
    except OSError as e:
        raise PyvmmError(f"{path} cannot be read: {e.strerror}") from None
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise PyvmmError(f"{path} is not UTF-8 text (byte {e.start}): is it a run.json?") \
            from None
    except (ValueError, RecursionError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PyvmmError(f"{path} is not valid JSON ({msg})") from None
    if not isinstance(doc, dict):
        raise PyvmmError(f"{path} holds a JSON {type(doc).__name__}, not a run.json object")
    if doc.get("schema") != SCHEMA:
        raise PyvmmError(f"{path} has schema {str(doc.get('schema'))[:60]!r}, expected "
                         f"{SCHEMA!r}")
    from .runschema import first_error
    problem = first_error(doc)
    if problem:
        raise PyvmmError(f"{path} is not a valid run.json: {problem}")
    return doc


def sweep_cells(cfg: SweepConfig) -> list[tuple[str, int, str]]:
    """Every (recipe, N, driver) cell of a sweep, the control recipe included."""
    cells = [(r, n, d) for r in cfg.recipes for n in cfg.ns for d in cfg.drivers]
    if cfg.control_n:
        cells += [("control", cfg.control_n, d) for d in cfg.drivers]
    return cells


def new_doc(cfg: SweepConfig, host: dict, environment: str, clock: dict | None) -> dict:
    """An empty run.json document (status 'running'); samples are appended to it."""
    return envelope(SCHEMA, host, status="running", finished=None,
                    environment=environment, config=cfg.to_dict(), clock=clock,
                    kernel_check=None, failures=[], samples=[])


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
        py_boot = None
        if "py" in cfg.drivers:
            from .. import runner as pyrunner
            py_boot = pyrunner
        parsed = {}
        for r in set(c[0] for c in self.cells()):
            for n in set(c[1] for c in self.cells() if c[0] == r):
                parsed[(r, n)] = rmod.parse(self.cfg.templates[r], n)
        order = interleaved_order(self.cells(), cfg.repeats, cfg.seed)
        # Warm-up boots (discarded): page in the helper, KVM's caches, the guest image.
        warm = parsed[(cfg.recipes[0], cfg.ns[min(1, len(cfg.ns) - 1)])]
        for _ in range(cfg.warmup):
            runner.run(warm)
            if py_boot:
                _py_run(py_boot, warm, cfg)
        total = len(order)
        self.save(force=True)
        with finishing(self.doc, lambda: self.save(force=True)):
            for seq, (rname, n, driver) in enumerate(order):
                rec = parsed[(rname, n)]
                if driver == "c":
                    res = runner.run(rec)
                else:
                    res = _py_run(py_boot, rec, cfg)
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
