"""pyvmm fleet against real SSH servers and real Ansible (tests/sshhosts.py): five hosts on
loopback addresses, one with /dev/kvm hidden, one with no server, one that refuses the
client's key; a host killed in the middle of a run fails alone and --retry completes it;
the second run skips the install; an interruption keeps what was fetched; an inventory
with a password is refused before any host is contacted. Pure parts (jobs, flags,
tables) are tested without hosts."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pyvmm.errors import PyvmmError
from pyvmm.fleet import jobs, rows

import sshhosts

EXE = [sys.executable, "-m", "pyvmm"]


def fleet(*args, timeout=600, env=None):
    return subprocess.run(EXE + ["fleet", *args], capture_output=True, text=True,
                          timeout=timeout, cwd="/", env=env)


def fleet_doc(out_parent: str) -> tuple[dict, str]:
    (d,) = sorted(glob.glob(os.path.join(out_parent, "fleet-*")))[-1:]
    with open(os.path.join(d, "fleet.json")) as f:
        return json.load(f), d


def by_host(doc: dict) -> dict:
    return {r["host"]: r for r in doc["rows"]}


# --- pure ------------------------------------------------------------------------------

def test_jobs_are_checked_before_any_host_is_contacted():
    js = jobs.parse(["bench", "trace:qemu-microvm:2", "check:all"])
    assert [j.name for j in js] == ["info", "bench", "trace-qemu-microvm-2", "check-all"]
    assert js[1].argv[:5] == ["bench", "--ns", "0,1,32", "--repeats", "10"]
    assert js[2].needs == "qemu-system-x86_64"
    assert jobs.parse(["bench"], "--ns 0,1 --repeats 3")[1].argv[1:5] == [
        "--ns", "0,1", "--repeats", "3"]
    for specs, args, msg in ((["nope"], "", "unknown fleet job 'nope'"),
                             (["trace:firecracker"], "", "qemu-microvm"),
                             (["check:bogus"], "", "check:NAME"),
                             (["bench", "bench"], "", "given twice"),
                             (["bench"], "--ns x", "whole numbers"),
                             (["bench"], "--out /tmp", "set by the fleet"),
                             (["bench"], "--no-such-option", "not options of pyvmm bench"),
                             ([], "", "no jobs")):
        with pytest.raises(PyvmmError, match=msg):
            jobs.parse(specs, args)


def _row(host, kernel, verdict, stall):
    return {"host": host, "kernel": kernel, "verdict": verdict, "stall_ms": stall,
            "flags": []}


def test_a_host_that_differs_from_its_kernel_group_is_flagged():
    rs = [_row("a", "7.3", "deferred-free", 6.0), _row("b", "7.3", "deferred-free", 6.4),
          _row("c", "7.3", "deferred-free", 14.0), _row("d", "7.3", "sync-on-register", None),
          _row("e", "6.1", "sync-on-register", None), _row("f", "6.1", "sync-on-register", None)]
    rows.flag(rs)
    f = {r["host"]: r["flags"] for r in rs}
    assert f["a"] == [] and f["b"] == [] and f["e"] == [] and f["f"] == []
    assert any("stall 14.00 ms" in x for x in f["c"])
    assert any("verdict sync-on-register" in x for x in f["d"])
    assert any("no stall where the group has one" in x for x in f["d"])


# --- real hosts --------------------------------------------------------------------------

need = sshhosts.available()
real = pytest.mark.skipif(need is not None, reason=need or "")

SPECS = [{"name": "h1", "addr": "127.0.0.2"}, {"name": "h2", "addr": "127.0.0.3", "hide_qemu": True},
         {"name": "nokvm", "addr": "127.0.0.4", "hide_kvm": True},
         {"name": "gone", "addr": "127.0.0.5", "serve": False},
         {"name": "badkey", "addr": "127.0.0.6", "wrong_key": True}]
QUICK = "--ns 0,1 --repeats 3"


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    if need:
        pytest.skip(need)
    with sshhosts.Fleet(str(tmp_path_factory.mktemp("fleet")), SPECS) as f:
        yield f


@real
@pytest.mark.kvm
def test_fleet_rows_statuses_and_a_second_run_that_skips_the_install(hosts, tmp_path):
    inv = hosts.inventory()
    t0 = time.monotonic()
    r = fleet("run", "-i", inv, "--out", str(tmp_path / "a"), "--bench-args", QUICK,
              "info", "bench", "trace:qemu-microvm")
    first_s = time.monotonic() - t0
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]   # some hosts fail
    doc, d = fleet_doc(str(tmp_path / "a"))
    assert doc["schema"] == "pyvmm.fleet/1" and doc["status"] == "failed"
    rs = by_host(doc)
    assert rs["nokvm"]["status"] == "no KVM" and "/dev/kvm" in rs["nokvm"]["reason"]
    assert rs["gone"]["status"] == "unreachable" and "refused" in rs["gone"]["reason"]
    assert rs["badkey"]["status"] == "authentication failed"
    for h in ("h1", "h2"):
        row = rs[h]
        assert row["status"] == "ok", row
        assert row["verdict"] in ("deferred-free", "sync-on-register")
        assert row["kernel"] == os.uname().release and row["hz"]
        assert row["assign_us"] > 0 and row["eexist_us"] > 0
        # the host's run.json came back whole, and the row is its analysis, redone here
        run = os.path.join(d, row["jobs"]["bench"]["run"])
        from pyvmm.analysis import findings
        from pyvmm.analysis.plan import load_run
        assert findings.findings(load_run(run))["verdict"] == row["verdict"]
        trace = row["jobs"]["trace-qemu-microvm-0"]
        assert trace["status"] in ("ok", "no QEMU")
        if trace["status"] == "ok":
            assert row["qemu_srcu_ms"] is not None
    # h2 has no QEMU: that job says so, and the host is not failed for it
    assert rs["h2"]["jobs"]["trace-qemu-microvm-0"]["status"] == "no QEMU"
    assert "no QEMU" in rs["h2"]["reason"]
    assert rs["h1"]["verdict"] == rs["h2"]["verdict"]
    assert os.path.exists(os.path.join(d, "fleet_stall.png"))
    # nothing left on the hosts: no job process, no run directory
    for h in ("h1", "h2"):
        root = hosts.host(h).root
        assert not os.path.exists(os.path.join(root, "runs"))
        assert [x for x in os.listdir(root) if x.startswith("pyvmm-")]
    assert "pyvmm installed in" in r.stdout
    # the second run: the same build is installed, so it is not pushed again
    t0 = time.monotonic()
    r = fleet("run", "-i", inv, "--limit", "h1,h2", "--out", str(tmp_path / "b"), "info")
    second_s = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "already installed: install skipped" in r.stdout
    doc2, _ = fleet_doc(str(tmp_path / "b"))
    assert all(x["install"] == "already installed" for x in doc2["rows"])
    print(f"first run {first_s:.1f} s (install), second {second_s:.1f} s")


@real
@pytest.mark.kvm
def test_a_host_killed_mid_run_fails_alone_and_retry_completes_it(hosts, tmp_path):
    inv = hosts.inventory(os.path.join(str(tmp_path), "inv.ini"))
    out = str(tmp_path / "r")
    # a longer sweep, so there is time to kill h2 while its bench runs
    p = subprocess.Popen(EXE + ["fleet", "run", "-i", inv, "--limit", "h1,h2", "--out", out,
                                "--bench-args", "--ns 0,1,10 --repeats 300", "bench"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    h2 = hosts.host("h2")
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not glob.glob(
                os.path.join(h2.root, "runs", "*", "bench", "pid")):
            assert p.poll() is None, p.communicate()
            time.sleep(0.2)
        assert glob.glob(os.path.join(h2.root, "runs", "*", "bench", "pid")), "never started"
        h2.kill()
        so, se = p.communicate(timeout=600)
    finally:
        if p.poll() is None:
            p.kill()
        h2.start(hosts.key + ".pub")
    assert p.returncode == 1, so[-3000:] + se[-3000:]
    doc, d = fleet_doc(out)
    rs = by_host(doc)
    assert rs["h1"]["status"] == "ok" and rs["h1"]["verdict"]
    assert rs["h2"]["status"] in ("unreachable", "failed"), rs["h2"]
    # --retry: only h2 runs, into the same directory
    r = fleet("run", "--retry", d)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc2, d2 = fleet_doc(out)
    assert d2 == d and doc2["status"] == "complete"
    rs2 = by_host(doc2)
    assert rs2["h2"]["status"] == "ok" and rs2["h2"]["verdict"] == rs2["h1"]["verdict"]
    assert rs2["h1"] == rs["h1"]            # untouched
    assert doc2["retries"][0]["hosts"] == ["h2"]


@real
@pytest.mark.kvm
def test_an_interrupted_fleet_keeps_what_it_fetched_and_leaves_nothing_running(hosts,
                                                                              tmp_path):
    inv = hosts.inventory(os.path.join(str(tmp_path), "inv.ini"))
    out = str(tmp_path / "i")
    p = subprocess.Popen(EXE + ["fleet", "run", "-i", inv, "--limit", "h1", "--out", out,
                                "--bench-args", "--ns 0,1,10 --repeats 2000", "bench"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    h1 = hosts.host("h1")
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not glob.glob(
                os.path.join(h1.root, "runs", "*", "bench", "pid")):
            assert p.poll() is None, p.communicate()
            time.sleep(0.2)
        time.sleep(1.0)
        p.send_signal(signal.SIGTERM)
        so, se = p.communicate(timeout=180)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode in (130, 143), so[-2000:] + se[-2000:]
    doc, d = fleet_doc(out)
    assert doc["status"] == "interrupted"
    row = by_host(doc)["h1"]
    assert row["status"] == "interrupted" and "kept info" in row["reason"], row
    assert os.path.exists(os.path.join(d, "h1", "info", "stdout.txt"))
    # the host's job was ended and its files removed
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and os.path.exists(os.path.join(h1.root, "runs")):
        time.sleep(0.2)
    assert not os.path.exists(os.path.join(h1.root, "runs"))
    ps = subprocess.run(["pgrep", "-f", f"{h1.root}/pyvmm-"], capture_output=True, text=True)
    assert ps.stdout.strip() == ""


@real
@pytest.mark.kvm
def test_a_job_past_its_timeout_is_killed_and_said(hosts, tmp_path):
    inv = hosts.inventory(os.path.join(str(tmp_path), "inv.ini"))
    r = fleet("run", "-i", inv, "--limit", "h1", "--out", str(tmp_path / "t"), "--timeout",
              "3", "--bench-args", "--ns 0,1,10 --repeats 5000", "bench")
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    doc, d = fleet_doc(str(tmp_path / "t"))
    row = by_host(doc)["h1"]
    assert row["status"] == "timed out" and "within 3 s" in row["reason"], row
    assert row["jobs"]["info"]["status"] == "ok"          # what finished is kept
    with open(os.path.join(d, "h1", "bench", "status.json")) as f:
        assert json.load(f)["status"] == "timed out"
    assert not os.path.exists(os.path.join(hosts.host("h1").root, "runs"))


@real
def test_an_inventory_with_a_password_is_refused_before_any_host(hosts, tmp_path):
    inv = hosts.inventory(os.path.join(str(tmp_path), "inv.ini"),
                          extra="ansible_password=hunter2")
    r = fleet("run", "-i", inv, "--out", str(tmp_path / "p"), "info")
    assert r.returncode == 2 and "ansible_password" in r.stderr and "SSH keys" in r.stderr
    assert not os.path.exists(tmp_path / "p")
    assert "hunter2" not in r.stdout + r.stderr


@real
def test_fleet_clean_removes_the_installs(hosts, tmp_path):
    inv = hosts.inventory(os.path.join(str(tmp_path), "inv.ini"))
    r = fleet("run", "-i", inv, "--limit", "h1", "--out", str(tmp_path / "c"), "info")
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.path.isdir(hosts.host("h1").root)
    r = fleet("clean", "-i", inv, "--limit", "h1")
    assert r.returncode == 0 and "h1: removed" in r.stdout, r.stdout + r.stderr
    assert not os.path.exists(hosts.host("h1").root)


# --- a fleet of lab kernels --------------------------------------------------------------

@pytest.mark.lab
@pytest.mark.skipif(os.environ.get("PYVMM_LAB") != "1",
                    reason="set PYVMM_LAB=1 to boot Debian's 6.1 under QEMU as an SSH host "
                           "and run the fleet on it")
@pytest.mark.skipif(need is not None, reason=need or "")
def test_lab_hosts_are_a_fleet_of_real_kernels(tmp_path):
    """A lab kernel under QEMU serves SSH on 127.0.0.1; the fleet installs pyvmm in it
    through Ansible, and its bench finds 6.1's behaviour, which its kernel-check (carried
    by the inventory) agrees with. --stop ends the host."""
    r = subprocess.run(EXE + ["lab", "hosts", "--variants", "6.1", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=1200, cwd="/")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (hdir,) = glob.glob(str(tmp_path / "lab-hosts-*"))
    with open(os.path.join(hdir, "hosts.json")) as f:
        hosts = json.load(f)
    try:
        (h,) = hosts["hosts"]
        assert h["variant"] == "6.1" and h["kernel_check"]["behaviour"] == "sync"
        inv = hosts["inventory"]
        r = fleet("run", "-i", inv, "--out", str(tmp_path / "f"), "--bench-args",
                  "--ns 0,1 --repeats 4", "bench", timeout=1200)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        doc, _ = fleet_doc(str(tmp_path / "f"))
        (row,) = doc["rows"]
        assert row["status"] == "ok" and row["kernel"].startswith("6.1.")
        assert row["verdict"] == "sync-on-register" and row["agrees"] is True, row
        assert row["variant"] == "6.1"
    finally:
        r = subprocess.run(EXE + ["lab", "hosts", "--stop", hdir], capture_output=True,
                           text=True, timeout=120, cwd="/")
    assert r.returncode == 0 and "stopped" in r.stdout
    with open(os.path.join(hdir, "hosts.json")) as f:
        assert json.load(f)["status"] == "stopped"
    assert not os.path.exists(f"/proc/{h['pid']}") or \
        h["initrd"].encode() not in open(f"/proc/{h['pid']}/cmdline", "rb").read()
