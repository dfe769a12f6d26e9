"""Faults a user meets, injected for real: a damaged cache entry, a full disk, a sweep
killed with SIGKILL, two processes racing for one cache entry, a damaged download, QEMU
killed under a lab run and a lab kernel that panics. Each asserts the one-line message,
that nothing complete was lost, and that the next run recovers without manual cleanup."""

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from pyvmm.analysis.plan import load_run
from pyvmm.lab.boot import archive
from pyvmm.lab.sources import cache, kits

ROOT = os.geteuid() == 0
LAB = os.environ.get("PYVMM_LAB") == "1"


def pyvmm(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "pyvmm", *args], capture_output=True,
                          text=True, cwd="/", timeout=timeout,
                          env=dict(os.environ, **(env or {})))


def one_line_error(r) -> str:
    """The error a failed command printed: one line on stderr."""
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1, (r.returncode, r.stderr[-2000:])
    return lines[0]


@contextlib.contextmanager
def small_tmpfs(path, size):
    """A tmpfs of `size` at `path` (root only): a disk that fills up."""
    os.makedirs(path, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for a full disk: {p.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


# --- the cache: damaged entries, and two processes at once ------------------------------

def test_a_damaged_kit_is_said_and_unpacked_again(tmp_path, capsys):
    entry = tmp_path / "kits" / "linux-image-x_1"
    (entry / "modules").mkdir(parents=True)
    (entry / "vmlinuz").write_bytes(b"K" * 4096)
    (entry / "modules" / "00-kvm.ko").write_bytes(b"M" * 100)
    meta = {"modules": ["00-kvm.ko"], "files": cache.manifest(str(entry),
                                                              ["vmlinuz", "modules/00-kvm.ko"])}
    (entry / "kit.json").write_text(json.dumps(meta))
    assert kits._cached_kit(str(entry), kits.X86_64, print) is not None
    # cut short, as a full disk or a killed copy leaves it
    with open(entry / "vmlinuz", "r+b") as f:
        f.truncate(1000)
    assert kits._cached_kit(str(entry), kits.X86_64, print) is None
    out = capsys.readouterr().out
    assert "the cached kit linux-image-x_1 is damaged (vmlinuz has 1000 bytes, its " \
           "manifest 4096): unpacking it again" in out
    assert not entry.exists()         # gone, so the next step unpacks it whole
    # same size, other bytes: the SHA-256 tells
    entry.mkdir()
    (entry / "vmlinuz").write_bytes(b"K" * 4096)
    meta["files"] = cache.manifest(str(entry), ["vmlinuz"])
    (entry / "kit.json").write_text(json.dumps(meta))
    (entry / "vmlinuz").write_bytes(b"X" * 4096)
    assert kits._cached_kit(str(entry), kits.X86_64, print) is None
    assert "vmlinuz does not match its SHA-256" in capsys.readouterr().out


def _files(tmp_path, n=3):
    out = []
    for i in range(n):
        p = tmp_path / "src" / f"f{i}"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(os.urandom(2000))
        out.append(str(p))
    return out


def test_a_damaged_runtime_archive_is_built_again(tmp_path, monkeypatch):
    monkeypatch.setenv("PYVMM_CACHE", str(tmp_path / "cache"))
    files = _files(tmp_path)
    said = []
    blob, cached, _ = archive.pack(files, "rt", "the test runtime", said.append)
    assert not cached and said == ["building the test runtime (3 files, 0.0 MiB)"]
    assert archive.pack(files, "rt", "the test runtime", said.append)[:2] == (blob, True)
    (path,) = glob.glob(str(tmp_path / "cache" / "rt" / "rt-*.cpio.gz"))
    with open(path, "r+b") as f:
        f.truncate(100)
    said.clear()
    again, cached, _ = archive.pack(files, "rt", "the test runtime", said.append)
    assert not cached and again == blob
    assert said[0].startswith("the cached the test runtime") or "is damaged" in said[0]


RACE = """
import sys, time
from pyvmm.lab.boot import archive
files = sys.argv[1:]
def log(m):
    print(m, flush=True)
orig = archive._pack
def slow(*a, **k):
    time.sleep(1.0)             # a build that takes a while, so the other one must wait
    return orig(*a, **k)
archive._pack = slow
blob, cached, _ = archive.pack(files, "race", "the race runtime", log)
print("RESULT", len(blob), cached, flush=True)
"""


def test_two_processes_racing_for_one_cache_entry_build_it_once(tmp_path):
    files = _files(tmp_path)
    env = dict(os.environ, PYVMM_CACHE=str(tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, "-c", RACE, *files], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    texts = [o[0] for o in outs]
    built = [t for t in texts
             if any(line.startswith("building the race runtime (") for line in t.splitlines())]
    waited = [t for t in texts if "waiting for another pyvmm (pid " in t]
    assert len(built) == 1 and len(waited) == 1
    assert "which is building the race runtime" in waited[0]
    results = [t.split("RESULT ")[1].split() for t in texts]
    assert results[0][0] == results[1][0]                       # the same archive
    assert sorted(r[1] for r in results) == ["False", "True"]   # built once, reused once
    assert len(glob.glob(str(tmp_path / "cache" / "race" / "*.cpio.gz"))) == 1


def test_a_lock_is_released_when_its_holder_dies(tmp_path):
    entry = str(tmp_path / "entry")
    holder = subprocess.Popen([sys.executable, "-c", f"""
from pyvmm.lab.sources import cache
import time
with cache.locked({entry!r}, "holding it"):
    print("held", flush=True)
    time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    said = []
    t0 = time.monotonic()
    with cache.locked(entry, "after a SIGKILL", said.append):
        pass
    assert said == [] and time.monotonic() - t0 < 5     # no stale lock to clean up


# --- results: a full disk, a killed sweep --------------------------------------------------

@pytest.mark.kvm
@pytest.mark.skipif(not ROOT, reason="mounting a small tmpfs (a full disk) needs root")
def test_a_full_disk_under_a_sweep_is_one_line_and_the_last_copy_is_intact(tmp_path):
    with small_tmpfs(tmp_path / "small", "192k") as small:
        r = pyvmm("bench", "--ns", "0,1", "--repeats", "60", "--out", str(small))
        msg = one_line_error(r)
        assert msg.startswith("pyvmm: error: no space left on the device of ")
        assert "run.json" in msg and "MiB needed" in msg and \
            "the last complete copy is intact" in msg
        (path,) = glob.glob(str(small / "*" / "run.json"))
        doc = load_run(path)            # valid JSON, a valid run.json: nothing half-written
        assert doc["status"] == "running"
        assert not glob.glob(str(small / "*" / "run.json.tmp.*"))
        r = pyvmm("report", path)       # the last complete copy reads back, and says why
        # (it holds no boot: report says so and exits 2, a run that measured nothing)
        assert r.returncode == 2 and "run status: died: its process (" in r.stderr
    # the next run, with room, completes
    r = pyvmm("bench", "--ns", "0,1", "--repeats", "3", "--out", str(tmp_path / "big"))
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.kvm
@pytest.mark.skipif(not ROOT, reason="tracefs and a small tmpfs need root")
def test_a_full_disk_anywhere_is_one_line(tmp_path):
    if not os.path.exists("/sys/kernel/tracing/trace"):
        pytest.skip("tracefs is not mounted")
    with small_tmpfs(tmp_path / "small", "64k") as small:
        r = pyvmm("trace", "--vmm", "pyvmm-boot:1", "--out", str(small))
        msg = one_line_error(r)
        assert "no space left on the device of " in msg and "free some space" in msg


@pytest.mark.kvm
def test_a_sweep_killed_with_sigkill_is_reported_as_died(tmp_path):
    p = subprocess.Popen([sys.executable, "-m", "pyvmm", "bench", "--ns", "0,1,10,100",
                          "--repeats", "200", "--out", str(tmp_path)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            found = glob.glob(str(tmp_path / "*" / "run.json"))
            if found and len(json.load(open(found[0]))["samples"]) >= 10:
                break
            time.sleep(0.3)
        else:
            pytest.fail("the sweep saved no samples within 120 s")
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    doc = load_run(found[0])
    assert doc["status"] == "running" and doc["writer"]["pid"] == p.pid
    r = pyvmm("report", found[0])
    assert r.returncode == 0, r.stderr
    assert f"run status: died: its process ({p.pid}) is gone (last saved at " in r.stdout
    # compare says it too, and a finished run is not flagged
    r2 = pyvmm("bench", "--ns", "0,1", "--repeats", "3", "--out", str(tmp_path / "next"))
    assert r2.returncode == 0
    (other,) = glob.glob(str(tmp_path / "next" / "*" / "run.json"))
    r = pyvmm("compare", found[0], other)
    assert r.returncode == 0, r.stderr
    assert f"died: its process ({p.pid}) is gone" in r.stdout
    assert other not in [l.split(":")[0] for l in r.stdout.splitlines() if "died" in l]


# --- the lab: a damaged download, two lab runs at once, QEMU killed, a kernel panic ------

def _lab_cache(tmp_path) -> str:
    """An empty lab cache whose package lists are copied from the default one when it has
    them (an update is a 100 MB download)."""
    empty = tmp_path / "cache"
    src = os.path.join(os.path.expanduser("~"), ".cache", "pyvmm", "apt")
    if os.path.isdir(os.path.join(src, "lists")) and not os.environ.get("PYVMM_CACHE"):
        shutil.copytree(src, empty / "apt")
    return str(empty)


def _new_apt_state(root, barrier):
    from pyvmm.lab.sources.apt import Apt
    barrier.wait()
    Apt(root=root, log=lambda m: None)      # an error ends the process with exit code 1


def test_lab_runs_starting_at_once_on_an_empty_cache_each_set_up_apt(tmp_path):
    """CI once saw one of two lab runs, started together on an empty cache, die in Apt()
    with FileNotFoundError: both wrote the same temporary sources.list and one rename
    took the other's. Eight processes released together by a barrier, 25 times, each
    time on a new empty root: every one sets up the lab's apt state."""
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    for k in range(25):
        root = str(tmp_path / f"apt{k}")
        barrier = ctx.Barrier(8)
        procs = [ctx.Process(target=_new_apt_state, args=(root, barrier)) for _ in range(8)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0] * 8, f"round {k}"
        assert os.path.isfile(os.path.join(root, "etc", "sources.list"))


@pytest.mark.lab
@pytest.mark.skipif(not LAB, reason="set PYVMM_LAB=1 to download a Debian package, damage "
                                    "the cached copy and see it fetched again")
def test_a_damaged_cached_download_is_checked_and_fetched_again(tmp_path, monkeypatch):
    from pyvmm.lab.sources.apt import Apt, cached_deb
    from pyvmm.lab.sources.debian import parse_records
    monkeypatch.setenv("PYVMM_CACHE", _lab_cache(tmp_path))
    said = []
    apt = Apt(log=said.append)
    apt.update()
    name = "linux-kbuild-6.1"
    version = parse_records(apt._run(["apt-cache", "show", name], "show"))[0]["Version"]
    debs = str(tmp_path / "debs")
    path = apt.download_named(name, version, debs)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:          # cut to 1 MB, as the issue found it
        f.truncate(min(size // 2, 1 << 20))
    said.clear()
    again = apt.download_named(name, version, debs)
    assert os.path.getsize(again) == size and cached_deb(debs, name, version) == again
    assert any(f"the cached {os.path.basename(path)} is damaged (" in s and
               "fetching it again" in s for s in said), said
    assert apt.check_deb(again, name, version) is None


@pytest.mark.lab
@pytest.mark.skipif(not LAB, reason="set PYVMM_LAB=1 to start two lab runs at once on an "
                                    "empty cache (downloads Debian's 6.1 once)")
def test_two_lab_runs_at_once_on_an_empty_cache_download_each_package_once(tmp_path):
    env = dict(os.environ, PYVMM_CACHE=_lab_cache(tmp_path))
    args = [sys.executable, "-m", "pyvmm", "lab", "kernel", "--kernel", "6.1", "--ns", "0,1",
            "--repeats", "2", "--control-n", "4", "--recipes", "during-boot"]
    procs = [subprocess.Popen(args + ["--out", str(tmp_path / f"out{i}")], cwd="/", env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=1500)[0] for p in procs]
    bad = [i for i, p in enumerate(procs) if p.returncode != 0]
    if bad:      # pytest.fail: an assert's message is cut short, and this is the evidence
        pytest.fail("\n".join(f"run {i} exited {procs[i].returncode}; its last lines:\n"
                               + outs[i][-3000:] for i in bad))
    for i in range(2):
        (path,) = glob.glob(str(tmp_path / f"out{i}" / "*" / "run.json"))
        assert load_run(path)["status"] == "complete"
    debs = os.listdir(os.path.join(env["PYVMM_CACHE"], "debs"))
    images = [d for d in debs if d.startswith("linux-image-") and d.endswith(".deb")]
    assert len(images) == 1
    text = "\n".join(outs)
    assert "waiting for another pyvmm (pid " in text
    # the kit unpacked once (the other run's waiting line names it too)
    assert sum(1 for line in text.splitlines() if line.startswith("unpacking linux-image-")) == 1


def _kill_qemu_after(n_boots: int, out_dir, deadline_s: float = 600) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline_s:
        for data in glob.glob(str(out_dir / "*" / "lab" / "data.log")):
            with open(data, errors="replace") as f:
                if sum(1 for line in f if '"label"' in line) >= n_boots:
                    subprocess.run(["pkill", "-KILL", "-f", f"qemu-system-x86_64.*{out_dir}"])
                    return
        time.sleep(0.2)
    pytest.fail("the lab recorded too few boots to kill QEMU under it")


@pytest.mark.lab
@pytest.mark.skipif(not LAB, reason="set PYVMM_LAB=1 to kill QEMU under a lab run")
def test_qemu_killed_under_a_lab_run_is_one_error_and_the_next_run_is_clean(tmp_path):
    args = [sys.executable, "-m", "pyvmm", "lab", "kernel", "--kernel", "6.1", "--ns",
            "0,1,10", "--repeats", "30", "--retries", "0", "--out", str(tmp_path / "a")]
    p = subprocess.Popen(args, cwd="/", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    _kill_qemu_after(5, tmp_path / "a")
    out, err = p.communicate(timeout=600)
    assert p.returncode == 2, err[-2000:]
    first = err.strip().splitlines()[0]
    assert "QEMU exited (status -9) before the lab finished (" in first
    assert "last kernel console lines:" in err and "logs kept in" in err
    (path,) = glob.glob(str(tmp_path / "a" / "*" / "run.json"))
    doc = load_run(path)
    assert doc["status"] == "failed" and doc["samples"]     # partial results, marked
    # the next run starts clean
    r = pyvmm("lab", "kernel", "--kernel", "6.1", "--ns", "0,1", "--repeats", "2",
              "--control-n", "4", "--out", str(tmp_path / "b"), timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.lab
@pytest.mark.skipif(not LAB, reason="set PYVMM_LAB=1 to make a lab kernel panic (its init "
                                    "exits) and see the console's last lines")
def test_a_lab_kernel_that_panics_is_one_error_with_its_console(tmp_path):
    r = pyvmm("lab", "kernel", "--kernel", "6.1", "--ns", "0,1", "--repeats", "2",
              "--retries", "0", "--cmdline", "rdinit=/bin/uname", "--out", str(tmp_path),
              timeout=900)
    assert r.returncode == 2
    err = r.stderr
    assert "QEMU exited" in err.splitlines()[0] and "before the lab finished (0 boots" in err
    assert "the lab kernel said: Kernel panic - not syncing: Attempted to kill init" in err
    (path,) = glob.glob(str(tmp_path / "*" / "run.json"))
    assert load_run(path)["status"] == "failed"
