"""pyvmm trace: the ioctl table, the decoders, the event parser and the model on hand-made
and recorded traces (pure), then real traces of pyvmm's own VMM and of QEMU (root,
tracefs; QEMU where it is installed)."""

import gzip
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from pyvmm.vmm import abi
from pyvmm import tracefs
from pyvmm.errors import LabError
from pyvmm.trace import attribute, ioctls, model, probesite, record, strace, workloads
from pyvmm.trace import compare as tcompare

HERE = os.path.dirname(os.path.abspath(__file__))
QEMU_TRACE = os.path.join(HERE, "data", "qemu-microvm-2.trace.gz")
HEADER = "/usr/include/linux/kvm.h"


# --- the ioctl table and the decoders (pure) ----------------------------------------------

@pytest.mark.skipif(not os.path.exists(HEADER), reason=f"{HEADER} is not installed "
                    "(linux-libc-dev)")
def test_every_table_line_matches_the_installed_kvm_header():
    text = open(HEADER).read().replace("\\\n", " ")
    defined = {}
    for m in re.finditer(r"#define\s+(KVM_\w+)\s+_IO(WR|R|W)?\(KVMIO,\s*(0x[0-9a-fA-F]+)",
                         text):
        defined[m.group(1)] = ({"WR": "rw", "R": "r", "W": "w", None: "-"}[m.group(2)],
                               int(m.group(3), 16))
    checked = 0
    for (d, nr), entries in ioctls.table().items():
        for name, _ in entries:
            if name in defined:
                assert defined[name] == (d, nr), name
                checked += 1
    assert checked > 100


def test_names_come_from_the_number_and_the_fds_kind():
    for name in ("KVM_IOEVENTFD", "KVM_SET_USER_MEMORY_REGION", "KVM_CREATE_VCPU", "KVM_RUN",
                 "KVM_CREATE_VM", "KVM_SET_USER_MEMORY_REGION2", "KVM_CREATE_GUEST_MEMFD"):
        assert ioctls.name(abi.IOCTLS[name].number) == name
    # one (direction, nr), two meanings: the fd says which
    get_pit2_or_events = (2 << 30) | (0xAE << 8) | 0x9F | (0x70 << 16)
    assert ioctls.name(get_pit2_or_events, "vm") == "KVM_GET_PIT2"
    assert ioctls.name(get_pit2_or_events, "vcpu") == "KVM_GET_VCPU_EVENTS"
    assert ioctls.name(0x5401).startswith("ioctl ") and not ioctls.is_kvm(0x5401)
    assert "0xfe" in ioctls.name((0xAE << 8) | 0xFE)


def test_arguments_are_read_from_the_struct_words():
    # struct kvm_ioeventfd: datamatch, addr, len + fd, flags (deassign | pio | datamatch)
    words = (6, 0x0, (9 << 32) | 2, 0b111)
    a = ioctls.args("KVM_IOEVENTFD", 0x7ffe0000, words)
    assert a == {"addr": 0, "len": 2, "eventfd": 9, "flags": 7, "deassign": True, "pio": True,
                 "datamatch": 6}
    assert ioctls.describe("KVM_IOEVENTFD", a) == "deassign port 0x0 len 2 datamatch 0x6"
    # struct kvm_userspace_memory_region: slot + flags, gpa, size, uaddr
    m = ioctls.args("KVM_SET_USER_MEMORY_REGION", 0, ((1 << 32) | 3, 0xE0000000, 2 << 20, 0))
    assert (m["slot"], m["flags"], m["gpa"], m["size"], m["delete"]) == (3, 1, 0xE0000000,
                                                                       2 << 20, False)
    assert "LOG_DIRTY_PAGES" in ioctls.describe("KVM_SET_USER_MEMORY_REGION", m)
    assert ioctls.args("KVM_CREATE_VCPU", 3, None) == {"vcpu_id": 3}
    assert ioctls.args("KVM_IOEVENTFD", 0, None) == {}


GLIBC_IOCTL = """
00000000000fdd30 <ioctl@@GLIBC_2.2.5>:
   fdd30:\tsub    $0x58,%rsp
   fdd34:\tmov    %rdx,0x30(%rsp)
   fdd39:\tmov    %fs:0x28,%rax
   fdd42:\tmov    %rax,0x18(%rsp)
   fdd47:\txor    %eax,%eax
   fdd64:\tmov    $0x10,%eax
   fdd69:\tsyscall
   fdd6b:\tmov    %eax,%edx
   fdd6d:\tcmp    $0xfffff000,%eax
   fdd72:\tja     fdd90 <ioctl@@GLIBC_2.2.5+0x60>
   fdd74:\tmov    0x18(%rsp),%rax
"""


def test_the_uprobe_goes_after_the_syscall_only_where_the_code_allows():
    assert probesite.branch_in(GLIBC_IOCTL) == (0xfdd72, 0x30)
    site = probesite.ProbeSite("/lib/libc.so.6", 0xfdd72, "+48(%sp)", True)
    assert "w1=+8(+48(%sp)):x64" in site.fetch and site.event == model.UPROBE_AFTER
    assert probesite.ProbeSite.parse(site.text()) == site
    assert probesite.ProbeSite.parse("/lib/libc.so.6:0xfdd30:%dx").after is False

    def changed(old, new):
        assert old in GLIBC_IOCTL
        return GLIBC_IOCTL.replace(old, new)
    # each of these keeps the probe at the entry
    for text in (changed("mov    %rdx,0x30(%rsp)", "mov    %rcx,0x30(%rsp)"),  # not saved
                 changed("xor    %eax,%eax", "je     fdd90"),             # a branch before
                 changed("mov    %eax,%edx", "mov    %eax,%esi"),         # request lost
                 changed("mov    %eax,%edx", "add    $0x8,%rsp"),         # the slot moves
                 changed("ja     fdd90", "jmp    fdd90"),                 # not conditional
                 changed("sub    $0x58,%rsp", "push   %rbx"),              # another frame
                 "", "garbage\n"):
        assert probesite.branch_in(text) is None


# --- events and the model (pure) ------------------------------------------------------------

def line(tid, ts, event, body, tgid=None, comm="vmm"):
    return f"{comm:>16}-{tid:<7} ({tgid or tid:>7}) [001] ..... {ts}: {event}: {body}"


def stack(tid, ts, frames, tgid=None):
    out = [f"{'vmm':>16}-{tid:<7} ({tgid or tid:>7}) [001] d..2. {ts}: <stack trace>"]
    return out + [f" => {f}" for f in frames]


DEASSIGN_STACK = ["trace_event_raw_event_sched_switch", "__schedule", "schedule",
                  "schedule_timeout", "wait_for_completion", "__synchronize_srcu",
                  "kvm_io_bus_unregister_dev", "kvm_deassign_ioeventfd_idx", "kvm_vm_ioctl",
                  "__x64_sys_ioctl", "do_syscall_64"]
ASSIGN_STACK = ["__schedule", "schedule", "wait_for_completion", "__synchronize_srcu",
                "kvm_io_bus_register_dev", "kvm_assign_ioeventfd_idx", "kvm_vm_ioctl"]
IOEVENTFD = 0x4040AE79


def boot_trace(assign_stack=None, deassign_ms=6.0, uprobe=True):
    """A VMM (pid 100) that creates a VM and a vCPU, registers two ioeventfds (a second
    thread, 101, runs the vCPU), then deassigns one: times in ms, 'mono' clock."""
    def t(ms):
        return f"{1000 + ms / 1000:.6f}"
    L = [line(100, t(0), "sched_process_exec", "filename=/usr/bin/vmm pid=100 old_pid=100"),
         line(100, t(1), "sys_enter", "NR 16 (3, ae01, 0, 0, 0, 0)"),
         line(100, t(1.2), "sys_exit", "NR 16 = 4"),
         line(101, t(2), "sys_enter", "NR 16 (4, ae41, 0, 0, 0, 0)", tgid=100),
         line(101, t(2.1), "sys_exit", "NR 16 = 5", tgid=100)]
    ms = 3.0
    for k in range(2):
        if uprobe:
            L.append(line(100, t(ms), "kvm_ioctl", f"(0x7f00) fd=4 cmd=0x4040ae79 arg=0x1000 "
                                                   f"w0=0x0 w1=0x{0xd0000000 + 8 * k:x} "
                                                   f"w2=0x800000004 w3=0x0"))
        L.append(line(100, t(ms), "sys_enter", "NR 16 (4, 4040ae79, 1000, 0, 0, 0)"))
        if assign_stack:
            L.append(line(100, t(ms + 0.01), "sched_switch",
                          "prev_comm=vmm prev_pid=100 prev_prio=120 prev_state=D ==> "
                          "next_comm=swapper/1 next_pid=0 next_prio=120"))
            L += stack(100, t(ms + 0.01), assign_stack)
        L.append(line(100, t(ms + 0.5), "sys_exit", "NR 16 = 0"))
        ms += 1
    if uprobe:
        L.append(line(100, t(ms), "kvm_ioctl", "(0x7f00) fd=4 cmd=0x4040ae79 arg=0x1000 "
                                               "w0=0x0 w1=0xd0000008 w2=0x800000004 w3=0x4"))
    L.append(line(100, t(ms), "sys_enter", "NR 16 (4, 4040ae79, 1000, 0, 0, 0)"))
    L.append(line(100, t(ms + 0.01), "sched_switch",
                  "prev_comm=vmm prev_pid=100 prev_prio=120 prev_state=D ==> "
                  "next_comm=swapper/1 next_pid=0 next_prio=120"))
    L += stack(100, t(ms + 0.01), DEASSIGN_STACK)
    L.append(f"  kworker/0:1-11 (     11) [000] d..2. {t(ms + deassign_ms)}: sched_wakeup: "
             "comm=vmm pid=100 prio=120 target_cpu=001")
    L.append(line(100, t(ms + deassign_ms + 0.02), "sys_exit", "NR 16 = 0"))
    L.append(line(100, t(ms + deassign_ms + 1), "sys_enter", "NR 3 (5)"))
    L.append(line(100, t(ms + deassign_ms + 1.1), "sys_exit", "NR 3 = 0"))
    L.append(line(100, t(ms + deassign_ms + 2), "sched_process_exit",
                  "comm=vmm pid=100 prio=120 group_dead=true"))
    return "\n".join(L) + "\n"


def test_the_parser_attaches_stacks_and_reads_tgids():
    evs = tracefs.parse_events(boot_trace(ASSIGN_STACK))
    switches = [e for e in evs if e.name == "sched_switch"]
    assert len(switches) == 3 and all(e.stack for e in switches)
    assert switches[-1].stack[5] == "__synchronize_srcu"
    assert {e.tgid for e in evs if e.tid == 101} == {100}
    assert tracefs.parse_events("garbage\n => orphan frame\n\n") == []


def test_a_deferred_free_host_pays_at_the_deassign():
    s = model.build(tracefs.parse_events(boot_trace()), 1e9, None)
    assert s.root == 100
    kinds = {c.name: c.kind for c in s.ioctls}
    assert kinds["KVM_CREATE_VM"] == "system" and kinds["KVM_CREATE_VCPU"] == "vm"
    assert [c.describe for c in s.ioctls if c.name == "KVM_IOEVENTFD"] == [
        "assign MMIO 0xd0000000 len 4", "assign MMIO 0xd0000008 len 4",
        "deassign MMIO 0xd0000008 len 4"]
    deassign = s.ioctls[-1]
    assert len(deassign.sleeps) == 1 and deassign.sleeps[0].waker == "kworker/0:1"
    # the sleep ends when the thread runs again (its sys_exit), not at a switch-in tracefs
    # did not show
    assert deassign.sleeps[0].ns == pytest.approx(6.01e6, rel=1e-3)
    w = attribute.classify(deassign.sleeps[0])
    assert w.kind == "srcu" and w.path_text == ("__synchronize_srcu <- "
                                                "kvm_io_bus_unregister_dev <- "
                                                "kvm_deassign_ioeventfd_idx <- kvm_vm_ioctl")
    summ = attribute.summary(s, 250)
    assert summ["behaviour"] == "deferred" and summ["registrations"] == 2
    assert "deassign MMIO 0xd0000008 len 4 waited 6.01 ms (1.5 jiffies at HZ=250) behind the " \
           "grace period the 2 registrations before it started" in summ["verdict"]
    assert list(summ["milestones_ms"])[:3] == ["exec", "KVM_CREATE_VM",
                                               "first KVM_CREATE_VCPU"]
    assert summ["srcu_share"] == pytest.approx(summ["srcu_wait_ms"] / summ["startup_ms"])


def test_a_pre_6_18_host_pays_at_every_registration():
    s = model.build(tracefs.parse_events(boot_trace(ASSIGN_STACK)), 1e9, 100)
    summ = attribute.summary(s, 100)
    assert summ["behaviour"] == "sync"
    assert "2 of 2 registrations slept in a grace period" in summ["verdict"]


def test_on_one_cpu_a_registration_preempted_by_its_grace_period_still_paid_for_it():
    # one CPU: the work that runs the grace period preempts the thread that waits for it
    # (R+, a stack through __cond_resched), which then finds it over and never sleeps
    preempted = ["__schedule", "preempt_schedule_common", "__cond_resched",
                 "wait_for_completion", "__synchronize_srcu", "kvm_io_bus_register_dev",
                 "kvm_assign_ioeventfd_idx", "kvm_vm_ioctl"]
    text = boot_trace(preempted).replace("prev_state=D ==> next_comm=swapper/1 next_pid=0",
                                         "prev_state=R+ ==> next_comm=kworker/0:1 next_pid=11",
                                         2)
    s = model.build(tracefs.parse_events(text), 1e9, 100)
    waits = [attribute.classify(sl) for c in s.ioctls[2:4] for sl in c.sleeps]
    assert [(w.kind, w.function) for w in waits] == [("srcu", "__synchronize_srcu")] * 2
    assert "preempted" in waits[0].label
    summ = attribute.summary(s, 250)
    assert summ["behaviour"] == "sync" and "2 of 2 registrations" in summ["verdict"]
    # preempted anywhere else is the scheduler's, not a grace period's
    other = model.Sleep(0.0, "R", ["__schedule", "preempt_schedule_common", "__cond_resched",
                                   "kvm_vcpu_ioctl"])
    assert attribute.classify(other).kind == "preempted"


def test_a_probe_after_the_syscall_decodes_the_call_that_just_returned():
    # the same start-up with each uprobe hit moved to just after its call returned
    lines, held, out = boot_trace().splitlines(), None, []
    for ln in lines:
        if " kvm_ioctl: " in ln:
            held = ln.replace(" kvm_ioctl: ", f" {model.UPROBE_AFTER}: ")
            continue
        out.append(ln)
        if held and "sys_exit: NR 16" in ln:
            ts = re.search(r"\] \S+ (\S+): ", ln).group(1)      # hit when the call returned
            out.append(re.sub(r"(\] \S+ )\S+(: )", rf"\g<1>{ts}\g<2>", held, count=1))
            held = None
    s = model.build(tracefs.parse_events("\n".join(out) + "\n"), 1e9, None)
    assert [c.describe for c in s.ioctls if c.name == "KVM_IOEVENTFD"] == [
        "assign MMIO 0xd0000000 len 4", "assign MMIO 0xd0000008 len 4",
        "deassign MMIO 0xd0000008 len 4"]
    assert s.uprobe_hits == 3 and attribute.summary(s, 250)["behaviour"] == "deferred"
    # a hit after a call that does not match (another fd) decodes nothing
    wrong = "\n".join(out).replace("fd=4 cmd=0x4040ae79 arg=0x1000 w0=0x0 w1=0xd0000000",
                                   "fd=7 cmd=0x4040ae79 arg=0x1000 w0=0x0 w1=0xd0000000")
    s = model.build(tracefs.parse_events(wrong + "\n"), 1e9, None)
    assert [c.describe for c in s.ioctls if c.name == "KVM_IOEVENTFD"][0] == ""


def test_the_timer_chain_says_why_the_deassign_waited():
    # the first assign (at 3 ms) queues the grace period's work one jiffy out (HZ=250:
    # 4 ms jiffies; the assign falls 0.25 into jiffy 1000); the wheel files it for jiffy
    # 1002; it fires at 10 ms and the deassign (asleep from 5.01 ms) returns at 10.03 ms
    s = model.build(tracefs.parse_events(boot_trace(deassign_ms=5.0)), 1e9, None)
    timers = tracefs.parse_events("\n".join([
        line(100, "1000.003000", "timer_start", "timer=00000000aa function="
             "delayed_work_timer_fn expires=1001 [timeout=1] bucket_expiry=1002 cpu=1 idx=3 "
             "flags=I"),
        line(100, "1000.003100", "timer_start", "timer=00000000bb function="
             "delayed_work_timer_fn expires=76000 [timeout=75000] bucket_expiry=76001"),
        line(0, "1000.010000", "timer_expire_entry", "timer=00000000aa function="
             "delayed_work_timer_fn now=1002 baseclk=1002", comm="<idle>"),
        line(11, "1000.010010", "workqueue_execute_start",
             "work struct 00000000cc: function process_srcu", comm="kworker/1:1"),
    ]) + "\n")
    summ = attribute.summary(s, 250, timers)
    (w,) = [w for w in summ["waits"] if w.get("why")]
    y = w["why"]
    assert (y["armed_jiffy"], y["due_jiffy"], y["bucket_jiffy"], y["fired_jiffy"]) == (
        1000, 1001, 1002, 1002)
    assert y["fired_after_jiffies"] == pytest.approx(1.75)
    assert y["armed_phase"] == pytest.approx(0.25)
    assert y["work_ms"] == pytest.approx(10.01) and y["wait_end_after_fire_ms"] == \
        pytest.approx(0.02, abs=1e-6)
    text = attribute.why_text(w)
    assert "queued the grace period's work for jiffy 1001, which the timer wheel filed " \
           "for jiffy 1002" in text and "1.75 jiffies later" in text
    # a timer that fired after the call had returned did not end its wait: no chain
    late = [e for e in timers if e.name != "timer_expire_entry"] + tracefs.parse_events(
        line(0, "1000.012000", "timer_expire_entry", "timer=00000000aa function="
             "delayed_work_timer_fn now=1003 baseclk=1003", comm="<idle>") + "\n")
    assert not any(w.get("why") for w in attribute.summary(s, 250, late)["waits"])
    # without timer events, or without HZ, nothing is added
    assert not any(w.get("why") for w in attribute.summary(s, 250)["waits"])
    assert not any(w.get("why") for w in attribute.summary(s, None, timers)["waits"])


def test_a_long_wait_before_any_registration_is_not_the_follow_up():
    # a memslot change waits 0.64 ms for a grace period before the first registration; the
    # deassign after the registrations returns at once
    stack_ = ["__schedule", "schedule", "wait_for_completion", "__synchronize_srcu",
              "kvm_swap_active_memslots", "kvm_set_memslot", "kvm_vm_ioctl"]
    early = [line(100, "1000.002200", "sys_enter", "NR 16 (4, 4020ae46, 1000, 0, 0, 0)"),
             line(100, "1000.002210", "sched_switch",
                  "prev_comm=vmm prev_pid=100 prev_prio=120 prev_state=D ==> "
                  "next_comm=swapper/1 next_pid=0 next_prio=120"),
             *stack(100, "1000.002210", stack_),
             line(100, "1000.002850", "sys_exit", "NR 16 = 0")]
    lines = boot_trace(deassign_ms=0.1).splitlines()
    lines[5:5] = early
    s = model.build(tracefs.parse_events("\n".join(lines) + "\n"), 1e9, 100)
    summ = attribute.summary(s, 250)
    assert summ["srcu_waits"] == 2
    assert summ["behaviour"] == "none"
    assert "KVM_SET_USER_MEMORY_REGION waited 0.64 ms for one no ioeventfd started" \
        in summ["verdict"]


def test_a_vmm_with_no_ioeventfd_at_start_up_shows_neither_regression():
    # QEMU 10 registers no ioeventfd while it starts a microvm: a memslot change that waits
    # for some other grace period is not taken for the follow-up (no uprobe is needed to
    # count zero registrations)
    stack_ = ["__schedule", "schedule", "wait_for_completion", "__synchronize_srcu",
              "kvm_swap_active_memslots", "kvm_set_memslot", "kvm_vm_ioctl"]
    lines = boot_trace().splitlines()
    lines = lines[:5] + [
        line(100, "1000.002200", "sys_enter", "NR 16 (4, 4020ae46, 1000, 0, 0, 0)"),
        line(100, "1000.002210", "sched_switch",
             "prev_comm=vmm prev_pid=100 prev_prio=120 prev_state=D ==> "
             "next_comm=swapper/1 next_pid=0 next_prio=120"),
        *stack(100, "1000.002210", stack_),
        line(100, "1000.003850", "sys_exit", "NR 16 = 0")] + lines[-3:]
    s = model.build(tracefs.parse_events("\n".join(lines) + "\n"), 1e9, 100)
    assert not any(c.name == "KVM_IOEVENTFD" for c in s.ioctls)
    summ = attribute.summary(s, 250)
    assert summ["srcu_waits"] == 1 and summ["registrations"] == 0
    assert summ["behaviour"] == "none" and summ["cost"] is None
    assert summ["verdict"].startswith("the VMM made no KVM_IOEVENTFD call during start-up")
    assert "KVM_SET_USER_MEMORY_REGION waited 1.64 ms" in summ["verdict"]


def test_without_the_uprobe_the_stack_still_tells_registrations_apart():
    s = model.build(tracefs.parse_events(boot_trace(uprobe=False, deassign_ms=0.1)), 1e9,
                    100)
    assert all(c.args == {} for c in s.ioctls if c.name == "KVM_IOEVENTFD")
    summ = attribute.summary(s, 250)
    assert summ["behaviour"] in ("none", "unknown") and summ["srcu_waits"] == 1


def test_a_recorded_qemu_start_up_is_read_back():
    with gzip.open(QEMU_TRACE, "rt") as f:
        events = tracefs.parse_events(f.read())
    marks = [(k[0], e.ts, k[1]) for e in events if e.name == "tracing_mark_write"
             for k in [tracefs.calibration_mark(e.body)] if k]
    s = model.build(events, tracefs.ns_per_tick("x86-tsc", marks), None, port=0x80)
    summ = attribute.summary(s, 250)
    # QEMU's probe for many ioeventfds: 7 port registrations at port 0, deassigned again;
    # then the firmware brings up 2 virtio-mmio devices and QEMU registers their notify
    # addresses while the guest runs
    regs = [c.describe for c in s.ioctls if c.name == "KVM_IOEVENTFD"]
    assert regs[:7] == [f"assign port 0x0 len 2 datamatch 0x{k:x}" for k in range(7)]
    assert sum(1 for r in regs if r.startswith("deassign")) == 7
    assert [r for r in regs if "MMIO" in r] == ["assign MMIO 0xfeb02c50 len 4 datamatch 0x0",
                                                "assign MMIO 0xfeb02e50 len 4 datamatch 0x0"]
    assert [(p, v) for _, d, p, v in s.ports if p == 0x84] == [(0x84, 2)]
    assert summ["behaviour"] == "deferred" and "datamatch 0x6" in summ["verdict"]
    assert summ["milestones_ms"]["first KVM_RUN"] < summ["milestones_ms"]["process end"]


def recorded_summary() -> dict:
    with gzip.open(QEMU_TRACE, "rt") as f:
        events = tracefs.parse_events(f.read())
    marks = [(k[0], e.ts, k[1]) for e in events if e.name == "tracing_mark_write"
             for k in [tracefs.calibration_mark(e.body)] if k]
    s = model.build(events, tracefs.ns_per_tick("x86-tsc", marks), None, port=0x80)
    return attribute.summary(s, 250)


def lab_doc(summaries: list[dict], kc: dict) -> dict:
    """What a lab run of trace:qemu-microvm:2:R leaves (the inner job's result)."""
    return {"host": {"kernel": "6.1.0-57-amd64", "package": "linux-image-6.1.0-57-amd64"},
            "kernel_check": kc,
            "results": [{"job": "trace:qemu-microvm:2:3", "ok": True, "error": None,
                         "data": {"workload": "qemu-microvm:2",
                                  "runs": [{"rc": 1, "summary": x} for x in summaries]}}]}


def test_a_lab_matrix_row_says_who_paid_and_whether_kernel_check_agrees():
    from pyvmm.lab.experiments import matrix
    from pyvmm.lab.builds.variant import parse_variant
    deferred = recorded_summary()
    sync = attribute.summary(model.build(tracefs.parse_events(boot_trace(ASSIGN_STACK)),
                                         1e9, 100), 250)
    kc_defer = {"behaviour": "deferred", "stall_expected": True, "mechanism": "call_srcu"}
    kc_sync = {"behaviour": "sync", "stall_expected": None,
               "mechanism": "synchronize_srcu_expedited"}
    row = matrix.trace_row(parse_variant("6.1+defer-free"),
                           lab_doc([deferred, deferred, sync], kc_defer), "/x")
    assert row["behaviour"] == "deferred" and row["same_verdict"] == 2 and row["runs"] == 3
    assert row["paid_by"] == "KVM_IOEVENTFD deassign port 0x0 len 2 datamatch 0x6"
    assert row["longest_wait_ms"] == pytest.approx(deferred["cost"]["longest_ms"])
    assert row["longest_wait_jiffies"] == pytest.approx(row["longest_wait_ms"] / 4)
    assert row["agrees"] is True and row["run"] == "/x/results.json"
    row = matrix.trace_row(parse_variant("6.1"), lab_doc([sync], kc_sync), "/x")
    assert (row["verdict"], row["paid_by"], row["agrees"]) == ("sync-on-register",
                                                               "2 of 2 registrations", True)
    # a measurement that contradicts the source is shown as such
    row = matrix.trace_row(parse_variant("6.1"), lab_doc([deferred], kc_sync), "/x")
    assert row["agrees"] is False
    bad = lab_doc([], kc_sync)
    bad["results"][0].update(ok=False, error="QEMU exited with status 1")
    with pytest.raises(LabError, match="QEMU exited with status 1"):
        matrix.trace_row(parse_variant("6.1"), bad, "/x")


def test_strace_output_gives_times_without_sleeps():
    text = ("200 1700000000.000100 ioctl(11, KVM_CREATE_VM, 0) = 12 <0.000350>\n"
            "200 1700000000.001000 ioctl(12, KVM_IOEVENTFD, {datamatch=0, addr=0, len=2, "
            "fd=13, flags=KVM_IOEVENTFD_FLAG_PIO|KVM_IOEVENTFD_FLAG_DEASSIGN}) = 0 <0.006000>\n"
            "201 1700000000.002000 ioctl(1, TCGETS, 0x7ffe) = -1 ENOTTY (Inappropriate) "
            "<0.000010>\n"
            "garbage\n")
    s = strace.from_strace(text, 50_000_000)
    assert [c.name for c in s.ioctls] == ["KVM_CREATE_VM", "KVM_IOEVENTFD"]
    assert s.ioctls[1].ns == pytest.approx(6e6)
    assert s.milestones["process end"] == 50e6


def test_workloads_are_checked_before_anything_runs():
    for bad, why in (("nope", "unknown workload"), ("qemu-microvm:x", "number"),
                     ("qemu-microvm:99", "transports")):
        with pytest.raises(Exception, match=why):
            workloads.parse(bad, qemu="/bin/true")
    w = workloads.parse("qemu-microvm:3", qemu="/usr/bin/qemu-system-x86_64")
    assert w.argv.count("virtio-rng-device") == 3 and w.ok_status == {1} and w.port == 0x80
    p = workloads.parse("pyvmm-boot:2")
    assert "ioev:2" in " ".join(p.argv) and p.captures_json


def test_compare_rows_apply_the_change_rule():
    def doc(ms):
        return {"runs": [{"summary": {"startup_ms": x, "srcu_wait_ms": 1.0,
                                      "milestones_ms": {"exec": 0.0, "first KVM_RUN": x / 2}}}
                         for x in ms]}
    a = [10 + k / 100 for k in range(12)]
    rows = {r["figure"]: r for r in tcompare.rows(doc(a), doc([2 * x for x in a]), 0.05)}
    assert rows["start-up ms"]["ratio"] == pytest.approx(2.0, rel=0.01)
    assert rows["start-up ms"]["change"] == "2.00x slower"
    assert rows["SRCU wait ms"]["change"] == "no change"
    assert "first KVM_RUN (ms)" in rows


# --- real traces (root, tracefs) ------------------------------------------------------------

def _no_tracing() -> str | None:
    if os.geteuid() != 0:
        return "tracing needs root"
    if not os.path.isdir(os.path.join(tracefs.TRACEFS, "instances")):
        return f"no tracefs instances at {tracefs.TRACEFS}"
    if not os.path.exists(os.path.join(tracefs.TRACEFS, "events/raw_syscalls")):
        return "no raw_syscalls tracepoints"
    return None


def pyvmm_trace(*args, cwd="/"):
    return subprocess.run([sys.executable, "-m", "pyvmm", "trace", *args],
                          capture_output=True, text=True, timeout=600, cwd=cwd)


def _nothing_left_behind():
    inst = os.path.join(tracefs.TRACEFS, "instances")
    assert not [n for n in os.listdir(inst) if n.startswith(record.PREFIX)
                and n.endswith(f"-{os.getpid()}")]
    with open(os.path.join(tracefs.TRACEFS, "uprobe_events")) as f:
        assert "kvm_ioctl" not in f.read()


@pytest.mark.kvm
def test_tracing_pyvmms_own_boot_agrees_with_its_phase_timer(tmp_path):
    problem = _no_tracing()
    if problem:
        pytest.skip(problem)
    r = pyvmm_trace("--vmm", "pyvmm-boot:1", "--repeat", "2", "--json", "--out",
                    str(tmp_path))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["schema"] == "pyvmm.trace/1" and doc["status"] == "complete"
    for run in doc["runs"]:
        names = [c["name"] for c in run["ioctls"]]
        assert names[0] == "KVM_GET_API_VERSION" or "KVM_CREATE_VM" in names
        slot1 = [c for c in run["ioctls"] if c["name"] == "KVM_SET_USER_MEMORY_REGION"
                 and c["args"].get("slot") == 1]
        assert len(slot1) == 1 and slot1[0]["args"]["gpa"] == 0xE0000000
        regs = [c for c in run["ioctls"] if c["name"] == "KVM_IOEVENTFD"]
        assert [c["what"] for c in regs] == ["assign MMIO 0xd0000000 len 4"]
        if run["summary"]["behaviour"] == "deferred":
            # two instruments, one step: the trace's ioctl within 20% of the phase timer
            (a,) = run["agreement"]
            assert a["step"] == "memslot" and 0.8 <= a["ratio"] <= 1.2, a
    (out,) = [d for d in os.listdir(tmp_path)]
    saved = json.load(open(os.path.join(tmp_path, out, "trace.json")))
    assert len(saved["runs"]) == 2 and os.path.exists(os.path.join(tmp_path, out,
                                                                   "trace-2.txt"))
    _nothing_left_behind()


@pytest.mark.kvm
@pytest.mark.skipif(not shutil.which("qemu-system-x86_64"),
                    reason="qemu-system-x86_64 not installed (scripts/lab-tools.sh --install)")
def test_tracing_qemu_microvm_finds_its_ioeventfds_and_their_waits(tmp_path):
    problem = _no_tracing()
    if problem:
        pytest.skip(problem)
    r = pyvmm_trace("--vmm", "qemu-microvm:2", "--json", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    run = json.loads(r.stdout)["runs"][0]
    assert run["rc"] == 1
    mmio = [c["args"]["addr"] for c in run["ioctls"] if c["name"] == "KVM_IOEVENTFD"
            and not c["args"].get("pio") and not c["args"].get("deassign")]
    assert len(mmio) == 2 and all(a & 0x1FF == 0x50 for a in mmio)
    assert [p["value"] for p in run["ports"] if p["port"] == 0x84] == [2]
    waits = run["summary"]["waits"]
    assert waits and all(w["path"].startswith(("__synchronize_srcu", "synchronize_srcu"))
                         for w in waits)
    _nothing_left_behind()


@pytest.mark.parametrize("args,why", [
    ((), "nothing to trace"), (("--vmm", "nope"), "unknown workload"),
    (("--port", "xyz", "--", "true"), "--port xyz"), (("--repeat", "0", "--", "true"),
                                                      "--repeat 0"),
    (("--vmm", "pyvmm-boot", "--", "true"), "not both"),
    (("--", "/no/such/vmm"), "not found")])
def test_bad_trace_arguments_are_one_line(args, why):
    r = pyvmm_trace(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert why in r.stderr and "Traceback" not in r.stderr


def test_trace_findings_are_the_majority_verdict_with_its_cost():
    from pyvmm.trace.runs import findings
    assert findings([]) is None

    def run(b, wait):
        cost = {"paid_by": "KVM_IOEVENTFD deassign", "wait_ms": wait, "longest_ms": wait,
                "waits": 1} if wait else None
        return {"summary": {"behaviour": b, "verdict": f"{b} sentence", "cost": cost,
                            "startup_ms": 40.0, "srcu_wait_ms": wait or 0.0,
                            "srcu_share": (wait or 0.0) / 40.0, "hz": 250}}
    f = findings([run("deferred", 6.0), run("deferred", 8.0), run("none", None)])
    assert f["verdict"] == "deferred-free follow-up" and f["regressions"] == ["stall"]
    assert (f["runs"], f["runs_agreeing"]) == (3, 2)
    assert f["regression_ms"] == 7.0 and f["paid_by"] == "KVM_IOEVENTFD deassign"
    assert findings([run("none", None)])["regressions"] == []
    assert findings([run("sync", 30.0)])["regressions"] == ["sync-on-register"]


def test_linux_microvm_devices_and_where_a_wait_falls():
    assert workloads.parse_blk("linux-microvm", "") == (1, 1)
    assert workloads.parse_blk("linux-microvm:4x2", "4x2") == (4, 2)
    for bad in ("4", "x2", "4x0", "99x1", "1x99"):
        with pytest.raises(Exception, match="linux-microvm:BxQ"):
            workloads.parse_blk(f"linux-microvm:{bad}", bad)
    argv = workloads.linux_microvm_argv("qemu", "/k", "/i", 2, 4)
    assert argv.count("virtio-blk-device,drive=b1,num-queues=4") == 1
    assert "acpi=off" in argv[2] and "rdinit=/init" in " ".join(argv)
    ms = {"first KVM_RUN": 10.0, "init started": 50.0}
    assert [attribute.phase_of(t, ms) for t in (5.0, 20.0, 60.0)] == [
        "VMM set-up", "guest boot", "after init"]
    assert attribute.phase_of(20.0, {"first KVM_RUN": 10.0}) == "guest boot"
    with pytest.raises(Exception, match="lab's Linux guest"):
        workloads.linux_microvm("linux-microvm", "", "qemu", "/nonexistent", "/nonexistent")


def test_a_wait_for_interrupt_routing_is_kvm_irq_srcu_not_the_regressions():
    from pyvmm.trace.model import Sleep
    routing = Sleep(0.0, "D", ["__schedule", "schedule", "wait_for_completion",
                               "__synchronize_srcu", "synchronize_srcu_expedited",
                               "kvm_set_irq_routing", "kvm_vm_ioctl"])
    bus = Sleep(0.0, "D", ["__schedule", "schedule", "__synchronize_srcu",
                           "kvm_io_bus_unregister_dev", "kvm_vm_ioctl"])
    assert attribute.classify(routing).kind == "irq_srcu"
    assert attribute.classify(bus).kind == "srcu"


# --- where SRCU's grace-period work runs (pyvmm.trace.gpwork) -------------------------------

GPWORK_TRACE = """\
# tracer: nop
         python3-100     (  100) [000] ..... 10.000000: tracing_mark_write: pyvmm-gpwork-begin 0
         python3-100     (  100) [000] d.h.. 10.000010: workqueue_queue_work: work struct=0000000011112222 function=process_srcu workqueue=rcu_gp req_cpu=8192 cpu=0
         python3-100     (  100) [000] d.... 10.000012: sched_switch: prev_comm=python3 prev_pid=100 prev_prio=120 prev_state=R+ ==> next_comm=kworker/0:1 next_pid=7 next_prio=120
     kworker/0:1-7       (    7) [000] ..... 10.000013: workqueue_execute_start: work struct 0000000011112222: function process_srcu
     kworker/0:1-7       (    7) [000] ..... 10.000033: workqueue_execute_end: work struct 0000000011112222: function process_srcu
     kworker/0:1-7       (    7) [000] d.... 10.000035: sched_switch: prev_comm=kworker/0:1 prev_pid=7 prev_prio=120 prev_state=I ==> next_comm=python3 next_pid=100 next_prio=120
     kworker/1:2-9       (    9) [001] ..... 10.000040: workqueue_execute_start: work struct 00000000aaaabbbb: function srcu_invoke_callbacks
     kworker/1:2-9       (    9) [001] ..... 10.000045: workqueue_execute_end: work struct 00000000aaaabbbb: function srcu_invoke_callbacks
     kworker/1:2-9       (    9) [001] ..... 10.000046: workqueue_execute_start: work struct 00000000cccc0000: function vmstat_update
     kworker/1:2-9       (    9) [001] ..... 10.000050: workqueue_execute_end: work struct 00000000cccc0000: function vmstat_update
         python3-100     (  100) [000] d.... 10.000060: sched_switch: prev_comm=python3 prev_pid=100 prev_prio=120 prev_state=S ==> next_comm=swapper/0 next_pid=0 next_prio=120
          <idle>-0       (-------) [000] d.... 10.000070: sched_switch: prev_comm=swapper/0 prev_pid=0 prev_prio=120 prev_state=R ==> next_comm=python3 next_pid=100 next_prio=120
         python3-100     (  100) [000] ..... 10.000080: tracing_mark_write: pyvmm-gpwork-end 0
         python3-100     (  100) [000] ..... 10.000100: tracing_mark_write: pyvmm-gpwork-begin 1
         python3-100     (  100) [000] ..... 10.000110: tracing_mark_write: pyvmm-gpwork-end 1
"""


def test_gpwork_places_srcu_work_and_the_registrants_switches():
    """Hand-written trace text: the grace period's work on the registrant's CPU after it
    was preempted, callbacks on the other CPU, an unrelated work item ignored, a sleep
    counted apart, and a second window with nothing in it."""
    from pyvmm.trace import gpwork
    events = tracefs.parse_events(GPWORK_TRACE)
    w0, w1 = gpwork.summarize(events, tid=100, cpu=0, scale=1e9)
    assert w0["window"] == 0 and w0["window_ns"] == pytest.approx(80_000)
    work = w0["srcu_work"]
    assert (work["here"], work["elsewhere"]) == (1, 1)
    assert work["here_ns"] == pytest.approx(20_000) and work["elsewhere_ns"] == \
        pytest.approx(5_000)
    assert w0["srcu_functions"] == {"process_srcu": 1, "srcu_invoke_callbacks": 1}
    assert w0["srcu_queued"] == {"here": 1, "elsewhere": 0, "workqueues": ["rcu_gp"]}
    sw = w0["switches"]
    assert (sw["preempted"], sw["slept"]) == (1, 1)
    assert sw["to"] == {"kworker/N:N": 1, "swapper/N": 1}
    assert sw["off_cpu_ns"] == pytest.approx(23_000 + 10_000)
    assert w1["srcu_work"]["here"] == 0 and w1["switches"]["preempted"] == 0


@pytest.mark.kvm
def test_gpwork_traces_registrations_on_this_host():
    problem = _no_tracing()
    if problem:
        pytest.skip(problem)
    from pyvmm.trace import gpwork
    lacking = [e for e in gpwork.EVENTS
               if not os.path.exists(os.path.join(tracefs.TRACEFS, "events", e))]
    if lacking:
        pytest.skip(f"this kernel lacks the tracepoints {', '.join(lacking)}")
    before = os.sched_getaffinity(0)
    r = gpwork.run(8, 2)
    assert os.sched_getaffinity(0) == before
    assert r["n"] == 8 and len(r["windows"]) == 2 and r["cpu"] in before
    for w in r["windows"]:
        assert w["burst_wall_ns"] > 0 and 0 < w["reg_wall_ns"] <= w["burst_wall_ns"]
        assert set(w["srcu_functions"]) <= set(gpwork.SRCU_FUNCTIONS)
    inst = os.path.join(tracefs.TRACEFS, "instances")
    assert not [n for n in os.listdir(inst) if n == f"pyvmm-gpwork-{os.getpid()}"]
    with pytest.raises(Exception, match="N >= 1"):
        gpwork.run(0, 1)
