"""Attribution for the concurrency checks (pure: no KVM here, so it is unit-tested with
hand-made event sequences). docs/checks.md states the rules in prose.

Model. A mutator thread performs operations 0, 1, 2, ... on the VM. Around operation k
it publishes a sequence number: 2k+1 just before the ioctl, 2k+2 just after it returned.
So an even number names a settled state (0: the initial one, 2k+2: after operation k)
and an odd number an operation in flight.

The vCPU thread reads the sequence number right before each KVM_RUN (`start`) and right
after it returns (`end`). The check guests do at most one access per KVM_RUN, so every
access is pinned to one run. An access whose run has start == end and even saw one
settled state for its whole duration: its outcome must be the one that state allows.
Any other access is *ambiguous* (an operation began or ended during its run) and is
only checked for things that are wrong in every state.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Access:
    """One guest access, pinned to the KVM_RUN that performed it."""
    run: int              # index of the KVM_RUN in the check
    start: int            # sequence number read before that KVM_RUN
    end: int              # sequence number read after it returned
    kind: str             # "write" or "read"
    outcome: str          # what the VMM observed (check-specific words)
    detail: str = ""


@dataclass
class Violation:
    access: Access
    state: str | None     # the settled state, or None when ambiguous
    allowed: tuple[str, ...]
    why: str

    def to_dict(self) -> dict:
        a = self.access
        return {"run": a.run, "start_seq": a.start, "end_seq": a.end, "kind": a.kind,
                "outcome": a.outcome, "detail": a.detail, "state": self.state,
                "allowed": list(self.allowed), "why": self.why}


@dataclass
class Verdict:
    checked: int = 0          # accesses with a settled state
    ambiguous: int = 0        # accesses during an operation (only sanity-checked)
    outcomes: dict = field(default_factory=dict)   # (state, kind, outcome) -> count
    violations: list[Violation] = field(default_factory=list)

    def to_dict(self, limit: int = 20) -> dict:
        return {"checked": self.checked, "ambiguous": self.ambiguous,
                "violations": len(self.violations),
                "first_violations": [v.to_dict() for v in self.violations[:limit]],
                "outcomes": {" / ".join(k): v for k, v in sorted(self.outcomes.items())}}


def settled(start: int, end: int) -> bool:
    return start == end and start % 2 == 0


def state_at(seq: int, initial: str, after_ops: list[str]) -> str:
    """The settled state named by an even sequence number, for a mutator whose operation
    k leaves the VM in after_ops[k % len(after_ops)] (a repeating cycle)."""
    if seq % 2:
        raise ValueError(f"sequence {seq} is odd: an operation is in flight")
    if seq == 0:
        return initial
    return after_ops[(seq // 2 - 1) % len(after_ops)]


def judge(accesses, initial: str, after_ops: list[str], allowed: dict,
          never: frozenset = frozenset()) -> Verdict:
    """Check every access. allowed[(state, kind)] is the tuple of outcomes that state
    permits; outcomes in `never` are violations whatever the state."""
    v = Verdict()
    for a in accesses:
        if a.outcome in never:
            v.violations.append(Violation(a, None, (), f"'{a.outcome}' is wrong in any state"))
            key_state = "any"
        elif settled(a.start, a.end):
            state = state_at(a.start, initial, after_ops)
            ok = allowed[(state, a.kind)]
            v.checked += 1
            key_state = state
            if a.outcome not in ok:
                v.violations.append(Violation(
                    a, state, ok, f"{a.kind} saw '{a.outcome}' although the VM was settled "
                                  f"in state '{state}' for the whole KVM_RUN"))
        else:
            v.ambiguous += 1
            key_state = "in flight"
        key = (key_state, a.kind, a.outcome)
        v.outcomes[key] = v.outcomes.get(key, 0) + 1
    return v


# --- ioeventfd-ordering -------------------------------------------------------------------

ORDERING_INITIAL = "unassigned"
ORDERING_OPS = ["assigned", "unassigned"]          # op 2j assigns, op 2j+1 deassigns
ORDERING_ALLOWED = {("assigned", "write"): ("absorbed",),
                    ("unassigned", "write"): ("mmio",)}
# 'lost': the write neither exited nor signalled the eventfd; 'both': it did both.
ORDERING_NEVER = frozenset({"lost", "both"})


@dataclass(frozen=True, slots=True)
class Run:
    """What the vCPU thread records per KVM_RUN."""
    start: int
    end: int
    exit: str            # "mmio-write", "mmio-read", "pio-data", "pio-marker", or other
    value: int = 0       # data port value, or MMIO address
    signals: int = 0     # eventfd count read after the run (ordering check)


def ordering_accesses(runs: list[Run]) -> list[Access]:
    """Turn the ringloop guest's runs into doorbell-write accesses.

    A run ending in an MMIO write exit performed the write (outcome 'mmio', or 'both' if
    the eventfd also moved). The run after it only completes that instruction and reaches
    the marker. A run ending at the marker that does not follow an MMIO exit performed
    the write inside KVM: it must have signalled the eventfd once ('absorbed'), else
    'lost'."""
    out = []
    pending = False
    for i, r in enumerate(runs):
        if r.exit == "mmio-write":
            out.append(Access(i, r.start, r.end, "write", "both" if r.signals else "mmio",
                              f"MMIO write at {r.value:#x}"))
            pending = True
        elif r.exit == "pio-marker":
            if pending:
                pending = False
                if r.signals:
                    out.append(Access(i, r.start, r.end, "write", "both",
                                      "eventfd moved in the run that completed an MMIO exit"))
            else:
                out.append(Access(i, r.start, r.end, "write",
                                  "absorbed" if r.signals == 1 else
                                  ("lost" if r.signals == 0 else "both"),
                                  f"eventfd +{r.signals}"))
    return out


def judge_ordering(runs: list[Run]) -> Verdict:
    return judge(ordering_accesses(runs), ORDERING_INITIAL, ORDERING_OPS, ORDERING_ALLOWED,
                 ORDERING_NEVER)


# --- memslot-coherence --------------------------------------------------------------------

# The mutator's cycle at PROBE_GPA: add a read-write slot, delete it, add it read-only,
# move it away, move it back, delete it.
COHERENCE_INITIAL = "none"
COHERENCE_OPS = ["rw", "none", "ro", "none", "ro", "none"]
COHERENCE_OP_NAMES = ["add rw", "delete", "add ro", "move away", "move back", "delete"]
COHERENCE_ALLOWED = {
    ("none", "read"): ("mmio",), ("none", "write"): ("mmio",),
    ("rw", "read"): ("memory",), ("rw", "write"): ("memory",),
    ("ro", "read"): ("memory",), ("ro", "write"): ("mmio",),
}
# 'corrupt': the read returned neither the slot's pattern nor an MMIO exit.
COHERENCE_NEVER = frozenset({"corrupt"})


def coherence_accesses(runs: list[Run], pattern: int, sentinel: int) -> list[Access]:
    """Turn the readloop guest's runs into read and write accesses.

    Read: an MMIO read exit ('mmio'; the next run carries the sentinel to the data port),
    or a data-port exit not preceded by one ('memory' if the value is the pattern,
    'corrupt' otherwise). Write: an MMIO write exit ('mmio'), or a marker exit not
    preceded by one ('memory')."""
    out = []
    pending = None
    for i, r in enumerate(runs):
        if r.exit in ("mmio-read", "mmio-write"):
            kind = "read" if r.exit == "mmio-read" else "write"
            out.append(Access(i, r.start, r.end, kind, "mmio", f"MMIO {kind} at {r.value:#x}"))
            pending = kind
        elif r.exit == "pio-data":
            if pending == "read":
                pending = None
                if r.value != sentinel:
                    out.append(Access(i, r.start, r.end, "read", "corrupt",
                                      f"completed MMIO read reported {r.value:#x}, "
                                      f"not the sentinel {sentinel:#x}"))
            else:
                pending = None
                out.append(Access(i, r.start, r.end, "read",
                                  "memory" if r.value == pattern else "corrupt",
                                  f"value {r.value:#x}"))
        elif r.exit == "pio-marker":
            if pending == "write":
                pending = None
            else:
                pending = None
                out.append(Access(i, r.start, r.end, "write", "memory"))
    return out


def judge_coherence(runs: list[Run], pattern: int, sentinel: int) -> Verdict:
    return judge(coherence_accesses(runs, pattern, sentinel), COHERENCE_INITIAL,
                 COHERENCE_OPS, COHERENCE_ALLOWED, COHERENCE_NEVER)
