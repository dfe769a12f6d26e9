"""The JSON Schema of run.json: what `pyvmm report`, `compare` and the lab rely on.

load_run() checks every file against it, so a run.json that was cut short, edited by
hand or written by something else fails with one line naming the field, instead of a
traceback somewhere in the report. Only what the readers use is required; extra keys
are allowed (later versions add some).
"""

from __future__ import annotations

_COUNT = {"type": "integer", "minimum": 0}
_NS = {"type": "number", "minimum": 0}

PHASE = {
    "type": "object",
    "required": ["op", "wall_ns", "samples"],
    "properties": {
        "op": {"type": "string"},
        "count": _COUNT,
        "wall_ns": _NS,
        "cpu_ns": _NS,
        "samples": {"type": "array", "items": _NS},
        "batch_ns": _NS,
        "batch_ops": _COUNT,
    },
}

RESULT = {
    "type": "object",
    "required": ["ok"],
    "properties": {
        "ok": {"type": "boolean"},
        "error": {"type": "string"},
        "boot_wall_ns": _NS,
        "boot_cpu_ns": _NS,
        "phases": {"type": "array", "items": PHASE},
        "doorbells_completed": _COUNT,
        "doorbells_expected": _COUNT,
        "doorbell_mmio_exits": _COUNT,
        "cpu_start": {"type": "integer"},
        "cpu_end": {"type": "integer"},
    },
    # A successful boot carries everything the report reads.
    "if": {"properties": {"ok": {"const": True}}},
    "then": {"required": ["boot_wall_ns", "boot_cpu_ns", "phases", "doorbells_completed",
                          "doorbells_expected", "doorbell_mmio_exits", "cpu_start",
                          "cpu_end"]},
}

SAMPLE = {
    "type": "object",
    "required": ["recipe", "n", "result"],
    "properties": {
        "recipe": {"type": "string"},
        "n": _COUNT,
        "driver": {"enum": ["c", "py", "floor"]},
        "seq": {"type": ["integer", "null"]},
        "result": RESULT,
    },
}

RUN = {
    "type": "object",
    "required": ["schema", "status", "host", "config", "samples"],
    "properties": {
        "schema": {"type": "string"},
        "status": {"enum": ["running", "complete", "interrupted", "failed"]},
        "environment": {"type": "string"},
        "host": {
            "type": "object",
            "required": ["hostname", "kernel", "preemption", "backend"],
            "properties": {
                "hostname": {"type": "string"},
                "kernel": {"type": "string"},
                "config_hz": {"type": ["integer", "null"], "minimum": 1},
                "preemption": {"type": ["string", "null"]},
                "backend": {"type": ["string", "null"]},
            },
        },
        "config": {
            "type": "object",
            "required": ["recipes"],
            "properties": {
                "ns": {"type": "array", "items": _COUNT},
                "recipes": {"type": "object", "additionalProperties": {"type": "string"}},
                "repeats": {"type": "integer", "minimum": 1},
                "seed": {"type": ["integer", "null"]},
            },
        },
        "clock": {
            "type": ["object", "null"],
            "required": ["wall_read_ns", "cpu_read_ns"],
            "properties": {"wall_read_ns": _NS, "cpu_read_ns": _NS},
        },
        "kernel_check": {"type": ["object", "null"],
                         "properties": {"summary": {"type": "string"},
                                        "behaviour": {"type": "string"},
                                        "path": {"type": "string"}}},
        "failures": {"type": "array", "items": {
            "type": "object", "required": ["error"],
            "properties": {"error": {"type": "string"}}}},
        "samples": {"type": "array", "items": SAMPLE},
    },
}


def first_error(doc) -> str | None:
    """A one-line description of the first place where `doc` breaks the schema."""
    import jsonschema
    err = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(RUN).iter_errors(doc))
    if err is None:
        return None
    where = "/".join(str(p) for p in err.absolute_path) or "the top level"
    msg = " ".join(err.message.split())
    if len(msg) > 160:
        msg = msg[:157] + "..."
    return f"{msg} (at {where})"
