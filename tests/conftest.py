"""Shared fixtures. Tests marked `kvm` need a usable /dev/kvm: they skip with the reason
where it is missing, except when PYVMM_REQUIRE_KVM=1 (CI), where that is a failure."""

import os

import pytest

from pyvmm.errors import KvmUnavailable


def _kvm_problem():
    try:
        from pyvmm import Kvm
        with Kvm():
            return None
    except KvmUnavailable as e:
        return str(e)


_PROBLEM = _kvm_problem()


def pytest_collection_modifyitems(config, items):
    if _PROBLEM is None:
        return
    if os.environ.get("PYVMM_REQUIRE_KVM") == "1":
        return  # no skips: the session fixture below turns this into a failure
    for item in items:
        if "kvm" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=f"requires /dev/kvm: {_PROBLEM}"))


@pytest.fixture(scope="session", autouse=True)
def _require_kvm_in_ci():
    if _PROBLEM is not None and os.environ.get("PYVMM_REQUIRE_KVM") == "1":
        pytest.fail(f"PYVMM_REQUIRE_KVM=1 but KVM is unusable: {_PROBLEM}", pytrace=False)


@pytest.fixture
def kvm():
    from pyvmm import Kvm
    with Kvm() as k:
        yield k


@pytest.fixture
def vm(kvm):
    with kvm.create_vm() as v:
        yield v
