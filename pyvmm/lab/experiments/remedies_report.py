"""`pyvmm lab remedies`' report: the rows of a remedies run (remedies.rows) as one
Markdown table per HZ and as console Grids from one formatter, the answers to the two
questions the report was asked, and the block written between its markers in
docs/remedies.md."""

from __future__ import annotations

import os

from ...tables import Grid

BEGIN, END = "<!-- pyvmm lab remedies: begin -->", "<!-- pyvmm lab remedies: end -->"


def _s(sp: dict | None, fmt: str = "{:.2f}") -> str:
    """'median (least-greatest)' over the lab boots; one figure when there is one boot."""
    if sp is None:
        return "-"
    if sp["n"] == 1 or sp["min"] == sp["max"]:
        return fmt.format(sp["median"])
    return f"{fmt.format(sp['median'])} ({fmt.format(sp['min'])}-{fmt.format(sp['max'])})"


def _find(doc: dict, variant: str, hz: int, smp: int) -> dict | None:
    return next((r for r in doc["rows"] if (r["variant"], r["hz"], r["smp"]) ==
                 (variant, hz, smp)), None)


def _med(sp: dict | None) -> float | None:
    return None if sp is None else sp["median"]


HEADERS = ("remedy", "CPUs", "lab boots", "assign us: median, mean, p90",
           "per registration us: wall, registrant's CPU", "stall ms (jiffies); boots with one",
           "QEMU start-up: wait ms, paid by", "verdict; kernel-check")
LINUX_HEADER = ("Linux guest to /init: the regression's wait ms, paid by; every SRCU wait "
                "ms; time to init s")


def _linux(doc: dict) -> bool:
    """Whether the run booted the Linux guest (lab remedies --linux-guest)."""
    return any(r.get("linux_srcu_to_init_ms") for r in doc["rows"])


QEMU_COLUMN = HEADERS.index("QEMU start-up: wait ms, paid by")


def _traced(doc: dict) -> bool:
    """Whether the run traced QEMU's start-up (not with --trace-repeats 0, nor on arm64)."""
    return bool(doc.get("trace_repeats", 1))


def _columns(doc: dict, xs):
    """Headers or cells without the QEMU column when the run did not trace."""
    return xs if _traced(doc) else xs[:QEMU_COLUMN] + xs[QEMU_COLUMN + 1:]


def _headers(doc: dict) -> tuple[str, ...]:
    return _columns(doc, HEADERS + ((LINUX_HEADER,) if _linux(doc) else ()))


def _row(doc: dict, r: dict) -> list[str]:
    """A row's cells for this run's columns."""
    return _columns(doc, _cells(r, _linux(doc)))


def _cells(r: dict, linux: bool = False) -> list[str]:
    """One row's values, as the Markdown table and the console's table show them;
    `linux`: with the Linux guest's column."""
    stall = ("none" if not r["stalled_boots"] else
             f"{_s(r['stall_ms'])} ({_s(r['stall_jiffies'], '{:.1f}')}); "
             f"{r['stalled_boots']} of {r['lab_boots']}")
    qemu = ("-" if r["qemu_wait_ms"] is None else
            "none" if not _med(r["qemu_wait_ms"]) and r["qemu_wait_ms"]["max"] == 0
            else f"{_s(r['qemu_wait_ms'])}, {r['qemu_paid_by'] or '?'}")
    agree = "agrees" if r["agrees"] else "**disagrees**"
    return [f"{r['variant']} ({r['name']})", f"{r['smp']} ({r['tcg']})", str(r["lab_boots"]),
            f"{_s(r['assign_us'])}, {_s(r['assign_mean_us'])}, {_s(r['assign_p90_us'])}",
            f"{_s(r['reg_wall_us'], '{:.1f}')}, {_s(r['reg_cpu_us'], '{:.1f}')}", stall, qemu,
            f"{', '.join(r['verdicts']) or '-'}; {r['kernel_check'] or '-'}, {agree}"] + (
                [_linux_cell(r)] if linux else [])


def _linux_cell(r: dict) -> str:
    w = r.get("linux_wait_ms")
    wait = ("-" if w is None else "none" if not w["median"] and w["max"] == 0
            else f"{_s(w)}, {r.get('linux_paid_by') or '?'}")
    return (f"{wait}; {_s(r.get('linux_srcu_to_init_ms'))}; "
            f"{_s(r.get('linux_init_s'), '{:.1f}')}")


def _hz_title(hz: int) -> str:
    return f"HZ={hz} ({1000 / hz:g} ms jiffies)"


def tables(doc: dict) -> str:
    """The Markdown tables, one per HZ."""
    out = []
    for hz in doc["hz"]:
        mine = [r for r in doc["rows"] if r["hz"] == hz]
        if not mine:
            continue
        heads = _headers(doc)
        out += [f"### {_hz_title(hz)}", "", "| " + " | ".join(heads) + " |",
                "|" + "---|" * len(heads)]
        out += ["| " + " | ".join(_row(doc, r)) + " |" for r in mine]
        out.append("")
    return "\n".join(out)


def grids(doc: dict) -> list[Grid]:
    """The same tables for the console: laid out at its width, no value cut."""
    out = []
    for hz in doc["hz"]:
        mine = [r for r in doc["rows"] if r["hz"] == hz]
        if not mine:
            continue
        g = Grid(title=f"lab remedies, {_hz_title(hz)}", keys=2,
                 continued=f"lab remedies, HZ={hz} (continued)")
        for h in _headers(doc):
            g.add_column(h)
        for r in mine:
            g.add_row(*[c.replace("**", "") for c in _row(doc, r)])
        out.append(g)
    return out


# a registration pays for its grace period when the registrant's own CPU clock is more
# than this much above the fix's greatest over the lab boots (noise between lab boots of
# one kernel is a few percent)
PAYS_MARGIN = 1.1


def _pays(rfc_cpu: dict, fix_cpu: dict) -> str:
    """Whether registrations pay for their grace period's work, judged on the registering
    thread's own CPU clock (the question asked: CPU time, which a slow or bimodal wall
    time on two emulated CPUs does not blur) against the fix's greatest over the lab
    boots, with a 10% margin: in every lab boot, in the median one, or not."""
    bar = fix_cpu["max"] * PAYS_MARGIN
    if rfc_cpu["min"] > bar:
        return "still makes registrations pay, in every lab boot"
    if rfc_cpu["median"] > bar:
        return (f"still makes registrations pay in the median lab boot (not in all "
                f"{rfc_cpu['n']})")
    return "does not make registrations pay"


def answers(doc: dict) -> list[str]:
    """The two questions the report was asked, answered from its rows."""
    out = []
    for smp in doc["smp"]:
        for hz in doc["hz"]:
            rfc, fix, old = (_find(doc, v, hz, smp) for v in
                             ("7.3+srcu-expedited", "7.3", "6.1"))
            if not (rfc and fix and old):
                continue
            w = [_med(r["reg_wall_us"]) for r in (rfc, fix, old)]
            cr, cf = rfc["reg_cpu_us"], fix["reg_cpu_us"]
            if None in w or cr is None or cf is None:
                continue
            out.append(f"With {smp} CPU{'s' if smp > 1 else ''} at HZ={hz}, "
                       f"call_srcu_expedited() {_pays(cr, cf)}: the registrant's own CPU "
                       f"clock {_s(cr, '{:.1f}')} us per registration against the fix's "
                       f"{_s(cf, '{:.1f}')} us; wall time {w[0]:.1f} us against the fix's "
                       f"{w[1]:.1f} us and 6.1's {w[2]:.1f} us (a synchronous wait).")
    for smp in doc["smp"]:
        cur = _find(doc, "7.3+srcu-expedite-current", 100, smp)
        fix = _find(doc, "7.3", 100, smp)
        if not cur:
            continue
        if cur["stalled_boots"] == 0:
            verdict = "removes the stall"
        else:
            verdict = (f"leaves a stall of {_s(cur['stall_ms'])} ms in "
                       f"{cur['stalled_boots']} of {cur['lab_boots']} lab boots")
        base = (f" (the fix: {_s(fix['stall_ms'])} ms)" if fix and fix["stalled_boots"]
                else "")
        out.append(f"At HZ=100 with {smp} CPU{'s' if smp > 1 else ''}, "
                   f"srcu_expedite_current() {verdict}{base}.")
    return out


def render(doc: dict) -> str:
    boots = doc["lab_boots"]
    head = (f"Measured by `pyvmm lab remedies` (HZ {', '.join(map(str, doc['hz']))}; "
            f"CPUs {', '.join(map(str, doc['smp']))}; {boots} lab boot"
            f"{'s' if boots != 1 else ''} per figure; emulator "
            f"{doc.get('emulator') or 'this host QEMU'}; created {doc['created'][:10]}; "
            f"status {doc['status']}). Each figure is the median of the lab boots' own "
            "medians, with their least and greatest in brackets. assign: one KVM_IOEVENTFD "
            "assign's wall time in the control recipe (single-op samples); per registration: "
            "the control recipe's ioeventfd phase over its registrations, in wall time and "
            "in the registering thread's CPU clock; "
            "stall: the step after the registrations less the same step with none"
            + ("; QEMU start-up: the SRCU wait the regression cost QEMU's start-up in the "
               "lab kernel (its probe's ioeventfds)." if _traced(doc) else
               " (no QEMU start-up trace in this run)."))
    if _linux(doc):
        head += (f" Linux guest: the lab's Linux guest ({doc.get('linux_workload')}) booted "
                 f"to /init {doc.get('linux_guest')} time(s) per lab boot by the same QEMU: "
                 "the regression's wait and the ioctl that paid it, every kvm->srcu wait "
                 "before /init, and the time to /init (TCG's, so noise: docs/linux-guest.md).")
    text = [BEGIN, "", head, "", tables(doc)]
    ans = answers(doc)
    if ans:
        text += ["Answers, from the rows above:", ""] + [f"- {a}" for a in ans] + [""]
    text.append(END)
    return "\n".join(text) + "\n"


def write_report(doc: dict, out_dir: str, doc_path: str | None = None) -> list[str]:
    """remedies.md in the run directory; with `doc_path`, the same block replaced in that
    file between its markers (written whole, with a title, when it has none)."""
    block = render(doc)
    paths = [os.path.join(out_dir, "remedies.md")]
    with open(paths[0], "w") as f:
        f.write("# Remedies\n\n" + block)
    if doc_path:
        try:
            with open(doc_path) as f:
                old = f.read()
        except FileNotFoundError:
            old = "# Remedies for the fix's follow-up, side by side\n\n"
        if BEGIN in old and END in old:
            new = old[:old.index(BEGIN)] + block.rstrip("\n") + old[old.index(END) + len(END):]
        else:
            new = old.rstrip("\n") + "\n\n" + block
        with open(doc_path, "w") as f:
            f.write(new)
        paths.append(doc_path)
    return paths
