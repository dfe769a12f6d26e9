"""The per-syscall tracer (pyvmm bench --python-vs-c --per-ioctl): parsing, splitting
and alignment on hand-made traces, then both drivers traced on the real /dev/kvm."""

import os

import pytest

from pyvmm.vmm import abi
from pyvmm import tracefs
from pyvmm.bench import syscalls
from pyvmm.errors import PyvmmError, TraceUnavailable

TID = 4242


def line(ts, event, rest, tid=TID):
    return f"          python-{tid}    [001] ..... {ts}: {event}: {rest}"


def enter(ts, nr, *args, tid=TID):
    return line(ts, "sys_enter", f"NR {nr} ({', '.join(f'{a:x}' for a in args)})", tid)


def leave(ts, nr, ret=0, tid=TID):
    return line(ts, "sys_exit", f"NR {nr} = {ret}", tid)


def cpu_clock(ts):
    return [enter(ts, 228, 3, 0x7ffe0000), leave(ts + 1, 228)]


def boot_trace(t0: int, create_ns: int, user_gap: int) -> list[str]:
    """One boot of two phases: 'vm' (KVM_CREATE_VM) and 'teardown' (close)."""
    out = cpu_clock(t0)
    t = t0 + 2 + user_gap
    out += [enter(t, 16, 3, abi.KVM_CREATE_VM, 0), leave(t + create_ns, 16, 5)]
    t += create_ns
    out += cpu_clock(t + 5)
    out += cpu_clock(t + 20)
    out += [line(t + 30, "page_fault_user", "address=0x1000 ip=0x2 error_code=0x6")]
    out += [enter(t + 40, 3, 5), leave(t + 50, 3)]
    out += cpu_clock(t + 60)
    return out


def test_parse_split_profile_on_a_made_up_trace():
    text = "\n".join(["# tracer: nop"] + boot_trace(1000, 700, 10) + boot_trace(3000, 900, 30)
                     + [enter(9999, 16, 7, 1, 0, tid=77)])
    calls, marks = syscalls.parse_trace(text, TID)
    assert marks == [] and len(calls) == 12         # the other thread's call is dropped
    prof = syscalls.profile(calls, ["vm", "teardown"], boots=2)
    vm, down = prof
    assert [s["name"] for s in vm["syscalls"]] == ["KVM_CREATE_VM"]
    assert vm["syscalls"][0]["kernel_ns"] == 800      # median of 700 and 900
    assert vm["user_ns"] == (10 + 5 + 1 + 30 + 5 + 1) / 2
    assert [s["name"] for s in down["syscalls"]] == ["close"]
    assert down["page_faults"] == 1 and vm["page_faults"] == 0


def test_split_refuses_a_trace_that_does_not_match_the_recipe():
    calls, _ = syscalls.parse_trace("\n".join(boot_trace(0, 10, 1)), TID)
    with pytest.raises(PyvmmError, match="expected 12 CPU-clock reads"):
        syscalls.split_phases(calls, nphases=3, boots=2)


def test_align_pairs_common_calls_and_marks_extra_ones():
    c = [{"name": n} for n in ("openat", "KVM_GET_VCPU_MMAP_SIZE", "KVM_CREATE_VM")]
    py = [{"name": "KVM_CREATE_VM"}]
    pairs = syscalls.align(c, py)
    assert [(a and a["name"], b and b["name"]) for a, b in pairs] == [
        ("openat", None), ("KVM_GET_VCPU_MMAP_SIZE", None),
        ("KVM_CREATE_VM", "KVM_CREATE_VM")]


def test_calibration_marks_scale_tsc_to_ns():
    assert tracefs.ns_per_tick("x86-tsc", [(0, 1000.0, 5_000), (1, 4000.0, 6_000)]) == \
        pytest.approx(1000 / 3000)
    with pytest.raises(PyvmmError, match="calibrate"):
        tracefs.ns_per_tick("x86-tsc", [(0, 1000.0, 5_000)])


def _tracing_problem():
    if os.geteuid() != 0:
        return "tracing needs root"
    try:
        with syscalls.SyscallTrace():
            return None
    except TraceUnavailable as e:
        return str(e)


@pytest.mark.kvm
def test_both_drivers_make_the_same_kvm_ioctls_at_the_same_kernel_cost():
    problem = _tracing_problem()
    if problem:
        pytest.skip(problem)
    from pyvmm import recipe
    rec = recipe.parse("during-boot", 2)
    d = syscalls.compare(rec, boots=5, warmup=1)
    labels = [p["phase"] for p in d["c"]]
    assert labels == [str(s) for s in rec.steps] + ["teardown"]
    # The C helper opens /dev/kvm (and asks the mmap size) in every boot; the Python VMM
    # holds one /dev/kvm per process. Every VM and vCPU ioctl is the same.
    per_process = {"KVM_GET_VCPU_MMAP_SIZE", "KVM_GET_API_VERSION"}
    for c, py in zip(d["c"], d["py"]):
        kvm_c = [s["name"] for s in c["syscalls"]
                 if s["name"].startswith("KVM_") and s["name"] not in per_process]
        kvm_py = [s["name"] for s in py["syscalls"] if s["name"].startswith("KVM_")]
        assert kvm_c == kvm_py, c["phase"]
        assert py["span_ns"] >= py["kernel_ns"] > 0 or c["phase"] == "ioev:0"
    ioev = d["py"][labels.index("ioev:2")]
    assert [s["name"] for s in ioev["syscalls"]].count("KVM_IOEVENTFD") == 2
    assert [s["name"] for s in ioev["syscalls"]].count("eventfd2") == 2
    # the tracer put every setting back
    with open(os.path.join(tracefs.TRACEFS, "events/raw_syscalls/enable")) as f:
        assert f.read().strip() == "0"
