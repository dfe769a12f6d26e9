"""Driving Ansible: the hosts an inventory names (ansible-inventory), a playbook run through
ansible-runner's Python API with its per-host event stream turned into each host's state,
cancellation (Ctrl-C, SIGTERM) that stops what runs on the hosts, and nothing of
Ansible's left behind on the controller (its SSH control sockets are closed).

Security: SSH keys or an agent only. An inventory that carries a password
(ansible_password, ansible_ssh_pass, ansible_become_password...) is refused before any
host is contacted; host keys are checked (Ansible's host_key_checking stays on, whatever
the environment says); `become` only when asked."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from ..errors import PyvmmError

PASSWORD_VARS = re.compile(r"^ansible_(ssh_|become_|sudo_|su_)?pass(word)?$")
CONNECT_TIMEOUT_S = 10


def tool(name: str) -> str:
    """An Ansible command of this installation (beside the interpreter), else on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    found = here if os.path.exists(here) else shutil.which(name)
    if not found:
        raise PyvmmError(f"{name} not found: the fleet drives Ansible; install pyvmm with its "
                         "fleet extra (make install does: pip install -e '.[fleet]')")
    return found


def have_ansible() -> str | None:
    """Why the fleet cannot run here, or None."""
    try:
        import ansible_runner  # noqa: F401
    except ImportError:
        return "ansible-runner is not installed (pip install -e '.[fleet]')"
    try:
        tool("ansible-playbook")
    except PyvmmError as e:
        return str(e)
    return None


def env(control_dir: str) -> dict[str, str]:
    """The environment every Ansible process of the fleet gets."""
    os.makedirs(control_dir, mode=0o700, exist_ok=True)
    return {
        "ANSIBLE_HOST_KEY_CHECKING": "True",
        "ANSIBLE_TIMEOUT": str(CONNECT_TIMEOUT_S),
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
        "ANSIBLE_PYTHON_INTERPRETER": "auto_silent",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_LOCALHOST_WARNING": "False",
        "ANSIBLE_DEPRECATION_WARNINGS": "False",
        "ANSIBLE_SSH_CONTROL_PATH_DIR": control_dir,
        "ANSIBLE_SSH_ARGS": "-o ControlMaster=auto -o ControlPersist=15s",
        "PYTHONWARNINGS": "ignore",
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
    }


def hosts(inventory: str, limit: str | None = None) -> tuple[list[str], dict]:
    """The hosts of an inventory (after --limit) and their variables, read with
    ansible-inventory; refuses an inventory that carries a password."""
    if not os.path.exists(inventory):
        raise PyvmmError(f"inventory {inventory} does not exist: give an Ansible inventory "
                         "(INI, YAML, a directory or a dynamic inventory script)")
    cmd = [tool("ansible-inventory"), "-i", inventory, "--list"]
    if limit:
        cmd += ["--limit", limit]
    e = dict(os.environ, PYTHONWARNINGS="ignore", ANSIBLE_NOCOLOR="1")
    p = subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=120)
    if p.returncode != 0:
        raise PyvmmError(f"ansible-inventory could not read {inventory}: "
                         + (p.stderr.strip().splitlines() or ["no output"])[-1])
    try:
        data = json.loads(p.stdout)
    except ValueError:
        raise PyvmmError(f"ansible-inventory gave no JSON for {inventory}") from None
    hostvars = data.get("_meta", {}).get("hostvars", {})
    names: list[str] = []

    def walk(group: str, seen: set):
        if group in seen:
            return
        seen.add(group)
        g = data.get(group, {})
        for h in g.get("hosts", []):
            if h not in names:
                names.append(h)
        for c in g.get("children", []):
            walk(c, seen)
    walk("all", set())
    for h in names:
        for k in (hostvars.get(h) or {}):
            if PASSWORD_VARS.match(k):
                raise PyvmmError(f"inventory {inventory}: host {h} has {k}: the fleet logs in "
                                 "with SSH keys or an agent only, and never keeps a password; "
                                 "remove it and use a key (ssh-copy-id)")
    if not names:
        raise PyvmmError(f"inventory {inventory} names no host"
                         + (f" matching --limit {limit}" if limit else ""))
    return names, {h: hostvars.get(h) or {} for h in names}


@dataclass
class Host:
    """One host's state as the event stream tells it."""
    name: str
    status: str = "pending"
    reason: str = ""
    step: str = ""
    facts: dict = field(default_factory=dict)
    install: str | None = None          # 'installed', 'already installed', None
    install_s: float | None = None
    jobs: dict = field(default_factory=dict)    # job name -> hostside's result
    fetched: list = field(default_factory=list)
    started: int = 0                    # jobs started
    t0: float = field(default_factory=time.monotonic)
    wall_s: float | None = None

    def to_dict(self) -> dict:
        return {"host": self.name, "status": self.status, "reason": self.reason,
                "facts": self.facts, "install": self.install, "install_s": self.install_s,
                "jobs": self.jobs, "wall_s": self.wall_s}


def _stdout_json(res: dict) -> dict | None:
    for line in reversed((res.get("stdout") or "").splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def _first_line(text: str) -> str:
    for line in (text or "").splitlines():
        line = line.strip()
        if line:
            return line[:300]
    return ""


def unreachable_status(msg: str) -> tuple[str, str]:
    msg = re.sub(r"^(Task failed: )?Failed to connect to the host via ssh: (ssh: )?", "", msg)
    if "Permission denied" in msg or "Authentication failed" in msg:
        return "authentication failed", _first_line(msg)
    if "Host key verification failed" in msg or "REMOTE HOST IDENTIFICATION" in msg:
        return "unreachable", "host key verification failed (the host's key is not the " \
                              "one known_hosts holds)"
    return "unreachable", _first_line(msg)


class Events:
    """The event handler: each host's state from ansible-runner's events, and a line for
    the console at each step that matters."""

    def __init__(self, names: list[str], job_names: list[str], say, changed):
        self.hosts = {n: Host(n) for n in names}
        self.job_names = job_names
        self.say, self.changed = say, changed
        self.lock = threading.Lock()

    def __call__(self, ev: dict) -> bool:
        d = ev.get("event_data") or {}
        h = self.hosts.get(d.get("host") or "")
        if h is None:
            return True
        with self.lock:
            self._event(h, ev.get("event", ""), d.get("task", ""), d.get("res") or {})
        self.changed(h)
        return True

    def _event(self, h: Host, event: str, task: str, res: dict) -> None:
        if h.status == "pending":
            h.status = "running"
        if event == "runner_on_start":
            if task == "pyvmm run job" and h.started < len(self.job_names):
                h.step = f"running {self.job_names[h.started]}"
                h.started += 1
            elif task.startswith("pyvmm "):
                h.step = task[6:]
            return
        if event == "runner_on_unreachable":
            h.status, h.reason = unreachable_status(res.get("msg", ""))
            self.say(f"{h.name}: {h.status}: {h.reason}")
        elif event == "runner_on_failed":
            self._failed(h, task, res)
        elif event == "runner_on_skipped" and task == "pyvmm push":
            h.install = "already installed"
            self.say(f"{h.name}: this build of pyvmm is already installed: install skipped")
        elif event == "runner_on_ok":
            self._ok(h, task, res)

    def _failed(self, h: Host, task: str, res: dict) -> None:
        msg = res.get("msg") or _first_line(res.get("stderr", "")) or "failed"
        if task == "pyvmm refuse":
            text = msg.replace("pyvmm-fleet ", "", 1)
            kind, _, why = text.partition(": ")
            h.status = {"no KVM": "no KVM", "nofile": "failed"}.get(kind, "incompatible")
            h.reason = text if h.status == "failed" else why
        else:
            h.status = "failed"
            h.reason = f"{task.replace('pyvmm ', '')}: {_first_line(msg)}"
            if "timed out" in msg.lower() or "timeout" in msg.lower():
                h.status = "timed out"
        self.say(f"{h.name}: {h.status}: {h.reason}")

    def _ok(self, h: Host, task: str, res: dict) -> None:
        out = _stdout_json(res)
        if task == "pyvmm check" and out:
            h.facts = out
        elif task == "pyvmm install":
            h.install = "installed"
            h.install_s = (out or {}).get("seconds")
            self.say(f"{h.name}: pyvmm installed in {h.facts.get('root', '?')}")
        elif task == "pyvmm run job" and out and out.get("job"):
            h.jobs[out["job"]] = out
            extra = f": {out['reason']}" if out.get("reason") else ""
            self.say(f"{h.name}: {out['job']} {out['status']} in {out.get('wall_s', 0):.1f} s"
                     + extra)
        elif task == "pyvmm fetch":
            dest = res.get("dest") or ""
            h.fetched.append(os.path.basename(dest).removesuffix(".tar.gz"))


def run_playbook(pdd: str, playbook: str, inventory: str, extravars: dict, limit: str | None,
                 forks: int, events: Events, control_dir: str, timeout_s: float) -> str:
    """Run one playbook; returns ansible-runner's status ('successful', 'failed',
    'canceled', 'timeout'). A KeyboardInterrupt in the caller's thread cancels it."""
    import ansible_runner
    cancel = threading.Event()
    kwargs = dict(private_data_dir=pdd, playbook=playbook, inventory=os.path.abspath(inventory),
                  extravars=extravars, forks=forks, event_handler=events,
                  cancel_callback=cancel.is_set, envvars=env(control_dir), quiet=True,
                  timeout=int(timeout_s),
                  settings={"suppress_ansible_output": True, "job_timeout": int(timeout_s)},
                  rotate_artifacts=1)
    if limit:
        kwargs["limit"] = limit
    thread, runner = ansible_runner.run_async(**kwargs)
    try:
        while thread.is_alive():
            thread.join(0.2)
    except KeyboardInterrupt:
        cancel.set()
        thread.join(60)
        raise
    return runner.status


def close_control_sockets(control_dir: str) -> None:
    """End the SSH control masters Ansible left (ControlPersist): no ssh process of the run
    stays on the controller, and no session on the hosts."""
    for sock in glob.glob(os.path.join(control_dir, "*")):
        subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "pyvmm-fleet"],
                       capture_output=True, timeout=10)
