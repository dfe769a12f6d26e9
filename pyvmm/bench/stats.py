"""Pure statistics for the lab: percentiles, the quadratic cost fit, the permutation
test, and the verdict. No KVM here: unit tests feed these synthetic or recorded data."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

# Verdict thresholds (justified in docs/methodology.md).
ASSIGN_OVER_EEXIST_MIN = 5.0     # pre-6.18: every assign waits for a grace period
ASSIGN_OVER_DEASSIGN_MIN = 0.5   # ... so it costs about as much as a deassign
STALL_MIN_NS = 500_000           # a post-registration memslot stall worth reporting
STALL_MIN_RATIO = 5.0


def percentile(values, q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty sequence."""
    if len(values) == 0:
        raise ValueError("percentile of an empty sequence")
    return float(np.percentile(np.asarray(values, dtype=float), q))


def median(values) -> float:
    return percentile(values, 50)


def summarize(values) -> dict:
    """min/median/p10/p90/max/mean and count."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return {"n": 0}
    return {"n": int(v.size), "min": float(v.min()), "p10": float(np.percentile(v, 10)),
            "median": float(np.median(v)), "p90": float(np.percentile(v, 90)),
            "max": float(v.max()), "mean": float(v.mean())}


@dataclass(frozen=True)
class QuadFit:
    a: float
    b: float
    c: float
    rms_residual: float
    points: int

    def __call__(self, n: float) -> float:
        return self.a + self.b * n + self.c * n * n


def fit_quadratic(xs, ys) -> QuadFit:
    """Least-squares fit of y = a + b*x + c*x^2. Needs at least 3 distinct x values."""
    x = np.asarray(xs, dtype=float)
    y = np.asarray(ys, dtype=float)
    if len(set(x.tolist())) < 3:
        raise ValueError("a quadratic fit needs at least 3 distinct x values")
    design = np.vstack([np.ones_like(x), x, x * x]).T
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - design @ coef
    return QuadFit(float(coef[0]), float(coef[1]), float(coef[2]),
                   float(math.sqrt(float(np.mean(resid ** 2)))), int(x.size))


def fit_linear(xs, ys) -> tuple[float, float]:
    """Least-squares y = a + b*x: returns (a, b)."""
    x = np.asarray(xs, dtype=float)
    y = np.asarray(ys, dtype=float)
    if len(set(x.tolist())) < 2:
        raise ValueError("a linear fit needs at least 2 distinct x values")
    b, a = np.polyfit(x, y, 1)
    return float(a), float(b)


def permutation_pvalue(a, b, iterations: int = 2000, seed: int = 0) -> float:
    """Two-sided permutation test on the difference of medians of samples a and b."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if a.size == 0 or b.size == 0:
        raise ValueError("permutation test needs two non-empty samples")
    observed = abs(np.median(a) - np.median(b))
    pooled = np.concatenate([a, b])
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(iterations):
        rng.shuffle(pooled)
        if abs(np.median(pooled[:a.size]) - np.median(pooled[a.size:])) >= observed:
            hits += 1
    return (hits + 1) / (iterations + 1)


@dataclass(frozen=True)
class Verdict:
    behaviour: str             # "sync" (pre-6.18) or "deferred" (6.18+) or "unknown"
    text: str
    assign_ns: float | None
    eexist_ns: float | None
    deassign_ns: float | None
    assign_over_eexist: float | None
    assign_over_deassign: float | None
    stall_ns: float | None
    stall_text: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


SYNC_TEXT = "registration waits for a grace period (pre-6.18 behaviour)"
DEFERRED_TEXT = "deferred free (6.18+)"


def verdict(assign_samples, eexist_samples, deassign_samples,
            memslot_after=None, memslot_base=None, hz: int | None = None) -> Verdict:
    """Classify the kernel from per-operation costs (ns).

    assign/EEXIST >= 5 and assign/deassign >= 0.5 means every registration waits for a
    grace period; otherwise the free is deferred. The memslot samples (first memslot
    change after registrations, and the same change with none) give the stall.
    """
    if not assign_samples or not eexist_samples or not deassign_samples:
        behaviour, text = "unknown", "not enough control samples for a verdict"
        a = e = d = r1 = r2 = None
    else:
        a, e, d = median(assign_samples), median(eexist_samples), median(deassign_samples)
        r1 = a / e if e > 0 else math.inf
        r2 = a / d if d > 0 else math.inf
        if r1 >= ASSIGN_OVER_EEXIST_MIN and r2 >= ASSIGN_OVER_DEASSIGN_MIN:
            behaviour, text = "sync", SYNC_TEXT
        else:
            behaviour, text = "deferred", DEFERRED_TEXT
    stall = None
    stall_text = "no post-registration stall measured"
    if memslot_after and memslot_base:
        after, base = median(memslot_after), median(memslot_base)
        stall = after - base
        if stall >= STALL_MIN_NS and after >= STALL_MIN_RATIO * base:
            if hz:
                jiffy = 1e9 / hz
                stall_text = (f"post-registration stall: {stall / 1e6:.2f} ms "
                              f"(about {stall / jiffy:.1f} jiffies at HZ={hz})")
            else:
                stall_text = f"post-registration stall: {stall / 1e6:.2f} ms (HZ unknown)"
        else:
            stall_text = (f"no post-registration stall (memslot change {after / 1e3:.1f} us "
                          f"after registrations vs {base / 1e3:.1f} us without)")
    return Verdict(behaviour, text, a, e, d, r1, r2, stall, stall_text)


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
