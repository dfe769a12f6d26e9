"""No table ever cuts a value: every table pyvmm prints, rendered at 60, 80 and 160
columns, holds no ellipsis, and a Grid of any content keeps every word whole."""

import copy
import io
import json
import os
import random
import subprocess
import sys
import types

import pytest
from rich.console import Console

from pyvmm.tables import Grid

HERE = os.path.dirname(os.path.abspath(__file__))
RUN_JSON = os.path.join(HERE, "data", "lab-6.1-defer-free-run.json")
WIDTHS = (60, 80, 160)
ELLIPSIS = "\u2026"


def render(width: int, fn, *modules) -> str:
    """What fn() prints (to the consoles of `modules`, or to the console it is given)
    at `width` columns."""
    buf = io.StringIO()
    con = Console(file=buf, width=width, force_terminal=False, color_system=None)
    saved = [(m, m.console) for m in modules]
    try:
        for m in modules:
            m.console = con
        out = fn(con)
        if hasattr(out, "__rich_console__"):     # a table returned rather than printed
            con.print(out)
    finally:
        for m, c in saved:
            m.console = c
    return buf.getvalue()


def assert_whole(text: str, width: int, what: str) -> None:
    assert ELLIPSIS not in text, f"{what} at {width} columns cuts a value:\n{text}"


def load_doc() -> dict:
    with open(RUN_JSON) as f:
        return json.load(f)


# --- the Grid itself (pure) -----------------------------------------------------------

def test_grid_keeps_every_word_whole_at_any_width():
    rng = random.Random(7)
    words = ["1.16", "10.334", "synchronize_srcu_expedited", "KVM_SET_USER_MEMORY_REGION",
             "ok", "-", "92.2%", "during-boot", "4.62 (1.2) memslot", "22.00 / 1.55 / 23.12"]
    for trial in range(60):
        g = Grid(title=f"trial {trial}", keys=rng.randint(1, 2), caption="a caption")
        ncols = rng.randint(1, 12)
        for c in range(ncols):
            g.add_column(rng.choice(["N", "boot med ms", "kernel-check", "a long header here"]),
                         justify=rng.choice(["left", "right"]))
        cells = []
        for _ in range(rng.randint(1, 6)):
            row = [rng.choice(words) for _ in range(ncols)]
            cells += row
            g.add_row(*row, end_section=rng.random() < 0.2)
        for width in (24, 40, 60, 80, 120, 200):
            out = render(width, lambda con: g)
            assert_whole(out, width, f"trial {trial}")
            flat = " ".join(out.split())
            for cell in set(cells):
                for w in cell.split():
                    if len(w) + 4 <= width:     # a word the screen can hold stays whole
                        assert w in flat, (trial, width, w)


def test_grid_stacks_instead_of_cutting_and_says_continued():
    g = Grid(title="wide", continued="wide")
    for c in range(14):
        g.add_column(f"column {c}", justify="right")
    g.add_row(*[f"{c}.{c}{c}{c}" for c in range(14)])
    narrow = render(60, lambda con: g)
    assert "(continued)" in narrow and ELLIPSIS not in narrow
    assert all(len(line) <= 60 for line in narrow.splitlines())
    wide = render(200, lambda con: g)
    assert "(continued)" not in wide


# --- every table of the project -------------------------------------------------------

@pytest.mark.parametrize("width", WIDTHS)
def test_report_tables_and_verdict_fit_without_cutting(width):
    from pyvmm.analysis import report
    doc = load_doc()
    out = render(width, lambda con: report.render(con, doc))
    assert_whole(out, width, "the report")
    # prose wraps at the width with its indent: read it with the line breaks folded
    assert "verdict:" in out and "from the control recipe (ioev:32," in " ".join(out.split())


@pytest.mark.parametrize("width", WIDTHS)
def test_compare_tables_fit_without_cutting(width, tmp_path):
    from pyvmm.bench import compare
    a = load_doc()
    b = copy.deepcopy(a)
    for s in b["samples"]:
        s["result"]["boot_wall_ns"] = int(s["result"]["boot_wall_ns"] * 1.3)
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    two = types.SimpleNamespace(runs=[str(pa), str(pb)], out=str(tmp_path), min_change=5.0)
    three = types.SimpleNamespace(runs=[str(pa), str(pb), str(pa)], out=str(tmp_path),
                                  min_change=5.0)
    for args in (two, three):
        out = render(width, lambda con: compare.cmd_compare(args), compare)
        assert_whole(out, width, f"compare of {len(args.runs)} runs")
        assert "(median)" in out


@pytest.mark.parametrize("width", WIDTHS)
def test_python_vs_c_and_per_ioctl_tables_fit_without_cutting(width):
    from pyvmm.bench import cli as bench_cli
    doc = load_doc()
    py = copy.deepcopy([s for s in doc["samples"] if s["recipe"] == "during-boot"])
    for s in py:
        s["driver"] = "py"
    doc["samples"] += py
    out = render(width, lambda con: bench_cli.python_vs_c_table(doc), bench_cli)
    assert_whole(out, width, "python-vs-c")
    assert "boot total" in out
    prof = [{"phase": p, "syscalls": [{"name": "KVM_SET_USER_MEMORY_REGION",
                                       "kernel_ns": 12345.0}],
             "user_ns": 5000.0, "span_ns": 20000.0, "kernel_ns": 12345.0,
             "page_faults": 2} for p in ("vm", "mem", "memslot", "teardown")]
    cell = {"name": "during-boot", "n": 10, "boots": 30, "trace_clock": "x86-tsc",
            "resolution_ns": 1.0, "c": prof, "py": copy.deepcopy(prof)}
    out = render(width, lambda con: bench_cli.per_ioctl_table(cell), bench_cli)
    assert_whole(out, width, "per-ioctl")
    assert "KVM_SET_USER_MEMORY_REGION" in out


@pytest.mark.parametrize("width", WIDTHS)
def test_matrix_and_ptwrite_tables_fit_without_cutting(width):
    from pyvmm.analysis import findings
    from pyvmm.lab.experiments import matrix
    from pyvmm.ptwrite.table import ptwrite_table
    doc = load_doc()
    row = {"variant": "6.1+defer-free-expedited", "patch": "defer-free-expedited",
           **findings.run_summary(doc, matrix.SHARE_NS), "run": "x/run.json"}
    row["kernel_check"] = "synchronize_srcu_expedited"
    mdoc = {"schema": matrix.SCHEMA, "status": "complete", "config": doc["config"],
            "rows": [row, dict(row, variant="latest")], "failed": []}
    out = render(width, lambda con: matrix.table(mdoc))
    assert_whole(out, width, "the lab matrix")
    assert "synchronize_srcu_expedited" in out and "median" in out and "N=32" in out
    stats = {"mmu_pte_write": 2000, "mmu_flooded": 3, "insn_emulation": 4000, "exits": 4012}
    res = {"summary": {k: {ph: {"per_write_ns": 1234.5, "stats": stats,
                                "toucher_stats": stats} for ph in ("pte", "pde", "data")}
                       for k in ("1 vCPU", "2 vCPUs")}}
    out = render(width, lambda con: ptwrite_table(res, "pyvmm bench ptwrite: 2000 writes"))
    assert_whole(out, width, "ptwrite")


@pytest.mark.parametrize("width", WIDTHS)
def test_the_traced_lab_matrix_fits_without_cutting(width):
    from pyvmm.lab.experiments import matrix
    row = {"variant": "6.1+defer-free-expedited", "kernel": "6.1.0-57-amd64",
           "verdict": "deferred-free follow-up", "behaviour": "deferred", "same_verdict": 2,
           "runs": 3, "startup_ms": 405.0, "kvm_ioctl_ms": 42.3, "srcu_waits": 20,
           "srcu_wait_ms": 8.33, "regression_ms": 7.25, "longest_wait_ms": 7.25,
           "longest_wait_jiffies": 1.8,
           "paid_by": "KVM_IOEVENTFD deassign port 0x0 len 2 datamatch 0x6",
           "kernel_check": "synchronize_srcu_expedited", "agrees": True}
    none = dict(row, variant="latest", verdict="no SRCU stall", regression_ms=None,
                longest_wait_ms=None, longest_wait_jiffies=None, paid_by=None, agrees=False)
    mdoc = {"schema": matrix.SCHEMA, "status": "complete", "workload": "qemu-microvm:2",
            "trace_repeats": 3, "rows": [row, none], "failed": []}
    out = render(width, lambda con: matrix.table(mdoc))
    assert_whole(out, width, "the traced lab matrix")
    assert all(w in out.split() for w in ("datamatch", "0x6", "(2/3)", "(7.25,", "1.8)"))


@pytest.mark.kvm
@pytest.mark.parametrize("argv", [["info"], ["check", "ioeventfd-ordering",
                                             "--iterations", "300"],
                                  ["stress", "--duration", "1", "--out", "{tmp}"]],
                         ids=["info", "check", "stress"])
def test_command_tables_fit_without_cutting(argv, tmp_path):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    for width in WIDTHS:
        r = subprocess.run([sys.executable, "-m", "pyvmm", *argv], capture_output=True,
                           text=True, timeout=300, cwd="/",
                           env=dict(os.environ, COLUMNS=str(width)))
        assert r.returncode == 0, r.stderr
        assert_whole(r.stdout, width, " ".join(argv))


@pytest.mark.parametrize("width", WIDTHS)
def test_trace_tables_fit_without_cutting(width):
    import gzip

    from pyvmm import tracefs
    from pyvmm.trace import model, record, report, runs
    with gzip.open(os.path.join(HERE, "data", "qemu-microvm-2.trace.gz"), "rt") as f:
        events = tracefs.parse_events(f.read())
    rec = record.Recording()
    rec.startup = model.build(events, 0.4, None, port=0x80)
    run = runs.run_dict(rec, 250)
    doc = {"host": {"kernel": "6.18"}, "traced": ["qemu-system-x86_64"], "hz": 250,
           "workload": "qemu-microvm:2", "runs": [run, run], "status": "complete",
           "medians": runs.medians([run, run]), "overhead": None}
    out = render(width, lambda con: report.render(con, doc))
    assert_whole(out, width, "the trace report")
    assert "verdict:" in out and "KVM_IOEVENTFD" in out


@pytest.mark.parametrize("width", WIDTHS)
def test_the_vcpus_table_fits_without_cutting(width):
    from pyvmm.lab.experiments import vcpus
    rows = [{"k": k, "n": n, "boot_ns": 32_400_000.0 + k, "redist_ns": 5_613_000.0,
             "redist_per_vcpu_ns": 350_812.5, "ioev_ns": 15_599_000.0,
             "registration_share": 0.428, "memslot_ns": 4_793_000.0, "stall_ns": -42_000.0,
             "share_with_stall": 0.543} for k in (1, 16) for n in (0, 32)]
    doc = {"results": [{"variant": "arm64:6.1+defer-free@hz250", "rows": rows},
                       {"variant": "arm64:7.3", "rows": rows}]}
    out = render(width, lambda con: vcpus.table(doc))
    assert_whole(out, width, "lab vcpus")
    assert all(w in out.split() for w in ("arm64:6.1+defer-free@hz250", "5.613", "-0.042",
                                          "54.3%", "0.351"))
