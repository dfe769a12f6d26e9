"""Benchmark (not a test): the floor (pyvmm.drivers.floor, the least Python a boot recipe can
run) against the C helper, interleaved in one process, boot total and per phase.

    .venv/bin/python scripts/python-floor.py [--recipe during-boot] [--n 0] [--boots 300]

`pyvmm bench --python-vs-c` runs the same floor beside the C helper and the Python VMM
in one interleaved sweep; this is the floor alone, for a quick look at what any Python
VMM pays on this host (see docs/methodology.md, "Python VMM vs C helper").
"""

from __future__ import annotations

import argparse
import statistics
import sys

from pyvmm.drivers import floor
from pyvmm import recipe
from pyvmm.drivers.native import NativeRunner


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="during-boot")
    ap.add_argument("--n", type=int, default=0)
    ap.add_argument("--boots", type=int, default=300)
    args = ap.parse_args()
    rec = recipe.parse(recipe.PRESETS.get(args.recipe, args.recipe), args.n)
    boot, native = floor.make(), NativeRunner()
    for _ in range(20):                 # warm-up, discarded
        boot(rec)
        native.run(rec)
    fl, c = [], []
    for _ in range(args.boots):
        fl.append(boot(rec))
        c.append(native.run(rec))
    bad = [r["error"] for r in fl + c if not r["ok"]]
    if bad:
        print(f"{len(bad)} boots failed; first: {bad[0]}", file=sys.stderr)
        return 1
    print(f"{rec.text}, medians of {args.boots} interleaved boots (us): phase, C, floor, "
          "floor / C")
    for i, ph in enumerate(c[0]["phases"]):
        label = ph["op"] if ph["op"] != "run" else f"run->{ph['end_marker']}"
        mc = statistics.median(r["phases"][i]["wall_ns"] for r in c)
        mf = statistics.median(r["phases"][i]["wall_ns"] for r in fl)
        print(f"  {label:10s} {mc / 1e3:9.1f} {mf / 1e3:9.1f} {mf / mc:6.2f}x")
    mc = statistics.median(r["boot_wall_ns"] for r in c)
    mf = statistics.median(r["boot_wall_ns"] for r in fl)
    print(f"  {'boot':10s} {mc / 1e3:9.1f} {mf / 1e3:9.1f} {mf / mc:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
