"""What kernel-check's facts predict (pure, below every room that measures): from the
mechanism `kvm_io_bus_register_dev()` frees the replaced bus with, whether the memslot
swap waits and whether SRCU has the kick, whether a stall should follow the
registrations and whether each registration's grace period is worked at once on its
CPU; and a kernel-check written by an older pyvmm read with today's predictions, so
that `pyvmm report`, `lab remedies` and the fleet judge old runs by today's rule. The
facts themselves come from the disassembly (pyvmm.lab.builds.kcheck)."""

from __future__ import annotations

from . import stats


def expected_stall(mechanism: str, memslot_waits: bool | None, kick: bool) -> bool | None:
    """Whether the next synchronous SRCU waiter should wait behind what registration left.
    A normal grace period left pending by call_srcu is what it waits behind, unless
    srcu-kick runs that grace period's work at once for the expedited request. So does
    one followed by srcu_expedite_current(): that call queues an expedited callback but
    does not shorten the delay the grace period's work is already queued with (the
    kernel's comment: a grace period that is sleeping finishes its sleep first), and the
    work is queued a jiffy out. call_srcu_expedited starts an expedited one: nothing
    slow is left. A work item: the check cannot see what the worker does."""
    if mechanism in ("call_srcu", "call_srcu + srcu_expedite_current") and not kick:
        return bool(memslot_waits) if memslot_waits is not None else None
    if mechanism == "work item":
        return None
    return False


def runs_gp_at_once(mechanism: str) -> bool:
    """Whether registration starts a grace period whose work is queued with no delay on
    the registering CPU. call_srcu_expedited() asks for an expedited grace period:
    srcu_funnel_gp_start() raises an irq_work on this CPU, whose handler queues SRCU's
    work on rcu_gp (a per-CPU workqueue, so this CPU's worker) with the delay
    srcu_get_delay() gives, 0 when an expedited grace period is wanted. The registrant
    waits for nothing, but the worker is woken beside it at once, and a registration
    can pay the grace period's work in wall time: the sweep's verdict, which compares
    wall times, may read it as sync-on-register or as deferred-free, and the check
    cannot say which (that is the scheduler's choice, not the code's)."""
    return mechanism == "call_srcu_expedited"


def refreshed(kc: dict) -> dict:
    """A kernel-check dict written by an older pyvmm with today's predictions (from the
    facts it kept: the mechanism, whether the memslot swap waits, the kick)."""
    if "mechanism" not in kc:
        return kc
    return dict(kc, stall_expected=expected_stall(kc["mechanism"], kc.get("memslot_swap_waits"),
                                                  bool(kc.get("srcu_kick"))),
                gp_work_at_once=runs_gp_at_once(kc["mechanism"]))


def agreement(kc: dict, verdict) -> dict | None:
    """Today's agreement of a kernel-check (as written, any age) with a sweep's verdict
    (stats.Verdict); None when the verdict has no behaviour to compare."""
    if verdict.behaviour not in ("sync", "deferred") or "behaviour" not in kc:
        return None
    return stats.kernel_check_agreement(refreshed(kc), verdict.behaviour, verdict.stall_ns,
                                        verdict.first_deassign_excess_ns)
