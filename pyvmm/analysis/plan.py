"""The sweep's plan, shared by the bench (boots on this host) and the lab (the same
plan inside a lab kernel): its configuration, its cells, the seeded interleaved order
and the warm-up cell, the results directory, and loading a run.json back (checked against
runschema). new_doc() is the empty run.json a sweep fills."""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field

from .. import recipe as rmod
from ..errors import PyvmmError
from ..results import envelope

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
            # a named template given by the caller (e.g. the lab's vcpus experiment), a
            # preset, or the recipe text itself
            tmpl = self.templates.get(name) or rmod.PRESETS.get(name, name)
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


def new_doc(cfg, host: dict, environment: str, clock: dict | None) -> dict:
    """An empty run.json document for a sweep of `cfg` (a SweepConfig), status
    'running'; the bench and the lab append samples to it."""
    return envelope(SCHEMA, host, status="running", finished=None,
                    environment=environment, config=cfg.to_dict(), clock=clock,
                    kernel_check=None, failures=[], samples=[])


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
    # where it was read from and when it was last written (results.run_state)
    doc["_source"] = {"path": os.path.abspath(path), "mtime": os.path.getmtime(path)}
    return doc


def sweep_cells(cfg: SweepConfig) -> list[tuple[str, int, str]]:
    """Every (recipe, N, driver) cell of a sweep, the control recipe included."""
    cells = [(r, n, d) for r in cfg.recipes for n in cfg.ns for d in cfg.drivers]
    if cfg.control_n:
        cells += [("control", cfg.control_n, d) for d in cfg.drivers]
    return cells


def interleaved_order(cells, repeats: int, seed: int) -> list:
    """Every cell `repeats` times, shuffled in rounds so drift cannot favour one cell:
    each round holds every cell once, in a fresh random order."""
    rng = random.Random(seed)
    order = []
    for _ in range(repeats):
        rnd = list(cells)
        rng.shuffle(rnd)
        order.extend(rnd)
    return order


def boot_order(cfg: SweepConfig) -> list[tuple[str, int, str]]:
    """Every boot of the sweep, in the order both the bench and the lab run them."""
    return interleaved_order(sweep_cells(cfg), cfg.repeats, cfg.seed)


def warmup_cell(cfg: SweepConfig) -> tuple[str, int]:
    """The cell the discarded warm-up boots use: the first recipe at the second N (the
    only N when there is one)."""
    return cfg.recipes[0], cfg.ns[min(1, len(cfg.ns) - 1)]


def cell_recipes(cfg: SweepConfig) -> dict[tuple[str, int], "rmod.Recipe"]:
    """The parsed recipe of every (recipe, N) cell of the sweep."""
    return {(r, n): rmod.parse(cfg.templates[r], n)
            for r, n, _ in sweep_cells(cfg)}
