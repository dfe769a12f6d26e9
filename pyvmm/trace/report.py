"""A trace document on the console: the start-up's timeline, its KVM ioctls (every one
that slept or took long, the rest counted by name), the waits inside them with what
they waited in, the summary and the verdict; over several runs, the medians."""

from __future__ import annotations

from ..tables import Grid
from ..ui import say
from .attribute import why_text

LONG_MS = 0.1               # an ioctl this long is listed even when it did not sleep
LONG_WAIT_MS = 0.5          # a grace-period wait listed on its own line
ALWAYS = ("KVM_CREATE_VM", "KVM_CREATE_VCPU", "KVM_IOEVENTFD", "KVM_SET_USER_MEMORY_REGION",
          "KVM_SET_USER_MEMORY_REGION2", "KVM_REGISTER_COALESCED_MMIO",
          "KVM_UNREGISTER_COALESCED_MMIO", "KVM_IRQFD", "KVM_CREATE_DEVICE",
          "KVM_CREATE_IRQCHIP", "KVM_CREATE_PIT2")


def _ms(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def header(console, doc: dict) -> None:
    host = doc["host"]
    what = doc.get("workload") or " ".join(doc["traced"])
    say(console, f"[bold]pyvmm trace[/] {what}  kernel {host.get('kernel')}  "
        f"HZ={doc.get('hz') or 'unknown'}  {len(doc['runs'])} run(s)", markup=True)


def timeline(run: dict) -> Grid:
    t = Grid(title="start-up timeline (ms from exec)", title_justify="left")
    t.add_column("milestone")
    t.add_column("at ms", justify="right")
    for k, v in run["summary"]["milestones_ms"].items():
        t.add_row(k, _ms(v))
    return t


def ioctl_table(run: dict, everything: bool = False) -> Grid:
    t = Grid(title="KVM ioctls (every one that slept, took over 0.1 ms, or registers or "
                   "maps something" + ("" if not everything else "; --all: every one")
                   + ")", title_justify="left", keys=2, continued="KVM ioctls")
    for col, j in (("#", "right"), ("start ms", "right"), ("thread", "right"), ("fd", "left"),
                   ("ioctl", "left"), ("arguments", "left"), ("kernel ms", "right"),
                   ("slept ms", "right"), ("waited in", "left")):
        t.add_column(col, justify=j)
    rest: dict[str, list] = {}
    for c in run["ioctls"]:
        slept = sum(s["ms"] for s in c["sleeps"] if s["state"] != "R")
        shown = (everything or c["sleeps"] or c["ms"] >= LONG_MS or c["name"] in ALWAYS)
        if not shown:
            r = rest.setdefault(c["name"], [0, 0.0])
            r[0] += 1
            r[1] += c["ms"]
            continue
        waits = [s for s in c["sleeps"] if s["state"] != "R"]
        where = ""
        if waits:
            main = max(waits, key=lambda s: s["ms"])
            where = main["label"] + (f" in {main['path'][1]}" if len(main["path"]) > 1
                                     else "")
        t.add_row(str(c["seq"]), f"{c['t_ms']:.3f}", str(c["tid"]),
                  f"{c['fd']} {c['kind'] or '?'}", c["name"], c["what"] or "-",
                  f"{c['ms']:.3f}", f"{slept:.3f}" if waits else "-", where or "-")
    if rest:
        n = sum(v[0] for v in rest.values())
        ms = sum(v[1] for v in rest.values())
        t.caption = (f"not listed: {n} more ({ms:.3f} ms in the kernel): " + ", ".join(
            f"{k} x{v[0]}" for k, v in sorted(rest.items(), key=lambda kv: -kv[1][1])))
    return t


def summary_lines(run: dict) -> list[str]:
    s = run["summary"]
    hz = s.get("hz")
    whole = (f", {s['process_ms']:.2f} ms to reaped (exit teardown included)"
             if s.get("process_ms") else "")
    lines = [f"start-up {s['startup_ms']:.2f} ms (exec to exit{whole}); {s['kvm_ioctls']} KVM ioctls "
             f"took {s['kvm_ioctl_ms']:.2f} ms in the kernel"
             + (f" ({s['kvm_ioctl_share'] * 100:.1f}% of the start-up, summed over threads)"
                if s.get("kvm_ioctl_share") is not None else "")]
    if s["srcu_waits"]:
        share = s.get("srcu_share")
        lines.append(f"SRCU grace periods: {s['srcu_waits']} wait(s), {s['srcu_wait_ms']:.2f} ms"
                     + (f" = {share * 100:.1f}% of the start-up" if share is not None else ""))
        short = [w for w in s["waits"] if w["wait_ms"] < LONG_WAIT_MS]
        for w in s["waits"]:
            if w["wait_ms"] < LONG_WAIT_MS:
                continue
            j = f", {w['jiffies']:.1f} jiffies at HZ={hz}" if w.get("jiffies") is not None \
                else ""
            what = f"{w['name']} {w['what']}".strip() if w["what"] else w["name"]
            lines.append(f"  #{w['seq']} at {w['t_ms']:.3f} ms: {what} waited "
                         f"{w['wait_ms']:.3f} ms{j} in {w['path']}"
                         + (f" ({w['registrations_before']} registration"
                            f"{'s' if w['registrations_before'] != 1 else ''} before it)"
                            if w["registrations_before"] else ""))
            why = why_text(w)
            if why:
                lines.append(f"    {why}")
        if short:
            names = sorted({w["name"] for w in short})
            lines.append(f"  and {len(short)} short wait(s) under {LONG_WAIT_MS:g} ms each, "
                         f"{sum(w['wait_ms'] for w in short):.3f} ms in all ("
                         + ", ".join(names) + ")")
    else:
        lines.append("SRCU grace periods: no KVM ioctl waited for one")
    other = {k: v for k, v in s["sleep_ms_by_kind"].items() if k not in ("srcu",)}
    if other:
        lines.append("other time off the CPU inside KVM ioctls: " + ", ".join(
            f"{k} {v:.3f} ms" for k, v in other.items()))
    lines.append(f"verdict: {s['verdict']}")
    return lines


def medians_table(doc: dict) -> Grid:
    m = doc["medians"]
    t = Grid(title=f"over {len(doc['runs'])} runs: median (min - max)", title_justify="left")
    t.add_column("figure")
    t.add_column("median", justify="right")
    t.add_column("min - max", justify="right")
    rows = [("start-up ms", m["startup_ms"]), ("whole process ms", m.get("process_ms")),
            ("KVM ioctl ms", m["kvm_ioctl_ms"]),
            ("SRCU wait ms", m["srcu_wait_ms"]), ("SRCU waits", m["srcu_waits"]),
            ("KVM ioctls", m["kvm_ioctls"])]
    rows += [(f"{k} (ms)", v) for k, v in m["milestones_ms"].items()]
    for label, sp in rows:
        if sp is None:
            continue
        t.add_row(label, f"{sp['median']:.3f}", f"{sp['min']:.3f} - {sp['max']:.3f}")
    return t


def render(console, doc: dict, everything: bool = False) -> None:
    header(console, doc)
    if not doc["runs"]:
        console.print("no run finished", highlight=False)
        return
    run = doc["runs"][0]
    for note in sorted({n for r in doc["runs"] for n in r["notes"]}):
        say(console, f"[yellow]note:[/] {note}", markup=True)
    console.print(timeline(run))
    console.print(ioctl_table(run, everything))
    for a in run.get("agreement") or []:
        say(console, f"two instruments, one start-up: the {a['step']} step took "
            f"{a['phase_ms']:.3f} ms by pyvmm's own phase timer, its ioctl "
            f"{a['ioctl_ms']:.3f} ms in the trace ({a['srcu_ms']:.3f} ms of it "
            f"waiting for SRCU): {a['ratio']:.2f}x")
    label = "run 1: " if len(doc["runs"]) > 1 else ""
    for line in summary_lines(run):
        say(console, label + line if line.startswith("verdict") else line)
    if len(doc["runs"]) > 1:
        console.print(medians_table(doc))
        kinds = [r["summary"]["behaviour"] for r in doc["runs"]]
        same = sum(1 for k in kinds if k == kinds[0])
        console.print(f"verdicts: {same} of {len(kinds)} runs agree with run 1",
                      highlight=False)
    ov = doc.get("overhead")
    if ov:
        say(console, f"tracing overhead: traced start-up median "
            f"{ov['traced_ms']['median']:.2f} ms vs {ov['untraced_ms']['median']:.2f} ms "
            f"untraced, {ov['ratio_of_medians']:.3f}x (paired median "
            f"{ov['paired_ratio']['median']:.3f}x over {ov['paired_ratio']['n']} A/B pairs)")
    an = doc.get("analysis")
    if an and len(doc["runs"]) > 1:
        say(console, f"verdict over {an['runs']} runs ({an['runs_agreeing']} agree): "
            f"{an['verdict']}")
    if doc.get("status") != "complete":
        console.print(f"[yellow]trace status: {doc.get('status')}[/] (partial results)")
