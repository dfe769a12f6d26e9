"""The one loop of every multi-variant experiment (lab matrix, lab vcpus): every variant
checked and its kernel found before anything is created, one directory for the whole
experiment, one document rewritten after every variant (an interrupted experiment keeps
the variants it finished, marked as such), a failed variant said in one line and kept
while the next one runs."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from ...errors import LabError
from ...results import envelope, finishing, new_run_dir, write_json_atomic
from ..builds.variant import Variant
from .labrun import Finished
from .options import LabOptions, Ui, check_options
from .ready import check_available


@dataclass
class MultiRun:
    doc: dict
    out_dir: str
    timings: dict


def check_variants(variants: list[Variant], base: LabOptions, ui: Ui) -> None:
    """Everything about a multi-variant experiment that can fail before it starts."""
    for v in variants:
        check_options(base.for_variant(v))
    check_available(variants, ui)


def run_each(variants: list[Variant], base: LabOptions, ui: Ui, prefix: str, schema: str,
             run_one, row_of, out_dir: str | None = None, rows_key: str = "rows",
             **payload) -> MultiRun:
    """For every variant, `run_one(opts)` (a lab run: Finished) then `row_of(variant,
    finished)` (a row for the document's `rows_key`; a LabError there fails the variant
    alone). `payload` goes into the document's head."""
    check_variants(variants, base, ui)
    out_dir = out_dir or new_run_dir(base.out, prefix)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{prefix}.json")
    doc = envelope(schema, None, status="running", finished=None,
                   variants=[v.label for v in variants], **payload, failed=[], timings={})
    doc[rows_key] = []

    def save():
        write_json_atomic(path, doc)
    save()
    with finishing(doc, save, doc["timings"], time.monotonic()):
        for i, v in enumerate(variants):
            ui.log(f"[{i + 1}/{len(variants)}] variant {v.label}")
            tv = time.monotonic()
            try:
                run: Finished = run_one(base.for_variant(v, out=out_dir))
                row = row_of(v, run)
            except LabError as e:
                doc["failed"].append({"variant": v.label, "error": str(e)})
                ui.log(f"variant {v.label} failed: {str(e).splitlines()[0]}")
                save()
                continue
            row["wall_s"] = round(time.monotonic() - tv, 1)
            row["timings"] = {k: (round(x, 1) if isinstance(x, float) else x)
                              for k, x in run.timings.items()}
            doc[rows_key].append(row)
            save()
        doc["status"] = "complete" if not doc["failed"] else "failed"
    return MultiRun(doc, out_dir, doc["timings"])
