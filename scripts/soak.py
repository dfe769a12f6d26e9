"""Soak benchmark (not a test): many boots in one process, checking that nothing leaks.

    .venv/bin/python scripts/soak.py [--boots 10000] [--recipe RECIPE] [--out DIR]

Boots alternate between the Python VMM (pyvmm.drivers.runner) and the C helper
in-process (pyvmm.drivers.native), each on the same recipe (default: 10 ioeventfds,
one vCPU, run to HLT, a memslot change). Every --every boots it records this process's
open fds, RSS and threads; at the end it prints the first and last of those, the
failures (with the first errors) and the boot medians of the first and last tenth,
and writes the whole series as JSON. A leak shows as fds or RSS that keep growing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from pyvmm import recipe as rmod
from pyvmm.drivers import runner as pyrunner
from pyvmm.drivers import native
from pyvmm.latency import median
from pyvmm.results import envelope, write_json_atomic
from pyvmm.hostinfo import collect, process_facts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--boots", type=int, default=10000)
    ap.add_argument("--recipe", default="vm,mem,ioev:10,vcpu:1,run:rung,memslot,run")
    ap.add_argument("--every", type=int, default=500)
    ap.add_argument("--out", default="results")
    args = ap.parse_args()
    if args.boots < 2:
        print("soak: --boots must be at least 2", file=sys.stderr)
        return 2
    rec = rmod.parse(args.recipe)
    c = native.NativeRunner()
    series, failures, walls = [], [], {"py": [], "c": []}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json")
    doc = envelope("pyvmm.soak/1", collect(with_kvm=False), status="running",
                   recipe=rec.text, boots=args.boots, series=series, failures=failures)
    t0 = time.monotonic()
    series.append({"boot": 0, "t_s": 0.0, **process_facts()})
    try:
        for i in range(1, args.boots + 1):
            driver = "py" if i % 2 else "c"
            try:
                res = pyrunner.boot(rec) if driver == "py" else c.run(rec)
                ok = res.get("ok", True)
                if ok:
                    walls[driver].append(res["boot_wall_ns"])
                else:
                    failures.append({"boot": i, "driver": driver, "error": res.get("error")})
            except Exception as e:          # counted and reported, the soak goes on
                failures.append({"boot": i, "driver": driver, "error": f"{type(e).__name__}: {e}"})
            if i % args.every == 0 or i == args.boots:
                series.append({"boot": i, "t_s": round(time.monotonic() - t0, 1),
                               **process_facts()})
                last = series[-1]
                print(f"{i:>6} boots  {last['t_s']:>7.1f} s  fds {last['open_fds']:>4}  "
                      f"RSS {last['rss_kib'] / 1024:6.1f} MiB  threads {last['threads']}  "
                      f"failures {len(failures)}", flush=True)
                write_json_atomic(path, doc)
        doc["status"] = "complete"
    except KeyboardInterrupt:
        doc["status"] = "interrupted"
    finally:
        doc["elapsed_s"] = round(time.monotonic() - t0, 1)
        tenth = {d: max(1, len(w) // 10) for d, w in walls.items()}
        doc["boot_median_ms"] = {d: {"first_tenth": median(w[:tenth[d]]) / 1e6,
                                     "last_tenth": median(w[-tenth[d]:]) / 1e6}
                                 for d, w in walls.items() if w}
        write_json_atomic(path, doc)
    a, b = series[0], series[-1]
    print(f"soak: {series[-1]['boot']} boots in {doc['elapsed_s']} s, {len(failures)} failures; "
          f"open fds {a['open_fds']} -> {b['open_fds']}, RSS {a['rss_kib'] / 1024:.1f} -> "
          f"{b['rss_kib'] / 1024:.1f} MiB, threads {a['threads']} -> {b['threads']}; "
          f"boot median first/last tenth: " + ", ".join(
              f"{d} {v['first_tenth']:.3f}/{v['last_tenth']:.3f} ms"
              for d, v in doc["boot_median_ms"].items()))
    for f in failures[:5]:
        print(f"  boot {f['boot']} ({f['driver']}): {f['error']}")
    print(f"series in {path}")
    return 0 if not failures and doc["status"] == "complete" else 1


if __name__ == "__main__":
    sys.exit(main())
