"""pyvmm check: the attribution logic on hand-made event sequences (each checker must be
able to fail), and every check against the real /dev/kvm with small counts."""

import json
import subprocess
import sys

import pytest

from pyvmm.checks import attribution as attr
from pyvmm.checks.attribution import Run

# --- attribution (pure) -------------------------------------------------------------------


def test_state_at_follows_the_operation_cycle():
    ops = attr.COHERENCE_OPS
    assert attr.state_at(0, "none", ops) == "none"
    assert [attr.state_at(2 * k + 2, "none", ops) for k in range(7)] == ops + ops[:1]
    with pytest.raises(ValueError, match="in flight"):
        attr.state_at(3, "none", ops)
    assert attr.settled(4, 4) and not attr.settled(3, 3) and not attr.settled(4, 5)


def test_ordering_clean_sequence_has_no_violation():
    runs = [Run(0, 0, "pio-start"),
            Run(0, 0, "mmio-write", 0xD0000000), Run(0, 0, "pio-marker"),   # unassigned: exits
            Run(2, 2, "pio-marker", signals=1),                            # assigned: absorbed
            Run(2, 3, "mmio-write", 0xD0000000), Run(3, 4, "pio-marker"),   # deassign in flight
            Run(4, 4, "mmio-write", 0xD0000000), Run(4, 4, "pio-marker")]
    v = attr.judge_ordering(runs)
    assert v.violations == [] and v.checked == 3 and v.ambiguous == 1
    assert v.outcomes[("assigned", "write", "absorbed")] == 1
    assert v.outcomes[("unassigned", "write", "mmio")] == 2


def test_ordering_mmio_exit_after_assign_returned_is_a_violation():
    runs = [Run(2, 2, "mmio-write", 0xD0000000), Run(2, 2, "pio-marker")]
    v = attr.judge_ordering(runs)
    assert len(v.violations) == 1
    bad = v.violations[0]
    assert bad.state == "assigned" and bad.access.outcome == "mmio" and bad.access.run == 0
    assert "settled in state 'assigned'" in bad.why


def test_ordering_signal_after_deassign_returned_is_a_violation():
    v = attr.judge_ordering([Run(4, 4, "pio-marker", signals=1)])
    assert len(v.violations) == 1 and v.violations[0].state == "unassigned"
    assert v.violations[0].access.outcome == "absorbed"


def test_ordering_lost_and_double_writes_are_violations_even_in_flight():
    v = attr.judge_ordering([Run(1, 2, "pio-marker", signals=0),          # lost
                             Run(1, 2, "mmio-write", 0xD0000000, signals=1)])   # both
    assert [x.access.outcome for x in v.violations] == ["lost", "both"]
    assert all(x.state is None for x in v.violations)


def test_ordering_ambiguous_runs_are_not_judged():
    # Assign in flight for the whole run (seq 1): either outcome is acceptable.
    v = attr.judge_ordering([Run(1, 1, "mmio-write", 0xD0000000), Run(1, 1, "pio-marker"),
                             Run(1, 2, "pio-marker", signals=1)])
    assert v.violations == [] and v.checked == 0 and v.ambiguous == 2


P, S = 0xC0DEC0DE, 0x5E5E5E5E


def test_coherence_clean_sequence():
    runs = [Run(0, 0, "pio-start"),
            Run(0, 0, "mmio-read", 0xE0000000), Run(0, 0, "pio-data", S),      # none: read mmio
            Run(0, 0, "mmio-write", 0xE0000000), Run(0, 0, "pio-marker"),      # none: write mmio
            Run(2, 2, "pio-data", P), Run(2, 2, "pio-marker"),                # rw: both memory
            Run(6, 6, "pio-data", P), Run(6, 6, "mmio-write", 0xE0000000),    # ro
            Run(6, 6, "pio-marker")]
    v = attr.judge_coherence(runs, P, S)
    assert v.violations == [] and v.checked == 6


@pytest.mark.parametrize("runs,state,outcome", [
    ([Run(2, 2, "mmio-read", 0xE0000000), Run(2, 2, "pio-data", S)], "rw", "mmio"),
    ([Run(4, 4, "pio-data", P)], "none", "memory"),                 # read after delete
    ([Run(6, 6, "pio-data", P), Run(6, 6, "pio-marker")], "ro", "memory"),   # RO write landed
    ([Run(8, 8, "pio-data", P)], "none", "memory"),                 # moved away, still there
])
def test_coherence_violations_are_reported(runs, state, outcome):
    v = attr.judge_coherence(runs, P, S)
    assert len(v.violations) == 1
    assert v.violations[0].state == state and v.violations[0].access.outcome == outcome


def test_coherence_corrupt_values_are_violations_in_any_state():
    v = attr.judge_coherence([Run(3, 4, "pio-data", 0x1234),
                              Run(0, 0, "mmio-read", 0xE0000000), Run(0, 0, "pio-data", 7)],
                             P, S)
    assert [x.access.outcome for x in v.violations] == ["corrupt", "corrupt"]
    d = v.to_dict()
    assert d["violations"] == 2 and d["first_violations"][0]["detail"] == "value 0x1234"


# --- real /dev/kvm ------------------------------------------------------------------------

@pytest.mark.kvm
def test_ioeventfd_ordering_holds_on_this_kernel():
    from pyvmm.checks import races
    res = races.ioeventfd_ordering(iterations=3000, duration_s=600)
    assert res.iterations == 3000 and res.stopped_by == "iterations"
    assert res.violations == 0, res.verdict.to_dict()
    # Both settled states were seen, so the check could have failed either way.
    o = res.verdict.outcomes
    assert o.get(("assigned", "write", "absorbed"), 0) > 0
    assert o.get(("unassigned", "write", "mmio"), 0) > 0
    lat = res.latency_summary()
    assert lat["assign"]["count"] > 0 and lat["deassign"]["p50_ns"] > 0
    assert res.stats["vcpu"]["exits"] >= res.runs


@pytest.mark.kvm
def test_memslot_coherence_holds_on_this_kernel():
    from pyvmm.checks import races
    res = races.memslot_coherence(iterations=3000, duration_s=600)
    assert res.violations == 0, res.verdict.to_dict()
    assert res.extra["pattern_intact"]
    seen = {k[0] for k in res.verdict.outcomes}
    assert {"none", "rw", "ro"} <= seen
    assert set(res.latency_summary()) == {"add rw", "delete", "add ro", "move away",
                                          "move back"}


@pytest.mark.kvm
def test_guest_memfd_cases_behave_as_documented():
    from pyvmm.checks import gmem
    reason = gmem.supported()
    if reason:
        pytest.skip(f"guest-memfd check cannot run: {reason}")
    cases = gmem.run_cases(reads=10)
    assert len(cases) == 6
    for c in cases:
        assert c.ok, c.to_dict()
        assert c.observed


@pytest.mark.kvm
def test_check_cli_json_and_exit_status():
    r = subprocess.run([sys.executable, "-m", "pyvmm", "check", "ioeventfd-ordering",
                        "--iterations", "500", "--json"], capture_output=True, text=True,
                       cwd="/", timeout=120)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["check"] == "ioeventfd-ordering" and d["violations"] == 0
    assert d["iterations"] == 500 and "assign" in d["latency"]
    bad = subprocess.run([sys.executable, "-m", "pyvmm", "check", "memslot-coherence",
                          "--iterations", "0"], capture_output=True, text=True, cwd="/")
    assert bad.returncode == 2 and "--iterations must be >= 1" in bad.stderr
