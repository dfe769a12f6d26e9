"""What the fleet runs on each host, with nothing there but python3: this file alone is
pushed by Ansible's script module and run with the host's python3 (standard library
only; it imports nothing of pyvmm).

    check   --key K --root R --python X.Y --machine M   what the host is, and whether
            pyvmm's build K can run there (one JSON object on stdout)
    install --key K --root R                            unpack R/incoming-K.tar.gz into
            R/K (atomically: a half-unpacked install is never used)
    run     --key K --root R --run ID --job NAME --timeout S [--needs CMD] -- ARGV...
            `python3 -m pyvmm ARGV` from the install, in its own session, bounded by S
            seconds and by this process's life (a hang-up or the controller going away
            ends it); its output directory packed into R/runs/ID/NAME.tar.gz; the job's
            status as one JSON object on stdout
    stop    --root R --run ID                           end what run ID left running
            and remove its files
    clean   --root R                                    stop everything and remove R

Every subcommand exits 0 when it did its work and says the job's own outcome in its
JSON, so one failed job does not stop the next; an exit status of 2 is this script's
own failure (bad arguments, a root that is not the fleet's)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import time

MARKER = ".pyvmm-fleet"         # a root holds it: `clean` removes no other directory
NOFILE_NEEDED = 4096            # the default sweep's N=1000 needs about 1000 fds
TAIL = 4000


def _root(path: str) -> str:
    root = os.path.abspath(os.path.expanduser(path))
    if root in ("/", os.path.expanduser("~")) or len(root.split(os.sep)) < 3:
        raise SystemExit(f"pyvmm fleet: refusing {root} as the install root: give a "
                         "directory of its own (pyvmm_fleet_root)")
    return root


def _say(obj: dict) -> None:
    print(json.dumps(obj))


def kvm_problem() -> str | None:
    """Why pyvmm cannot open /dev/kvm here, or None."""
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm is missing (no KVM on this host, or it is hidden from this login)"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except PermissionError:
        return "/dev/kvm is not accessible to this user (root or the kvm group needed)"
    except OSError as e:
        return f"/dev/kvm cannot be opened: {e.strerror}"
    os.close(fd)
    return None


def check(a) -> int:
    root = _root(a.root)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    libc = platform.libc_ver()
    facts = {
        "hostname": platform.node(), "kernel": platform.release(),
        "machine": platform.machine(),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "python_path": sys.executable, "libc": f"{libc[0]} {libc[1]}".strip(),
        "nofile": {"soft": soft, "hard": hard}, "kvm": kvm_problem(),
        "qemu": shutil.which("qemu-system-x86_64") or shutil.which("qemu-system-aarch64"),
        "root": root, "installed": os.path.exists(os.path.join(root, a.key, "ok")),
        "refuse": None,
    }
    if facts["machine"] != a.machine:
        facts["refuse"] = (f"incompatible: the host is {facts['machine']}, pyvmm was built "
                           f"for {a.machine}")
    elif libc[0] != "glibc":
        facts["refuse"] = (f"incompatible: the host's C library is {facts['libc'] or 'not glibc'}"
                           "; pyvmm's compiled parts need glibc")
    elif facts["python"] != a.python:
        facts["refuse"] = (f"incompatible: the host's python3 is {facts['python']}, the "
                           f"bundle's compiled modules are for Python {a.python}")
    elif facts["kvm"]:
        facts["refuse"] = f"no KVM: {facts['kvm']}"
    elif hard < NOFILE_NEEDED:
        facts["refuse"] = (f"nofile: RLIMIT_NOFILE's hard limit is {hard}; a sweep needs "
                           f"{NOFILE_NEEDED} (raise it in limits.conf)")
    _say(facts)
    return 0


def install(a) -> int:
    root = _root(a.root)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, MARKER), "w") as f:
        f.write("pyvmm fleet installs; `pyvmm fleet clean` removes this directory\n")
    archive = os.path.join(root, f"incoming-{a.key}.tar.gz")
    final = os.path.join(root, a.key)
    tmp = os.path.join(root, f".{a.key}.tmp{os.getpid()}")
    t0 = time.monotonic()
    try:
        with tarfile.open(archive) as t:
            t.extractall(tmp, filter="tar") if hasattr(tarfile, "data_filter") \
                else t.extractall(tmp)
        with open(os.path.join(tmp, "ok"), "w") as f:
            f.write(a.key + "\n")
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
        for other in os.listdir(root):      # earlier builds' installs: replaced by this one
            if other.startswith("pyvmm-") and other != a.key:
                shutil.rmtree(os.path.join(root, other), ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            os.unlink(archive)
        except OSError:
            pass
    _say({"installed": final, "seconds": round(time.monotonic() - t0, 2)})
    return 0


def _kill_group(pid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        for _ in range(20):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def run(a) -> int:
    root = _root(a.root)
    home = os.path.join(root, a.key)
    if not os.path.exists(os.path.join(home, "ok")):
        _say({"job": a.job, "status": "failed",
              "reason": f"pyvmm is not installed in {home}"})
        return 0
    work = os.path.join(root, "runs", a.run, a.job)
    os.makedirs(work, exist_ok=True)
    out = os.path.join(work, "results")
    os.makedirs(out, exist_ok=True)
    if a.needs and not shutil.which(a.needs):
        return _finish(work, {"job": a.job,
                              "status": "no QEMU" if a.needs.startswith("qemu") else "failed",
                              "reason": f"{a.needs} is not installed on this host"})
    argv = [sys.executable, "-m", "pyvmm", *a.argv]
    argv = [x.replace("{OUT}", out) for x in argv]
    env = dict(os.environ, PYTHONPATH=os.path.join(home, "site"), COLUMNS="100",
               PYVMM_FLEET="1")
    t0 = time.monotonic()
    with open(os.path.join(work, "stdout.txt"), "wb") as so, \
            open(os.path.join(work, "stderr.txt"), "wb") as se:
        p = subprocess.Popen(argv, stdout=so, stderr=se, stdin=subprocess.DEVNULL, env=env,
                             cwd=work, start_new_session=True)
        with open(os.path.join(work, "pid"), "w") as f:
            f.write(str(p.pid))
        ended = []

        def end(signum, _frame):
            ended.append(signum)
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, end)
        parent = os.getppid()
        deadline = t0 + a.timeout
        status = None
        while True:
            try:
                rc = p.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
            if ended or os.getppid() != parent:
                status = "interrupted"
            elif time.monotonic() > deadline:
                status = "timed out"
            if status:
                _kill_group(p.pid)
                rc = p.wait()
                break
    wall = time.monotonic() - t0
    res = {"job": a.job, "status": status or ("ok" if rc == 0 else "failed"), "rc": rc,
           "wall_s": round(wall, 2), "argv": a.argv}
    if status == "timed out":
        res["reason"] = f"did not finish within {a.timeout:g} s: killed"
    elif status == "interrupted":
        res["reason"] = "stopped: the controller went away or sent a signal"
    elif rc != 0:
        with open(os.path.join(work, "stderr.txt"), "rb") as f:
            err = f.read().decode(errors="replace").strip().splitlines()
        res["reason"] = (err[-1] if err else f"exit status {rc}")[:300]
    return _finish(work, res)


def _finish(work: str, res: dict) -> int:
    """status.json beside the output, the whole job directory packed for the fetch."""
    with open(os.path.join(work, "status.json"), "w") as f:
        json.dump(res, f)
    for name in ("stdout.txt", "stderr.txt"):
        p = os.path.join(work, name)
        if os.path.exists(p) and os.path.getsize(p) > 4 * 1024 * 1024:
            with open(p, "rb") as f:
                f.seek(-TAIL, os.SEEK_END)
                tail = f.read()
            with open(p, "wb") as f:
                f.write(b"[... cut ...]\n" + tail)
    try:
        os.unlink(os.path.join(work, "pid"))
    except OSError:
        pass
    with tarfile.open(work + ".tar.gz", "w:gz") as t:
        t.add(work, arcname=os.path.basename(work))
    _say(res)
    return 0


def _stop_dir(path: str) -> None:
    for dp, _, files in os.walk(path):
        if "pid" in files:
            try:
                with open(os.path.join(dp, "pid")) as f:
                    _kill_group(int(f.read().strip()))
            except (OSError, ValueError):
                pass
    shutil.rmtree(path, ignore_errors=True)


def stop(a) -> int:
    root = _root(a.root)
    _stop_dir(os.path.join(root, "runs", a.run))
    try:
        os.rmdir(os.path.join(root, "runs"))        # the last run's: nothing is left
    except OSError:
        pass
    _say({"stopped": a.run})
    return 0


def clean(a) -> int:
    root = _root(a.root)
    if not os.path.exists(root):
        _say({"removed": None, "why": f"{root} does not exist"})
        return 0
    if not os.path.exists(os.path.join(root, MARKER)):
        print(f"pyvmm fleet: {root} is not a fleet install root (no {MARKER}): not removed",
              file=sys.stderr)
        return 2
    _stop_dir(os.path.join(root, "runs"))
    size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(root)
               for f in fs if not os.path.islink(os.path.join(dp, f)))
    shutil.rmtree(root)
    _say({"removed": root, "bytes": size})
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="pyvmm-fleet-hostside")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check")
    c.add_argument("--key", required=True)
    c.add_argument("--root", required=True)
    c.add_argument("--python", required=True)
    c.add_argument("--machine", required=True)
    i = sub.add_parser("install")
    i.add_argument("--key", required=True)
    i.add_argument("--root", required=True)
    r = sub.add_parser("run")
    r.add_argument("--key", required=True)
    r.add_argument("--root", required=True)
    r.add_argument("--run", required=True)
    r.add_argument("--job", required=True)
    r.add_argument("--timeout", type=float, required=True)
    r.add_argument("--needs", default=None)
    r.add_argument("argv", nargs=argparse.REMAINDER)
    s = sub.add_parser("stop")
    s.add_argument("--root", required=True)
    s.add_argument("--run", required=True)
    k = sub.add_parser("clean")
    k.add_argument("--root", required=True)
    a = p.parse_args(argv)
    if a.cmd == "run" and a.argv and a.argv[0] == "--":
        a.argv = a.argv[1:]
    return {"check": check, "install": install, "run": run, "stop": stop,
            "clean": clean}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
