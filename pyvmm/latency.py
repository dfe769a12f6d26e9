"""Percentiles and latency summaries, shared by the bench, the checks, stress and the
lab: pure Python (no numpy), so the VMM and the lab's inner runner need nothing more.
Latencies keeps an operation's latencies in bounded memory."""

from __future__ import annotations

import math
import random

def _sorted_floats(values) -> list[float]:
    return sorted(float(v) for v in values)


def _pct_sorted(xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default method)."""
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def percentile(values, q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty sequence. Pure Python,
    so that the VMM, stress and the lab's inner runner need no numpy."""
    if len(values) == 0:
        raise ValueError("percentile of an empty sequence")
    return _pct_sorted(_sorted_floats(values), q)


def median(values) -> float:
    return percentile(values, 50)


def latency_summary(samples, count: int | None = None, max_ns: float | None = None) -> dict:
    """The one summary of operation latencies (ns) that stress, the checks and the Xen
    seed report: count, p50, p90, p99 and max. `count` and `max_ns` override what the
    samples say when they are a reservoir of a longer series."""
    return {"count": len(samples) if count is None else count,
            "p50_ns": percentile(samples, 50), "p90_ns": percentile(samples, 90),
            "p99_ns": percentile(samples, 99),
            "max_ns": max(samples) if max_ns is None else max_ns}


def summarize(values) -> dict:
    """min/median/p10/p90/max/mean and count."""
    xs = _sorted_floats(values)
    if not xs:
        return {"n": 0}
    return {"n": len(xs), "min": xs[0], "p10": _pct_sorted(xs, 10),
            "median": _pct_sorted(xs, 50), "p90": _pct_sorted(xs, 90),
            "max": xs[-1], "mean": math.fsum(xs) / len(xs)}


class Latencies:
    """Latencies of one operation in bounded memory: exact count, total and maximum, and
    a uniform reservoir sample (Vitter's algorithm R) for the percentiles. An hour of
    stress runs ~90 million operations; keeping every sample took 3.4 GiB (found by the
    soak run), this keeps RESERVOIR per operation."""

    RESERVOIR = 16384

    def __init__(self, seed: str = ""):
        self.count = 0
        self.total = 0
        self.max = 0
        self.samples: list[int] = []
        self._rng = random.Random(seed)

    def append(self, ns: int) -> None:
        self.count += 1
        self.total += ns
        if ns > self.max:
            self.max = ns
        if len(self.samples) < self.RESERVOIR:
            self.samples.append(ns)
        else:
            j = self._rng.randrange(self.count)
            if j < self.RESERVOIR:
                self.samples[j] = ns

    def __len__(self) -> int:
        return self.count

    def percentile(self, q: float) -> float:
        return percentile(self.samples, q)
