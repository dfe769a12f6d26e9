"""Benchmark (not a test): a whole `pyvmm boot --guest hello` process against a whole
QEMU microvm process booting to the same kind of halt, A/B/A/B.

    .venv/bin/python scripts/bench-vs-qemu.py [--pairs 15] [--json FILE]

QEMU runs `-M microvm -accel kvm` with a 64 KiB firmware image made here: at the reset
vector it writes 0 to an isa-debug-exit port and halts, so QEMU exits as soon as the
guest's first instructions have run (exit status 1 = written 0). pyvmm boots its `hello`
real-mode guest to HLT. Each process's wall time, CPU time (user + system) and peak RSS
come from wait4(2), so no /usr/bin/time is needed. Prints the medians and the ratios
pyvmm / QEMU. QEMU comes from scripts/lab-tools.sh --install.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

RESET_CODE = bytes([0xB0, 0x00,        # mov al, 0
                    0xE6, 0xF4,        # out 0xf4, al   (isa-debug-exit)
                    0xF4])             # hlt


def firmware(path: str) -> None:
    img = bytearray(64 * 1024)
    img[0xFFF0:0xFFF0 + len(RESET_CODE)] = RESET_CODE
    with open(path, "wb") as f:
        f.write(img)


def measure(argv: list[str], ok: set[int]) -> dict:
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.monotonic() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode not in ok:
        raise SystemExit(f"{' '.join(argv)} exited {p.returncode}")
    return {"wall_ms": wall * 1e3, "cpu_ms": (ru.ru_utime + ru.ru_stime) * 1e3,
            "rss_mib": ru.ru_maxrss / 1024}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=15)
    ap.add_argument("--json", default=None, help="also write the samples here")
    args = ap.parse_args()
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        print("bench-vs-qemu: qemu-system-x86_64 not found: sh scripts/lab-tools.sh --install",
              file=sys.stderr)
        return 2
    pyvmm = os.path.join(os.path.dirname(sys.executable), "pyvmm")
    with tempfile.TemporaryDirectory() as tmp:
        fw = os.path.join(tmp, "fw.bin")
        firmware(fw)
        runs = {
            "pyvmm": ([pyvmm, "boot", "--guest", "hello"], {0}),
            "qemu": ([qemu, "-M", "microvm", "-accel", "kvm", "-bios", fw, "-m", "16",
                      "-nodefaults", "-no-user-config", "-display", "none",
                      "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"], {1}),
        }
        for name, (argv, ok) in runs.items():      # one warm-up each (page cache)
            measure(argv, ok)
        samples = {name: [] for name in runs}
        for _ in range(args.pairs):
            for name, (argv, ok) in runs.items():
                samples[name].append(measure(argv, ok))
    med = {name: {k: statistics.median(s[k] for s in xs) for k in xs[0]}
           for name, xs in samples.items()}
    print(f"{'':8} {'wall ms':>9} {'CPU ms':>9} {'peak RSS MiB':>13}   (median of {args.pairs}, "
          "A/B interleaved)")
    for name, m in med.items():
        print(f"{name:8} {m['wall_ms']:9.1f} {m['cpu_ms']:9.1f} {m['rss_mib']:13.1f}")
    r = {k: med["pyvmm"][k] / med["qemu"][k] for k in med["qemu"]}
    print(f"{'ratio':8} {r['wall_ms']:8.2f}x {r['cpu_ms']:8.2f}x {r['rss_mib']:12.2f}x   "
          "(pyvmm / QEMU)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"samples": samples, "median": med, "ratio": r}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
