"""Recipe parsing and validation (the C parser through cffi; no KVM needed)."""

import pytest

from pyvmm import recipe as rmod
from pyvmm.recipe import RecipeError


def test_presets_parse_and_expand():
    for name in rmod.PRESETS:
        r = rmod.parse(name, 7)
        assert "N" not in r.text
        assert r.steps[0].op == "vm"
    r = rmod.parse("during-boot", 12)
    assert [str(s) for s in r.steps] == ["vm", "mem", "vcpu:1", "run:probe", "ioev:12",
                                         "run:rung", "memslot:1", "run:halt"]
    assert r.registrations == 12


def test_canonical_text_round_trips():
    r = rmod.parse(" vm, mem ,ioev:3,vcpu:2,run ,teardown")
    assert r.text == "vm,mem,ioev:3,vcpu:2,run:halt"
    assert rmod.parse(r.text) == r


@pytest.mark.parametrize("text, message", [
    ("", "empty recipe"),
    ("mem,vm", "step 1 must be 'vm'"),
    ("vm,vm", "'vm' must be the first step"),
    ("vm,mem,ioev", "needs a count"),
    ("vm,mem,ioev:abc", "not a number"),
    ("vm,mem,ioev:-1", "not a number"),
    ("vm,frobnicate", "unknown step"),
    ("vm,mem,run", "'run' needs 'vcpu:K'"),
    ("vm,mem,vcpu:1,run:sideways", "run target 'sideways' is unknown"),
    ("vm,mem,vcpu:0", "out of range"),
    ("vm,mem,vcpu:65", "out of range"),
    ("vm,eexist:3", "needs an earlier 'ioev:N'"),
    ("vm,mem,ioev:2,deassign:3", "only 2 are assigned"),
    ("vm,mem,ioev:5000", "more than the 4094 doorbells"),
    ("vm,mem,mem", "appears twice"),
    ("vm,mem,,vcpu:1", "is empty"),
    ("vm,teardown,mem", "teardown must be the last step"),
    ("vm:3", "takes no argument"),
    ("vm,mem,memslot:17", "out of range"),
])
def test_bad_recipes_get_clear_errors(text, message):
    with pytest.raises(RecipeError, match=message):
        rmod.parse(text)


def test_template_needs_a_count():
    with pytest.raises(RecipeError, match="uses N"):
        rmod.parse("vm,mem,ioev:N")
    assert rmod.expand("vm,mem,ioev:N,vcpu:1", 5) == "vm,mem,ioev:5,vcpu:1"
