"""Pure statistics for the sweep: the quadratic cost fit, the permutation test, the
change rule, the verdict and where the stall landed (percentiles: pyvmm.latency). No KVM here: unit tests feed these synthetic or recorded data."""

from __future__ import annotations

import math
from dataclasses import dataclass

# Percentiles and latency summaries are shared with checks and stress: they live below
# every room, in pyvmm.latency, and are re-exported here for the bench's own use.
from ..latency import latency_summary, median, percentile, summarize  # noqa: F401


# Verdict thresholds (justified in docs/methodology.md).
ASSIGN_OVER_EEXIST_MIN = 5.0     # pre-6.18: every assign waits for a grace period
ASSIGN_OVER_DEASSIGN_MIN = 0.5   # ... so it costs about as much as a deassign
STALL_MIN_NS = 500_000           # a post-registration memslot stall worth reporting
STALL_MIN_RATIO = 5.0
# ... or, with the kernel's HZ known, at least half a jiffy and twice the step's time: at
# HZ=1000 a stall of 1 to 2 jiffies less the time since the registrations is about 1 ms,
# which a step of 0.3 ms does not grow five times by
STALL_MIN_JIFFIES = 0.5
STALL_MIN_RATIO_HZ = 2.0


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
    xs, ys = [float(x) for x in xs], [float(y) for y in ys]
    if len(set(xs)) < 3:
        raise ValueError("a quadratic fit needs at least 3 distinct x values")
    try:
        import numpy as np
    except ImportError:         # a fleet host: pyvmm's bundle carries no numpy
        coef = _lstsq([[1.0, x, x * x] for x in xs], ys)
    else:
        x, y = np.asarray(xs), np.asarray(ys)
        design = np.vstack([np.ones_like(x), x, x * x]).T
        coef = [float(c) for c in np.linalg.lstsq(design, y, rcond=None)[0]]
    resid = [y - (coef[0] + coef[1] * x + coef[2] * x * x) for x, y in zip(xs, ys)]
    return QuadFit(coef[0], coef[1], coef[2],
                   math.sqrt(sum(r * r for r in resid) / len(resid)), len(xs))


def _lstsq(rows: list[list[float]], ys: list[float]) -> list[float]:
    """Least squares through the normal equations, solved by Gaussian elimination with
    partial pivoting, columns scaled first (the pure-Python path of the fits)."""
    k = len(rows[0])
    scale = [max(abs(r[j]) for r in rows) or 1.0 for j in range(k)]
    a = [[sum(r[i] / scale[i] * r[j] / scale[j] for r in rows) for j in range(k)]
         + [sum(r[i] / scale[i] * y for r, y in zip(rows, ys))] for i in range(k)]
    for c in range(k):
        p = max(range(c, k), key=lambda i: abs(a[i][c]))
        a[c], a[p] = a[p], a[c]
        if a[c][c] == 0:
            raise ValueError("the fit is singular")
        for i in range(k):
            if i != c:
                f = a[i][c] / a[c][c]
                a[i] = [v - f * w for v, w in zip(a[i], a[c])]
    return [a[i][k] / a[i][i] / scale[i] for i in range(k)]


def fit_linear(xs, ys) -> tuple[float, float]:
    """Least-squares y = a + b*x: returns (a, b)."""
    xs, ys = [float(x) for x in xs], [float(y) for y in ys]
    if len(set(xs)) < 2:
        raise ValueError("a linear fit needs at least 2 distinct x values")
    try:
        import numpy as np
    except ImportError:
        a, b = _lstsq([[1.0, x] for x in xs], ys)
        return a, b
    b, a = np.polyfit(np.asarray(xs), np.asarray(ys), 1)
    return float(a), float(b)


def permutation_pvalue(a, b, iterations: int = 2000, seed: int = 0) -> float:
    """Two-sided permutation test on the difference of medians of samples a and b."""
    import numpy as np

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


CHANGE_P_MAX = 0.01         # permutation test: significant below this
CHANGE_MIN = 0.05           # and the medians differ by at least this fraction


def change_call(ratio: float, p_value: float, min_change: float = CHANGE_MIN,
                p_max: float = CHANGE_P_MAX) -> str:
    """Firecracker's A/B rule: a change is real only when the permutation test and the
    effect size agree. Returns 'no change', or e.g. '1.07x slower' / '1.20x faster'
    (ratio = B / A of medians of times)."""
    if not (ratio > 0) or math.isinf(ratio):
        return "no data"
    if p_value >= p_max or abs(ratio - 1.0) < min_change:
        return "no change"
    return f"{ratio:.2f}x slower" if ratio > 1 else f"{1 / ratio:.2f}x faster"


def geometric_mean(values) -> float | None:
    xs = [float(v) for v in values if v and v > 0 and not math.isinf(v)]
    if not xs:
        return None
    return math.exp(math.fsum(math.log(x) for x in xs) / len(xs))


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
    # Which step paid the stall: "memslot" (a memslot change), "vcpu" (KVM_CREATE_VCPU,
    # where VMX makes its APIC-access memslot), "teardown" (no later synchronous grace
    # period until the VM is destroyed); None without a stall.
    stall_phase: str | None = None
    # The first KVM_IOEVENTFD deassign after a burst of assigns, against the later ones
    # (the control recipe): a deferred free's pending grace period is paid there too.
    first_deassign_excess_ns: float | None = None
    stall_recipe: str | None = None
    # The three per-op distributions behind the medians above: {op: summarize()} (n,
    # min, p10, median, p90, max, mean, in ns). A reader comparing with strace -T or with
    # total/N expects a mean; the first ops of a boot are heavy, so the two differ.
    per_op: dict | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


SYNC_TEXT = "registration waits for a grace period (pre-6.18 behaviour)"
DEFERRED_TEXT = "deferred free (6.18+)"
# Steps that can pay a grace period left pending by the registrations (in recipe order,
# after the registrations), with how the report names them.
STALL_PHASES = {"vcpu": "vCPU creation (KVM_CREATE_VCPU)",
                "memslot": "the memslot step (KVM_SET_USER_MEMORY_REGION)",
                "teardown": "VM teardown"}
BEHAVIOUR_NAMES = {"sync": "sync-on-register", "deferred": "deferred-free",
                   "unknown": "unknown"}


# What --fail-on can name: the pre-6.18 regression, the fix's follow-up, either.
FAIL_ON = ("sync-on-register", "stall", "any")


def regressions(v: "Verdict") -> list[str]:
    """Which of the two known regressions the verdict shows: 'sync-on-register' (every
    registration waits for a grace period) and 'stall' (the free is deferred, and a later
    synchronous SRCU step, a memslot change, vCPU creation or the first deassign, waits
    for the grace period the registrations started)."""
    if v.behaviour == "sync":
        return ["sync-on-register"]
    if v.behaviour == "deferred" and (
            v.stall_ns is not None or (v.first_deassign_excess_ns or 0) >= STALL_MIN_NS):
        return ["stall"]
    return []


def fails_on(what: str | None, found: list[str]) -> bool:
    """Whether a --fail-on choice matches what the run found."""
    if not what:
        return False
    return bool(found) if what == "any" else what in found


def answer(v: "Verdict", hz: int | None = None) -> str:
    """The question most users come with, in one line: which behaviour, and whether a
    regression is present."""
    if v.behaviour == "sync":
        return ("pre-6.18 behaviour: every ioeventfd registration waits for an SRCU grace "
                f"period (assign {v.assign_ns / 1e3:.1f} us, {v.assign_over_eexist:.0f}x the "
                "EEXIST control): the regression of up to 25% of VM start-up is present")
    if v.behaviour == "deferred":
        if v.stall_ns is not None:
            return ("6.18+ (the fix): registration is cheap, but the next synchronous SRCU "
                    f"step waits for the grace period it started: {STALL_PHASES[v.stall_phase]}"
                    f" waits {_stall_words(v.stall_ns, hz)}: the fix's follow-up regression "
                    "is present")
        if (v.first_deassign_excess_ns or 0) >= STALL_MIN_NS:
            return ("6.18+ (the fix): registration is cheap, but the first deassign after "
                    f"it waits {_stall_words(v.first_deassign_excess_ns, hz)}: the fix's "
                    "follow-up regression is present")
        return ("6.18+ (the fix): registration is cheap and nothing after it waited: "
                "neither regression shows here")
    return ("no verdict: the control recipe did not run (--control-n 0) or too few of its "
            "boots succeeded")


def attribute_stall(after: dict, base: dict, hz: int | None = None) \
        -> tuple[str | None, float | None, dict]:
    """The step that paid a post-registration stall.

    `after` and `base` map a step to per-boot wall times (ns) with a few registrations
    and with none. A step is a key of STALL_PHASES, optionally prefixed by the recipe it
    belongs to ('during-boot/memslot'). Returns (step key or None, its excess in ns or
    None, {step: (excess, after median, base median)}); a step counts only when its
    excess is at least STALL_MIN_NS and it grew by STALL_MIN_RATIO; of those that count,
    the largest excess wins. With `hz`, a step that grew by at least half a jiffy and
    twice its time counts too.
    """
    excess = {}
    for key in after:
        if key.rpartition("/")[2] in STALL_PHASES and after[key] and base.get(key):
            a, b = median(after[key]), median(base[key])
            excess[key] = (a - b, a, b)
    half_jiffy = STALL_MIN_JIFFIES * 1e9 / hz if hz else math.inf
    real = [k for k, (d, a, b) in excess.items()
            if d >= STALL_MIN_NS and (a >= STALL_MIN_RATIO * max(b, 1.0)
                                      or (d >= half_jiffy
                                          and a >= STALL_MIN_RATIO_HZ * max(b, 1.0)))]
    if not real:
        return None, None, excess
    best = max(real, key=lambda k: excess[k][0])
    return best, excess[best][0], excess


def first_deassign_excess(per_boot_deassigns) -> float | None:
    """Median over boots of (first deassign - median of that boot's later deassigns)."""
    diffs = [xs[0] - median(xs[1:]) for xs in per_boot_deassigns if len(xs) >= 3]
    return median(diffs) if diffs else None


def _stall_words(stall: float, hz: int | None) -> str:
    if hz:
        return f"{stall / 1e6:.2f} ms (about {stall / (1e9 / hz):.1f} jiffies at HZ={hz})"
    return f"{stall / 1e6:.2f} ms (HZ unknown)"


def verdict(assign_samples, eexist_samples, deassign_samples,
            memslot_after=None, memslot_base=None, hz: int | None = None,
            phases_after: dict | None = None, phases_base: dict | None = None,
            deassigns_per_boot=None) -> Verdict:
    """Classify the kernel from per-operation costs (ns).

    assign/EEXIST >= 5 and assign/deassign >= 0.5 means every registration waits for a
    grace period; otherwise the free is deferred. The stall is the step after the
    registrations that grew most against the same recipe with none (`phases_after` /
    `phases_base`, per step); with only memslot samples it is the memslot step.
    `deassigns_per_boot` (the control recipe's deassign samples, one list per boot) adds
    the first deassign's excess.
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
    after = dict(phases_after or {})
    base = dict(phases_base or {})
    if memslot_after and memslot_base:
        after.setdefault("memslot", list(memslot_after))
        base.setdefault("memslot", list(memslot_base))
    phase, stall, excess = attribute_stall(after, base, hz)
    first = first_deassign_excess(deassigns_per_boot or [])
    memslots = [k for k in excess if k.rpartition("/")[2] == "memslot"]
    recipe = None
    if phase is not None:
        recipe, _, phase = phase.rpartition("/")
        stall_text = (f"post-registration stall: {_stall_words(stall, hz)}, paid by "
                      f"{STALL_PHASES[phase]}" + (f" in {recipe}" if recipe else ""))
    elif memslots:
        worst = max(memslots, key=lambda k: excess[k][0])
        _, m_after, m_base = excess[worst]
        stall_text = (f"no post-registration stall (memslot change {m_after / 1e3:.1f} us "
                      f"after registrations vs {m_base / 1e3:.1f} us without)")
    elif excess:
        stall_text = "no post-registration stall in " + ", ".join(
            f"{p} ({x[1] / 1e3:.1f} vs {x[2] / 1e3:.1f} us)" for p, x in excess.items())
    else:
        stall_text = "no post-registration stall measured"
    if first is not None and first >= STALL_MIN_NS:
        stall_text += f"; the first deassign after the assigns waits {_stall_words(first, hz)}"
    per_op = {op: summarize(xs) for op, xs in (("assign", assign_samples),
                                                ("eexist", eexist_samples),
                                                ("deassign", deassign_samples)) if xs}
    return Verdict(behaviour, text, a, e, d, r1, r2, stall, stall_text, phase, first,
                   recipe or None, per_op or None)


def predict_stall(hz: int | None, gaps_ns) -> dict | None:
    """The deferred free's stall as the SRCU code predicts it (docs/lab.md, "Why the
    stall is more than one grace period").

    The first registration's call_srcu() starts a normal grace period and queues its
    processing one jiffy out (queue_delayed_work(..., 1)); the timer wheel never fires a
    timer early, so a timer due at the next jiffy goes into the bucket after it and runs
    at the second tick from now: 1 to 2 jiffies after the registration, 1.5 on average
    over where in its tick the registration fell. A synchronous grace period asked for
    g later (the memslot change, the first deassign) waits for that one to end and then
    for its own, an expedited one of microseconds: 1.5 jiffies - g, between 1 - g and
    2 - g. `gaps_ns`: per boot, the time from the first registration to the step that
    waits."""
    gaps = [g for g in gaps_ns or [] if g is not None]
    if not hz or not gaps:
        return None
    j = 1e9 / hz
    g = median(gaps)
    return {"median_ns": max(1.5 * j - g, 0.0), "lo_ns": max(j - g, 0.0),
            "hi_ns": max(2 * j - g, 0.0), "gap_ns": g,
            "median_jiffies": max(1.5 * j - g, 0.0) / j}


def kernel_check_agreement(kc: dict, behaviour: str, stall_ns: float | None,
                           first_deassign_ns: float | None = None) -> dict:
    """Does a static kernel-check (pyvmm kernel-check's dict) agree with what was
    measured? Compares the behaviour and, where the check predicts one, whether there
    was a post-registration stall: a step's stall, or the first deassign after the
    assigns waiting STALL_MIN_NS or more (the evidence `regressions` counts). A check
    that finds each registration's grace period worked at once on its CPU
    (gp_work_at_once) cannot say which verdict the wall times give: either agrees, and
    the stall decides. Where the registration calls a synchronous wait and was measured
    waiting (6.1), no grace period is left pending, so a later step's excess, or the
    first deassign's (each deassign waits for a grace period of its own), is how long the
    host kept that step from running (a few ms on a loaded host): no stall is seen there,
    as `regressions` reports none."""
    same = kc.get("behaviour") == behaviour or (
        bool(kc.get("gp_work_at_once")) and behaviour in ("sync", "deferred"))
    nothing_pending = behaviour == "sync" and kc.get("behaviour") == "sync"
    stall_seen = not nothing_pending and (
        stall_ns is not None or (first_deassign_ns or 0) >= STALL_MIN_NS)
    predicted = kc.get("stall_expected")
    stall_ok = predicted is None or predicted == stall_seen
    return {"agrees": same and stall_ok, "behaviour_agrees": same,
            "stall_predicted": predicted, "stall_seen": stall_seen}
