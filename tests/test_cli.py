"""The pyvmm command line, run as a user would (subprocess)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.kvm


# Most commands run from a neutral directory; the checkout is the install (an editable
# install, compiled modules built in place), so the repository root works the same.
NEUTRAL = "/"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pyvmm(*args, **kw):
    return subprocess.run([sys.executable, "-m", "pyvmm", *args], capture_output=True,
                          text=True, timeout=120, cwd=NEUTRAL, **kw)


def test_the_checkout_is_the_install():
    """From the repository root (where a newcomer stands) and from anywhere else, the
    same package is imported, with its compiled modules, and importing it parses no C
    (no pycparser: the cdef was compiled by the build)."""
    probe = ("import sys, pyvmm, pyvmm.vmm.abi, pyvmm.recipe; pyvmm.recipe.native_module(); "
             "print(pyvmm.__file__, 'pycparser' in sys.modules)")
    seen = []
    for cwd in (ROOT, NEUTRAL):
        r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                           timeout=60, cwd=cwd)
        assert r.returncode == 0, (cwd, r.stderr)
        seen.append(r.stdout.split())
        boot = subprocess.run([sys.executable, "-m", "pyvmm", "boot", "--guest", "hello"],
                              capture_output=True, text=True, timeout=120, cwd=cwd)
        assert boot.returncode == 0 and "run to HLT" in boot.stdout, (cwd, boot.stderr)
    assert seen[0] == seen[1], seen
    assert seen[0][1] == "False", "importing pyvmm parsed the C declarations"


def test_info_json_reports_this_host():
    r = pyvmm("info", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    import platform
    assert info["kernel"] == platform.release()
    assert info["kvm_api_version"] == 12
    assert info["caps"]["ioeventfd"] == 1
    assert info["rlimit_nofile"]["soft"] > 0


def test_info_table():
    r = pyvmm("info")
    assert r.returncode == 0 and "KVM capabilities" in r.stdout and "guest_memfd" in r.stdout


def test_boot_doorbell_timeline_and_proof():
    r = pyvmm("boot", "--guest", "doorbell", "--ioeventfds", "16", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["doorbells_ok"] and res["doorbells_completed"] == 16
    assert [p["op"] for p in res["phases"]] == ["vm", "mem", "ioev", "vcpu", "run", "teardown"]
    t = pyvmm("boot", "--guest", "hello")
    assert t.returncode == 0 and "Hello from a pyvmm real-mode guest" in t.stdout
    assert "run to HLT" in t.stdout


def test_boot_loads_only_what_booting_needs():
    """`pyvmm boot` imports no table, plot or array library and none of the other rooms
    (issue #12: a boot process against QEMU's), and still exits with the boot's status
    after printing its whole timeline."""
    code = ("import sys; sys.argv = ['pyvmm', 'boot', '--guest', 'hello', '--stats']; "
            "from pyvmm.cli import main; rc = main(); "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('rich', 'matplotlib', 'numpy', 'jsonschema', 'cffi', 'ioctl_opt', 'dataclasses')"
            " or m.startswith(('pyvmm.bench', 'pyvmm.lab', 'pyvmm.checks', 'pyvmm.stress',"
            " 'pyvmm.analysis', 'pyvmm.ptwrite', 'pyvmm.tracefs'))); "
            "print('HEAVY', heavy, rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, cwd=NEUTRAL)
    assert r.returncode == 0, r.stderr
    assert "HEAVY [] 0" in r.stdout
    assert "boot (all but teardown)" in r.stdout and "KVM binary stats" in r.stdout
    # the console script's fast exit keeps the status and the output
    exe = os.path.join(os.path.dirname(sys.executable), "pyvmm")
    bad = subprocess.run([exe, "boot", "--guest", "spin", "--timeout", "0.2"],
                         capture_output=True, text=True, timeout=120, cwd=NEUTRAL)
    assert bad.returncode == 2 and "did not reach halt" in bad.stderr
    good = subprocess.run([exe, "boot", "--guest", "hello"], capture_output=True, text=True,
                          timeout=120, cwd=NEUTRAL)
    assert good.returncode == 0
    assert good.stdout.rstrip().splitlines()[-1].startswith("exits to userspace")


@pytest.mark.parametrize("args, message", [
    (["boot", "--guest", "nope"], "unknown guest 'nope'"),
    (["boot", "--guest", "spin", "--timeout", "0.2"], "did not reach halt within 0.2 s"),
    (["boot", "--guest", "triple"], "KVM_EXIT_SHUTDOWN"),
    (["boot", "--guest", "mmiofetch"], "KVM_EXIT_INTERNAL_ERROR suberror 1"),
    (["boot", "--recipe", "vm,run"], "needs 'vcpu:K'"),
    (["report", "/nonexistent/dir"], "does not exist"),
    (["bench", "--per-ioctl"], "--per-ioctl compares the two drivers: add --python-vs-c"),
    (["bench", "--python-vs-c", "--per-ioctl", "--repeats", "2"], "need at least 3 boots"),
])
def test_bad_input_exits_2_with_one_clear_line(args, message):
    r = pyvmm(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in " ".join(r.stderr.split())


def test_ioeventfds_beyond_rlimit_exit_2():
    r = subprocess.run(["bash", "-c", f"ulimit -n 64; {sys.executable} -m pyvmm boot "
                        "--ioeventfds 200"], capture_output=True, text=True, timeout=60,
                       cwd=NEUTRAL)
    assert r.returncode == 2
    assert "RLIMIT_NOFILE" in r.stderr and "ulimit -n" in r.stderr


@pytest.mark.kvm
def test_sigterm_leaves_a_valid_run_marked_interrupted(tmp_path):
    import json
    import signal
    import time
    from pyvmm.analysis.plan import load_run
    p = subprocess.Popen([sys.executable, "-m", "pyvmm", "bench", "--ns", "0,1",
                          "--repeats", "2000", "--warmup", "0", "--control-n", "0",
                          "--out", str(tmp_path)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=NEUTRAL)
    # Wait for samples on disk (what the run reports), not for a time.
    deadline = time.monotonic() + 120
    run = None
    while time.monotonic() < deadline and p.poll() is None:
        found = list(tmp_path.glob("*/run.json"))
        if found:
            try:
                if json.loads(found[0].read_text())["samples"]:
                    run = found[0]
                    break
            except (ValueError, KeyError):
                pass
        time.sleep(0.05)
    assert run is not None, "no samples written"
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    doc = load_run(str(run))
    assert doc["status"] == "interrupted" and doc["samples"]
    assert len(doc["samples"]) < 2 * 2000


def test_lab_run_help_lists_every_job():
    r = pyvmm("lab", "run", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for job in ("ptwrite:COUNT", "check:NAME", "stress:SECONDS", "xen:SECONDS[:SEEDS[:BOUND]]"):
        assert job in text, job
