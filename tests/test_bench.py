"""A short real sweep, report round-trip, interrupted sweeps, and the C helper."""

import json
import os
import subprocess

import pytest

from pyvmm.vmm import guests
from pyvmm import recipe as rmod
from pyvmm.analysis import findings, report
from pyvmm.analysis.plan import SweepConfig, load_run
from pyvmm.drivers import native
from pyvmm.bench.cli import python_vs_c_table
from pyvmm.bench.compare import behaviour_rows, compare_docs
from pyvmm.bench.sweep import Sweep
from pyvmm.errors import PyvmmError

pytestmark = pytest.mark.kvm


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = SweepConfig(ns=(0, 10), repeats=3, warmup=1, seed=1, control_n=8)
    doc = Sweep(cfg, str(out)).run()
    return str(out), doc


def test_short_sweep_structure_and_doorbells(short_run):
    out, doc = short_run
    assert doc["status"] == "complete" and doc["schema"] == "pyvmm.run/1"
    cells = {(s["recipe"], s["n"]) for s in doc["samples"]}
    assert cells == {("before-vcpu", 0), ("before-vcpu", 10), ("during-boot", 0),
                     ("during-boot", 10), ("control", 8)}
    assert len(doc["samples"]) == 5 * 3
    for s in doc["samples"]:
        r = s["result"]
        assert r["ok"], r["error"]
        if s["recipe"] != "control":
            assert r["halted"]
            assert r["doorbells_expected"] == s["n"]
            assert r["doorbells_completed"] == s["n"]
            assert r["doorbell_mmio_exits"] == 0
            assert r["bar_value"] == 0xBA5EBA11       # the memslot step mapped the BAR
            ops = [p["op"] for p in r["phases"]]
            assert ops[-1] == "teardown"
            ioev = [p for p in r["phases"] if p["op"] == "ioev"][0]
            assert len(ioev["samples"]) == s["n"]
            assert sum(p["wall_ns"] for p in r["phases"][:-1]) == r["boot_wall_ns"]
    assert doc["host"]["kernel"] and doc["clock"]["wall_read_ns"] > 0
    # The order interleaves cells instead of running them in blocks.
    first_round = [(s["recipe"], s["n"]) for s in doc["samples"][:5]]
    assert len(set(first_round)) == 5


def test_run_json_round_trips_through_report(short_run, capsys):
    out, doc = short_run
    loaded = load_run(out)
    assert loaded["samples"] == json.loads(json.dumps(doc["samples"]))
    from rich.console import Console
    a = report.write_all(Console(width=200), loaded, out)
    assert set(a["recipes"]) == {"before-vcpu", "during-boot"}
    assert a["verdict"].behaviour in ("sync", "deferred")
    for f in ("summary.csv", "boot_vs_n.png", "boot_vs_n.svg", "phases.png",
              "per_op_vs_occupancy.svg"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    with open(os.path.join(out, "summary.csv")) as f:
        lines = f.read().splitlines()
    assert lines[0].startswith("recipe,n,boots") and len(lines) == 1 + 4
    rows = compare_docs(loaded, loaded)
    assert rows and all(abs(r["ratio"] - 1) < 1e-9 and r["p_value"] > 0.5 for r in rows)
    assert all(r["growth_a"] == r["growth_b"] for r in rows)
    assert all(r["growth_a"] == 1.0 for r in rows if r["n"] == r["base_n"])
    evidence = behaviour_rows(loaded)
    assert evidence["verdict"] in ("deferred free", "waits for a grace period")
    assert evidence["assign per op (median)"].endswith(" us") and evidence["kernel-check"] == "not run"


def test_eexist_is_batched_alike_by_both_drivers_and_the_report_says_so(short_run):
    """The cheapest op is timed in batches (K >= BB_BATCH_MIN between two clock reads),
    by the C helper and the Python VMM alike; the report's overhead line uses them."""
    from pyvmm.drivers import runner
    rec = rmod.parse("vm,mem,ioev:3,eexist:5")
    c = native.NativeRunner().run(rec)
    py = runner.PyBoot(rec).run()
    batch_min = rmod.native_module().lib.BB_BATCH_MIN
    for res in (c, py):
        ee = [p for p in res["phases"] if p["op"] == "eexist"][0]
        assert ee["batch_ops"] == 5 * -(-batch_min // 5) and ee["batch_ns"] > 0
        assert len(ee["samples"]) == 5
        assert "batch_ops" not in [p for p in res["phases"] if p["op"] == "ioev"][0]
    out, doc = short_run
    a = findings.analyze(doc)
    assert len(a["eexist_batches"]) == 3          # one per control boot
    line = report.overhead_line(doc, a)
    assert f"batches of {8 * -(-batch_min // 8)}" in line and "target < 1%" in line


def test_interrupted_sweep_leaves_valid_partial_json(tmp_path):
    cfg = SweepConfig(ns=(0, 1), repeats=5, warmup=0, seed=2, control_n=0)
    sweep = Sweep(cfg, str(tmp_path))

    def progress(done, total, cell):
        if done == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweep.run(progress)
    doc = load_run(str(tmp_path))
    assert doc["status"] == "interrupted"
    assert len(doc["samples"]) == 7
    assert not [f for f in os.listdir(tmp_path) if ".tmp." in f]


def test_bad_sweep_inputs_fail_before_booting():
    with pytest.raises(PyvmmError, match="repeats"):
        SweepConfig(repeats=0)
    with pytest.raises(PyvmmError, match=">= 0"):
        SweepConfig(ns=(0, -3))
    with pytest.raises(rmod.RecipeError):
        SweepConfig(recipes=("vm,mem,run",))


def test_load_run_rejects_other_files(tmp_path):
    p = tmp_path / "run.json"
    p.write_text('{"schema": "something-else"}')
    with pytest.raises(PyvmmError, match="schema"):
        load_run(str(tmp_path))
    p.write_text("{not json")
    with pytest.raises(PyvmmError, match="not valid JSON"):
        load_run(str(p))
    with pytest.raises(PyvmmError, match="does not exist"):
        load_run(str(tmp_path / "missing"))


def test_python_floor_and_c_drivers_agree(tmp_path):
    cfg = SweepConfig(ns=(3,), recipes=("during-boot",), repeats=3, warmup=1, seed=3,
                      control_n=0, drivers=("c", "floor", "py"))
    doc = Sweep(cfg, str(tmp_path)).run()
    assert {s["driver"] for s in doc["samples"]} == {"c", "floor", "py"}
    for s in doc["samples"]:
        r = s["result"]
        assert r["ok"] and r["doorbells_completed"] == 3 and r["doorbell_mmio_exits"] == 0
        assert r["bar_value"] and r["halted"], s["driver"]
        assert [p["op"] for p in r["phases"]] == ["vm", "mem", "vcpu", "run", "ioev", "run",
                                                  "memslot", "run", "teardown"]
        assert [e[0] for e in r["events"]][:3] == [1, 2, 3], s["driver"]
    load_run(str(tmp_path))         # the floor's samples are a valid run.json
    cells = python_vs_c_table(doc)
    cell = cells[("during-boot", 3)]
    assert list(cells) == [("during-boot", 3)] and cell["py/c"] > 0 and cell["floor/c"] > 0
    assert set(cell["phases"]) >= {"vm", "mem", "ioev", "memslot", "teardown"}
    assert all(p["py/floor"] > 0 for p in cell["phases"].values())


def test_native_run_reports_errors_cleanly():
    runner = native.NativeRunner(ioev_len=3)
    res = runner.run(rmod.parse("vm,mem,ioev:1"))
    assert not res["ok"] and "length 3 is invalid" in res["error"]
    assert native.clock_cost(1000)["wall_read_ns"] > 0


def test_standalone_helper_prints_json_lines():
    exe = guests.helper_path()
    out = subprocess.run([exe, "--recipe", "vm,mem,ioev:2,vcpu:1,run:rung,memslot,run",
                          "--repeat", "2", "--clock-cost"], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    docs = [json.loads(line) for line in out]
    assert docs[0]["type"] == "clock_cost"
    boots = docs[1:]
    assert len(boots) == 2
    for b in boots:
        assert b["ok"] and b["doorbells_completed"] == 2 and b["bar_value"] == 0xBA5EBA11
        assert [p["op"] for p in b["phases"]][-1] == "teardown"
    bad = subprocess.run([exe, "--recipe", "vm,run"], capture_output=True, text=True)
    assert bad.returncode == 2 and "needs 'vcpu:K'" in bad.stderr


def test_standalone_helper_runs_a_plan_in_order_and_survives_a_failed_boot(tmp_path):
    exe = guests.helper_path()
    plan = tmp_path / "plan"
    plan.write_text("# the lab writes plans like this\n\n"
                    "0/before-vcpu/3 vm,mem,ioev:3,vcpu:1,run:rung,memslot,run\n"
                    "1/too-many/1 vm,mem,memslot:9,memslot:9\n"
                    "  2/control/4 vm,mem,ioev:4,eexist:4,deassign:4\n")
    r = subprocess.run([exe, "--plan", str(plan)], capture_output=True, text=True)
    assert r.returncode == 1                        # one boot failed, the plan went on
    boots = [json.loads(line) for line in r.stdout.splitlines()]
    assert [b["label"] for b in boots] == ["0/before-vcpu/3", "1/too-many/1", "2/control/4"]
    assert boots[0]["ok"] and boots[0]["doorbells_completed"] == 3
    assert not boots[1]["ok"] and "BAR slots" in boots[1]["error"]
    assert boots[2]["ok"] and [len(p["samples"]) for p in boots[2]["phases"][2:5]] == [4, 4, 4]
    assert "plan line 4 (1/too-many/1) failed" in r.stderr
    bad = tmp_path / "bad"
    bad.write_text("0/x/1 vm,mem\nlabel-without-recipe\n")
    r = subprocess.run([exe, "--plan", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and "plan line 2 has a label but no recipe" in r.stderr
    r = subprocess.run([exe, "--plan", str(plan), "--recipe", "vm"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "not both" in r.stderr


def test_pyperf_export_works_with_pyperf_itself(tmp_path):
    import shutil
    import subprocess
    import sys
    data = os.path.join(os.path.dirname(__file__), "data", "lab-6.1-defer-free-run.json")
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(data, run / "run.json")
    out = tmp_path / "boots.json"
    r = subprocess.run([sys.executable, "-m", "pyvmm", "report", str(run), "--pyperf",
                        str(out)], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr
    assert "wrote 7 pyperf benchmarks" in r.stdout
    st = subprocess.run([sys.executable, "-m", "pyperf", "stats", str(out)],
                        capture_output=True, text=True)
    assert st.returncode == 0, st.stderr
    assert "Number of benchmarks: 7" in st.stdout and "during-boot N=10" in st.stdout
    meta = subprocess.run([sys.executable, "-m", "pyperf", "metadata", str(out)],
                          capture_output=True, text=True)
    assert "pyvmm_variant: 6.1+defer-free" in meta.stdout
    cmp = subprocess.run([sys.executable, "-m", "pyperf", "compare_to", str(out), str(out),
                          "--table"], capture_output=True, text=True)
    assert cmp.returncode == 0, cmp.stderr


def test_every_results_document_carries_the_envelope():
    from pyvmm.results import envelope
    doc = envelope("pyvmm.test/1", {"hostname": "h", "kernel": "k"}, status="ok", x=1)
    assert doc["schema"] == "pyvmm.test/1" and doc["status"] == "ok" and doc["x"] == 1
    assert doc["pyvmm"]["version"] and "commit" in doc["pyvmm"]
    assert doc["command"] and doc["host"]["kernel"] == "k" and doc["created"]
    from pyvmm.analysis.plan import SweepConfig
    from pyvmm.analysis.plan import new_doc
    run = new_doc(SweepConfig(ns=(0,), recipes=("before-vcpu",), repeats=1, seed=1),
                  {"hostname": "h", "kernel": "k"}, "host", None)
    assert run["schema"] == "pyvmm.run/1" and run["pyvmm"] == doc["pyvmm"]


def test_bench_json_is_the_findings_and_fail_on_follows_them(tmp_path):
    """--json: the findings alone on stdout (tables on stderr), the same as run.json's
    analysis and summary.csv's verdict column; --fail-on exits 3 exactly when the
    findings show what it names."""
    exe = [os.path.join(os.path.dirname(os.sys.executable), "pyvmm")]
    r = subprocess.run(exe + ["bench", "--ns", "0,1", "--repeats", "3", "--no-plot", "--json",
                              "--fail-on", "any", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, cwd="/")
    found = json.loads(r.stdout)
    assert found["verdict"] in ("sync-on-register", "deferred-free")
    assert found["answer"] and "verdict:" in r.stderr
    assert r.returncode == (3 if found["regressions"] else 0), (r.returncode, found)
    doc = load_run(found["run"])
    assert doc["analysis"] == findings.findings(doc) == {k: v for k, v in found.items()
                                                       if k not in ("run", "status")}
    with open(os.path.join(os.path.dirname(found["run"]), "summary.csv")) as f:
        head, first = f.readline().strip().split(","), f.readline().strip().split(",")
    assert first[head.index("verdict")] == found["verdict"]
    assert not [p for p in os.listdir(os.path.dirname(found["run"])) if p.endswith(".png")]


def test_report_of_a_run_without_a_boot_exits_2(tmp_path):
    from pyvmm.analysis.plan import new_doc
    from pyvmm.results import write_json_atomic
    cfg = SweepConfig(ns=(0,), recipes=("before-vcpu",), repeats=1, seed=1)
    doc = new_doc(cfg, {"hostname": "h", "kernel": "k", "preemption": "none",
                        "backend": "kvm"}, "host", None)
    doc["samples"] = [{"recipe": "before-vcpu", "n": 0, "seq": 0, "driver": "c",
                       "result": {"ok": False, "error": "KVM_CREATE_VM failed"}}]
    doc["status"] = "complete"
    write_json_atomic(str(tmp_path / "run.json"), doc)
    r = subprocess.run([os.sys.executable, "-m", "pyvmm", "report", str(tmp_path)],
                       capture_output=True, text=True, timeout=120, cwd="/")
    assert r.returncode == 2 and "no boot of this run succeeded" in r.stderr, r.stderr
