"""Stats, fits and the verdict on synthetic data with known answers, and on recorded
samples (no KVM needed)."""

import json
import os
import random

import pytest

from pyvmm.analysis import plan, stats

DATA = os.path.join(os.path.dirname(__file__), "data")


def test_percentiles_and_summary():
    vals = list(range(1, 101))
    assert stats.median(vals) == pytest.approx(50.5)
    assert stats.percentile(vals, 90) == pytest.approx(90.1)
    s = stats.summarize(vals)
    assert s["n"] == 100 and s["min"] == 1 and s["max"] == 100
    with pytest.raises(ValueError):
        stats.percentile([], 50)


def test_quadratic_fit_recovers_known_coefficients():
    ns = [0, 1, 10, 100, 300, 1000]
    ys = [2_000_000 + 1500 * n + 7 * n * n for n in ns]
    fit = stats.fit_quadratic(ns, ys)
    assert fit.a == pytest.approx(2_000_000, rel=1e-6)
    assert fit.b == pytest.approx(1500, rel=1e-6)
    assert fit.c == pytest.approx(7, rel=1e-6)
    assert fit.rms_residual < 1e-3
    assert fit(50) == pytest.approx(2_000_000 + 1500 * 50 + 7 * 2500)


def test_quadratic_fit_reports_residual_for_noisy_data():
    rng = random.Random(1)
    ns = list(range(0, 1000, 50))
    ys = [1000 + 3 * n + rng.gauss(0, 100) for n in ns]
    fit = stats.fit_quadratic(ns, ys)
    assert 30 < fit.rms_residual < 200
    with pytest.raises(ValueError):
        stats.fit_quadratic([1, 1, 2], [1, 2, 3])


def test_linear_fit_slope():
    a, b = stats.fit_linear([0, 10, 20, 30], [100, 170, 240, 310])
    assert a == pytest.approx(100) and b == pytest.approx(7)


def test_permutation_test_separates_and_does_not_invent():
    rng = random.Random(3)
    a = [rng.gauss(100, 5) for _ in range(30)]
    b = [rng.gauss(130, 5) for _ in range(30)]
    c = [rng.gauss(100, 5) for _ in range(30)]
    assert stats.permutation_pvalue(a, b, 1000) < 0.01
    assert stats.permutation_pvalue(a, c, 1000) > 0.05


def test_interleaved_order_is_balanced_and_seeded():
    cells = [("r", n) for n in (0, 1, 10)]
    o1 = plan.interleaved_order(cells, 4, seed=9)
    o2 = plan.interleaved_order(cells, 4, seed=9)
    assert o1 == o2 and len(o1) == 12
    for k in range(4):
        assert sorted(o1[3 * k:3 * k + 3]) == sorted(cells)
    assert o1 != plan.interleaved_order(cells, 4, seed=10)


def test_verdict_on_recorded_host_samples_is_deferred():
    with open(os.path.join(DATA, "control-host-6.18.json")) as f:
        rec = json.load(f)
    v = stats.verdict(rec["assign"], rec["eexist"], rec["deassign"], rec["memslot_n1"],
                      rec["memslot_n0"], rec["hz"])
    assert v.behaviour == "deferred" and v.text == stats.DEFERRED_TEXT
    assert v.assign_over_eexist < stats.ASSIGN_OVER_EEXIST_MIN
    assert v.stall_ns > 1e6 and "post-registration stall" in v.stall_text
    assert "HZ=250" in v.stall_text


def test_verdict_on_synchronous_registration_samples():
    # Shape of a pre-6.18 kernel: every assign and deassign waits for an expedited grace
    # period (~tens of us), EEXIST returns before touching the bus (~1 us). Synthetic.
    rng = random.Random(5)
    assign = [rng.gauss(40_000, 3_000) for _ in range(200)]
    deassign = [rng.gauss(42_000, 3_000) for _ in range(200)]
    eexist = [rng.gauss(1_000, 100) for _ in range(200)]
    memslot = [rng.gauss(30_000, 2_000) for _ in range(20)]
    v = stats.verdict(assign, eexist, deassign, memslot, memslot, 250)
    assert v.behaviour == "sync" and v.text == stats.SYNC_TEXT
    assert v.assign_over_eexist > 30
    assert "no post-registration stall" in v.stall_text


def test_verdict_boundaries():
    # Exactly at both thresholds counts as synchronous; just below one does not.
    assert stats.verdict([5.0], [1.0], [10.0]).behaviour == "sync"
    assert stats.verdict([4.9], [1.0], [9.0]).behaviour == "deferred"
    assert stats.verdict([5.0], [1.0], [10.1]).behaviour == "deferred"
    assert stats.verdict([], [1.0], [1.0]).behaviour == "unknown"


# --- where the post-registration stall lands ---------------------------------------------

def _boots(k, base_us, extra_us=0.0):
    return [(base_us + extra_us + 0.01 * i) * 1e3 for i in range(k)]


@pytest.mark.parametrize("shape,paid_by", [
    ("memslot", "memslot"),     # this host and AMD: the memslot step after the registrations
    ("vcpu", "vcpu"),           # Intel VMX: the first KVM_CREATE_VCPU makes a memslot
    ("teardown", "teardown"),   # no later memslot change: VM destruction pays it
])
def test_the_stall_is_attributed_to_the_step_that_paid_it(shape, paid_by):
    base = {"r/vcpu": _boots(10, 40), "r/memslot": _boots(10, 20), "r/teardown": _boots(10, 300)}
    after = {k: list(v) for k, v in base.items()}
    after[f"r/{shape}"] = _boots(10, {"vcpu": 40, "memslot": 20, "teardown": 300}[shape], 5600)
    if shape != "teardown":
        after["r/teardown"] = _boots(10, 300, 200)      # a little slower, not a stall
    v = stats.verdict([2e3], [1e3], [10e3], hz=250, phases_after=after, phases_base=base)
    assert v.behaviour == "deferred"
    assert v.stall_phase == paid_by and v.stall_recipe == "r"
    assert 5.5e6 < v.stall_ns < 5.7e6
    assert "about 1.4 jiffies at HZ=250" in v.stall_text
    assert stats.STALL_PHASES[paid_by] in v.stall_text


def test_no_stall_when_nothing_grew_and_the_biggest_qualifying_step_wins():
    base = {"a/memslot": _boots(5, 20), "b/memslot": _boots(5, 20), "a/teardown": _boots(5, 2000)}
    v = stats.verdict([30e3], [1e3], [25e3], phases_after=base, phases_base=base)
    assert v.behaviour == "sync" and v.stall_phase is None and v.stall_ns is None
    assert v.stall_text.startswith("no post-registration stall (memslot change")
    # teardown grew by more in absolute terms but not by the ratio: the memslot step of
    # recipe b is the stall.
    after = {"a/memslot": _boots(5, 20, 700), "b/memslot": _boots(5, 20, 4000),
             "a/teardown": _boots(5, 2000, 4500)}
    v = stats.verdict([2e3], [1e3], [10e3], phases_after=after, phases_base=base)
    assert (v.stall_recipe, v.stall_phase) == ("b", "memslot")


def test_first_deassign_after_a_burst_is_reported():
    slow_first = [[6e6] + [20e3] * 9 for _ in range(5)]
    v = stats.verdict([2e3], [1e3], [20e3], hz=250, deassigns_per_boot=slow_first)
    assert v.first_deassign_excess_ns == pytest.approx(6e6 - 20e3)
    assert "first deassign after the assigns waits 5.98 ms" in v.stall_text
    flat = [[20e3] * 10 for _ in range(5)]
    v = stats.verdict([30e3], [1e3], [20e3], hz=250, deassigns_per_boot=flat)
    assert v.first_deassign_excess_ns == 0 and "first deassign" not in v.stall_text
    assert stats.first_deassign_excess([[1.0, 2.0]]) is None      # too few to tell


def test_a_change_needs_both_significance_and_size():
    assert stats.change_call(1.07, 0.001) == "1.07x slower"
    assert stats.change_call(0.80, 0.0005) == "1.25x faster"
    assert stats.change_call(1.07, 0.02) == "no change"          # not significant
    assert stats.change_call(1.03, 0.0001) == "no change"        # significant but small
    assert stats.change_call(1.03, 0.0001, min_change=0.02) == "1.03x slower"
    assert stats.change_call(float("nan"), 0.0) == "no data"
    assert stats.geometric_mean([2.0, 0.5]) == pytest.approx(1.0)
    assert stats.geometric_mean([]) is None


def test_the_stall_prediction_is_one_and_a_half_jiffies_less_the_gap():
    # HZ=250: a jiffy is 4 ms; the waiter comes 0.5 ms after the first registration
    p = stats.predict_stall(250, [0.4e6, 0.5e6, 0.6e6])
    assert p["gap_ns"] == 0.5e6
    assert (p["lo_ns"], p["median_ns"], p["hi_ns"]) == (3.5e6, 5.5e6, 7.5e6)
    assert p["median_jiffies"] == pytest.approx(1.375)
    # the jiffy count stays, the milliseconds scale with 1/HZ
    assert stats.predict_stall(100, [0.0])["median_ns"] == 15e6
    assert stats.predict_stall(1000, [0.0])["median_ns"] == 1.5e6
    # a waiter that comes later than two jiffies waits nothing; no HZ or no gaps: no figure
    assert stats.predict_stall(1000, [3e6])["hi_ns"] == 0.0
    assert stats.predict_stall(None, [0.0]) is None and stats.predict_stall(250, []) is None


def test_the_gap_runs_from_the_first_registration_to_the_step_that_waits():
    from pyvmm.analysis.findings import gap_to
    boot = {"phases": [{"op": "vm", "wall_ns": 900}, {"op": "ioev", "wall_ns": 300},
                       {"op": "run", "wall_ns": 200}, {"op": "memslot", "wall_ns": 5000},
                       {"op": "deassign", "wall_ns": 7}]}
    assert gap_to(boot, "memslot") == 500.0 and gap_to(boot, "deassign") == 5500.0
    assert gap_to(boot, "vcpu") is None
    assert gap_to({"phases": [{"op": "memslot", "wall_ns": 1}]}, "memslot") is None


def test_with_hz_known_a_stall_of_half_a_jiffy_that_doubled_the_step_counts():
    # HZ=1000: 1.1 ms on a 0.3 ms step is 1.1 jiffies but only 4.7x; without HZ it is
    # not a stall (5x), with HZ it is (>= half a jiffy and >= 2x)
    after = {"during-boot/memslot": [1.4e6] * 5}
    base = {"during-boot/memslot": [0.3e6] * 5}
    assert stats.attribute_stall(after, base)[0] is None
    step, excess, _ = stats.attribute_stall(after, base, hz=1000)
    assert step == "during-boot/memslot" and excess == pytest.approx(1.1e6)
    # half a jiffy at HZ=100 is 5 ms: the same growth is not enough there
    assert stats.attribute_stall(after, base, hz=100)[0] is None
    # a big step that grew by little stays noise at any HZ
    assert stats.attribute_stall({"x/teardown": [4.0e6] * 5}, {"x/teardown": [3.4e6] * 5},
                                 hz=1000)[0] is None


def test_an_old_kernel_check_is_read_with_todays_predictions():
    """A run.json written before kernel-check knew that call_srcu_expedited works its
    grace period at once (and before the first deassign counted as the stall's
    evidence) is judged today as a new one would be; `pyvmm report` rewrites it."""
    from pyvmm.analysis import findings, predictions
    sync = stats.verdict([40e3] * 5, [2e3] * 5, [50e3] * 5)
    assert sync.behaviour == "sync"
    old_rfc = {"behaviour": "deferred", "mechanism": "call_srcu_expedited",
               "memslot_swap_waits": True, "srcu_kick": False, "stall_expected": False,
               "agrees": False}
    assert predictions.agreement(old_rfc, sync)["agrees"] is True
    assert findings._agrees(old_rfc, sync) is True
    fix = {"behaviour": "deferred", "mechanism": "call_srcu", "memslot_swap_waits": True,
           "srcu_kick": False, "stall_expected": True, "agrees": False}
    first_only = stats.verdict([4e3] * 5, [2e3] * 5, [9e3] * 5,
                               deassigns_per_boot=[[600e3, 9e3, 9e3]] * 3)
    assert first_only.stall_ns is None
    assert findings._agrees(fix, first_only) is True
    assert findings._agrees(fix, stats.verdict([4e3] * 5, [2e3] * 5, [9e3] * 5)) is False
    # nothing to compare: the stored word stands
    assert findings._agrees({"agrees": True}, sync) is True
