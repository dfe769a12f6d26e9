"""A row per host from what was fetched, the groups by kernel build with the hosts that
differ from the rest of their group flagged, and the fleet as a table and a plot.

The bench job's run.json is analysed here again (findings.findings: never trusted from
the host), the trace job's trace.json gives QEMU's SRCU share of its start-up, the info
job's JSON the host's facts."""

from __future__ import annotations

import glob
import json
import os
import tarfile

from ..analysis import findings, stats
from ..analysis.plan import load_run
from ..analysis.predictions import runs_gp_at_once
from ..errors import PyvmmError

OK_STATES = ("ok", "no QEMU")           # a host in either state finished its run
STALL_SPREAD = 1.5                      # a stall outside median/1.5 .. median*1.5 differs


def unpack(host_dir: str) -> None:
    """Each fetched job archive into its directory (HOST/JOB/), the archive removed."""
    for tgz in sorted(glob.glob(os.path.join(host_dir, "*.tar.gz"))):
        with tarfile.open(tgz) as t:
            members = [m for m in t.getmembers()
                       if not (m.name.startswith("/") or ".." in m.name.split("/"))]
            if hasattr(tarfile, "data_filter"):
                t.extractall(host_dir, members=members, filter="data")
            else:
                t.extractall(host_dir, members=members)
        os.unlink(tgz)


def _json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _one(pattern: str) -> str | None:
    found = sorted(glob.glob(pattern))
    return found[-1] if found else None


def row(state: dict, host_dir: str, hostvars: dict | None = None) -> dict:
    """A host's row: its state from the event stream, what its jobs left, and what the
    inventory says of the host's KVM (pyvmm_kernel_check: sync or deferred, and
    pyvmm_kernel_check_stall, as `pyvmm lab hosts` writes them) with whether the
    measurement agrees."""
    r = {"host": state["host"], "status": state["status"], "reason": state.get("reason", ""),
         "install": state.get("install"), "jobs": {}, "kernel": None, "kernel_version": None,
         "hz": None, "preemption": None, "backend": None, "cpu_model": None,
         "verdict": None, "answer": None, "regressions": None, "assign_us": None,
         "eexist_us": None, "stall_ms": None, "stall_jiffies": None, "stall_phase": None,
         "first_deassign_excess_ms": None, "boots": None, "qemu_srcu_share": None,
         "qemu_srcu_ms": None,
         "qemu_startup_ms": None, "qemu_verdict": None, "qemu_paid_by": None,
         "checks": None, "flags": [], "dir": os.path.basename(host_dir),
         "variant": None, "kernel_check": None, "agrees": None}
    facts = state.get("facts") or {}
    r["kernel"] = facts.get("kernel")
    for name, res in (state.get("jobs") or {}).items():
        job_dir = os.path.join(host_dir, name)
        r["jobs"][name] = {k: res.get(k) for k in ("status", "reason", "wall_s", "rc")}
        if res.get("status") != "ok":
            continue
        try:
            _read_job(r, name, job_dir)
        except PyvmmError as e:
            r["jobs"][name].update(status="failed", reason=str(e)[:300])
    hv = hostvars or {}
    r["variant"] = None if hv.get("pyvmm_variant") is None else str(hv["pyvmm_variant"])
    kc = hv.get("pyvmm_kernel_check")
    if kc:
        stall = str(hv.get("pyvmm_kernel_check_stall", "")).lower()
        mech = hv.get("pyvmm_kernel_check_mechanism")
        r["kernel_check"] = {"behaviour": kc, "stall_expected": {"true": True, "false": False}
                             .get(stall), "mechanism": mech,
                             "gp_work_at_once": runs_gp_at_once(str(mech))}
        measured = {"sync-on-register": "sync", "deferred-free": "deferred"}.get(r["verdict"])
        first = r.get("first_deassign_excess_ms")
        r["agrees"] = None if measured is None else stats.kernel_check_agreement(
            r["kernel_check"], measured,
            None if r["stall_ms"] is None else r["stall_ms"] * 1e6,
            None if first is None else first * 1e6)["agrees"]
    if r["status"] in ("running", "pending", "ok"):
        bad = [(n, j) for n, j in r["jobs"].items() if j["status"] not in OK_STATES]
        if bad:
            n, j = bad[0]
            r["status"], r["reason"] = j["status"], f"{n}: {j.get('reason') or j['status']}"
        elif r["jobs"]:
            qemu = [n for n, j in r["jobs"].items() if j["status"] == "no QEMU"]
            r["status"] = "ok"
            if qemu:
                r["reason"] = f"{', '.join(qemu)}: no QEMU on this host"
    return r


def _read_job(r: dict, name: str, job_dir: str) -> None:
    if name == "info":
        with open(os.path.join(job_dir, "stdout.txt")) as f:
            try:
                info = json.load(f)
            except ValueError:
                raise PyvmmError("info: its output is not JSON") from None
        for k in ("kernel", "kernel_version", "preemption", "backend", "cpu_model"):
            r[k] = info.get(k)
        r["hz"] = info.get("config_hz")
    elif name == "bench":
        path = _one(os.path.join(job_dir, "results", "*", "run.json"))
        if path is None:
            raise PyvmmError("bench: no run.json came back")
        f = findings.findings(load_run(path))
        r["jobs"][name]["run"] = _rel(path, job_dir)
        for k in ("verdict", "answer", "regressions", "assign_us", "eexist_us", "stall_ms",
                  "stall_jiffies", "stall_phase", "first_deassign_excess_ms", "boots"):
            r[k] = f.get(k)
        r["hz"] = r["hz"] or f.get("hz")
    elif name.startswith("trace"):
        path = _one(os.path.join(job_dir, "results", "*", "trace.json"))
        doc = _json(path) if path else None
        if not doc or not doc.get("analysis"):
            raise PyvmmError("trace: no trace.json with an analysis came back")
        an = doc["analysis"]
        r["jobs"][name]["run"] = _rel(path, job_dir)
        r.update(qemu_srcu_share=an.get("srcu_share"), qemu_srcu_ms=an.get("srcu_wait_ms"),
                 qemu_startup_ms=an.get("startup_ms"), qemu_verdict=an.get("verdict"),
                 qemu_paid_by=an.get("paid_by"))
    elif name.startswith("check"):
        with open(os.path.join(job_dir, "stdout.txt")) as f:
            text = f.read()
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        checks = r["checks"] or {}
        checks[name[len("check-"):]] = "ok" if data is not None else "no JSON"
        r["checks"] = checks


def _rel(path: str, job_dir: str) -> str:
    """A fetched file's path relative to the fleet run's directory (HOST/JOB/...), so the
    run can be moved."""
    return os.path.relpath(path, os.path.dirname(os.path.dirname(job_dir)))


def flag(rows: list[dict]) -> None:
    """Within each kernel build, a host whose verdict or stall differs from the rest."""
    for kernel, group in groups(rows).items():
        measured = [r for r in group if r["verdict"]]
        if len(measured) < 2:
            continue
        verdicts = [r["verdict"] for r in measured]
        common = max(set(verdicts), key=verdicts.count)
        stalls = [r["stall_ms"] for r in measured if r["stall_ms"] is not None]
        with_stall = len(stalls) * 2 > len(measured)
        med = stats.median(stalls) if stalls else None
        for r in measured:
            if r["verdict"] != common:
                r["flags"].append(f"verdict {r['verdict']}, the group's is {common}")
            has = r["stall_ms"] is not None
            if has != with_stall and len(measured) > 2:
                r["flags"].append("a stall where the group has none" if has else
                                  "no stall where the group has one")
            elif has and med and not (med / STALL_SPREAD <= r["stall_ms"] <= med * STALL_SPREAD):
                r["flags"].append(f"stall {r['stall_ms']:.2f} ms against the group's "
                                  f"{med:.2f} ms")


def group_key(r: dict) -> str:
    """A host's kernel build: its release and build string (uname -r, uname -v); a lab
    host's variant when the inventory names one (a variant may rebuild KVM alone, which
    leaves uname as it was)."""
    if r.get("variant"):
        return f"{r['kernel'] or '?'} ({r['variant']})"
    if not r.get("kernel"):
        return "(kernel unknown)"
    return r["kernel"] + (f" {r['kernel_version']}" if r.get("kernel_version") else "")


def groups(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in sorted(rows, key=group_key):
        out.setdefault(group_key(r), []).append(r)
    return out


def _f(x, fmt="{:.2f}", none="-"):
    return none if x is None else fmt.format(x)


def table(doc: dict):
    """The fleet: a section per kernel build, a row per host."""
    from ..tables import Grid
    t = Grid(title=f"pyvmm fleet: {len(doc['rows'])} host(s), jobs "
                   f"{' '.join(doc['jobs'])}; a section per kernel build",
             title_justify="left", keys=1, continued="fleet")
    for c, left in (("host", True), ("status", True), ("kernel / HZ / preemption", True),
                    ("verdict", True), ("assign / EEXIST us", False),
                    ("stall ms (jiffies), paid by", False), ("QEMU SRCU wait, share", False),
                    ("differs from its group", True)):
        t.add_column(c, justify="left" if left else "right")
    gs = groups(doc["rows"])
    for i, (kernel, rows) in enumerate(gs.items()):
        for r in sorted(rows, key=lambda x: x["host"]):
            status = r["status"] + (f": {r['reason']}" if r["reason"] else "")
            kern = " / ".join(str(x) for x in (r["kernel"] or "?", r["hz"] or "?",
                                              (r["preemption"] or "?").split(" ")[0]))
            stall = "-" if r["stall_ms"] is None else (
                f"{r['stall_ms']:.2f} ({_f(r['stall_jiffies'], '{:.1f}', '?')}), "
                f"{r['stall_phase'] or '?'}")
            qemu = "-" if r["qemu_srcu_ms"] is None else (
                f"{r['qemu_srcu_ms']:.2f} ms, {_f(r['qemu_srcu_share'], '{:.1%}')}")
            verdict = r["verdict"] or "-"
            if r.get("kernel_check"):
                verdict += (f" (kernel-check {r['kernel_check']['behaviour']}: "
                            + {True: "agrees", False: "[bold red]DISAGREES[/]",
                               None: "-"}[r["agrees"]] + ")")
            t.add_row(r["host"], status, kern, verdict,
                      f"{_f(r['assign_us'])} / {_f(r['eexist_us'])}", stall, qemu,
                      "; ".join(r["flags"]) or "-")
        if i + 1 < len(gs):
            t.add_section()
    t.caption = ("kernel build: uname -r and -v, or the lab variant; verdict and per-op "
                 "medians from each host's "
                 "bench (its control recipe), analysed here; stall: the step after the "
                 "registrations that waited; QEMU: the SRCU waits of its start-up (trace "
                 "job) and their share of it")
    t.caption_justify = "left"
    return t


def plot(doc: dict, out_dir: str) -> list[str]:
    """The stall per host, hosts grouped (and coloured) by kernel build."""
    rows = [r for r in doc["rows"] if r["verdict"]]
    if not rows:
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ..results import save_figure
    gs = groups(rows)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows) + 2), 4.5))
    x, labels = 0, []
    for i, (kernel, group) in enumerate(gs.items()):
        group = sorted(group, key=lambda r: r["host"])
        xs = list(range(x, x + len(group)))
        ax.bar(xs, [r["stall_ms"] or 0 for r in group], color=f"C{i % 10}", label=kernel)
        labels += [r["host"] for r in group]
        x += len(group) + 1
        labels.append("")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("post-registration stall (ms)")
    ax.set_title("stall per host, by kernel build (0: none)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, out_dir, "fleet_stall")
