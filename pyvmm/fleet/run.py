"""`pyvmm fleet run`: the jobs on every host of an inventory, one fleet.json.

Everything that can be checked is checked before a host is contacted (the jobs, the
bench's options, the inventory and its hosts, Ansible itself); then the bundle is made
(cached), Ansible runs the play, each host's state follows the event stream and is saved
in fleet.json as it changes, and what each host's jobs wrote is fetched to
results/fleet-<time>/<host>/<job>/ and read into the host's row. Ctrl-C or SIGTERM stops
Ansible, ends what runs on the hosts and keeps what was fetched, the other hosts marked
interrupted; --retry runs only the hosts that did not finish, into the same run."""

from __future__ import annotations

import os
import platform
import secrets
import shutil
import sys
import threading
import time
from dataclasses import dataclass

from ..errors import PyvmmError
from ..results import Saver, envelope, finishing, new_run_dir
from . import bundle, engine, jobs, play, rows

SCHEMA = "pyvmm.fleet/1"
DONE = ("ok", "no QEMU")


@dataclass
class FleetOptions:
    inventory: str
    jobs: list
    limit: str | None = None
    forks: int = 5
    out: str = "results"
    reinstall: bool = False
    become: bool = False
    retry: str | None = None
    timeout_s: float = 3600.0
    specs: list | None = None
    bench_args: str = ""


def hostside_path() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "hostside.py")


def prepare_retry(opts: FleetOptions) -> tuple[dict, list[str]]:
    """The earlier run's document and the hosts it did not finish."""
    path = os.path.join(opts.retry, "fleet.json")
    try:
        import json
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise PyvmmError(f"--retry {opts.retry}: no readable fleet.json there ({e})") from None
    if doc.get("schema") != SCHEMA:
        raise PyvmmError(f"--retry {opts.retry}: {path} is not a fleet run")
    todo = [r["host"] for r in doc["rows"] if r["status"] not in DONE]
    return doc, todo


class FleetRun:
    def __init__(self, opts: FleetOptions, say, progress=None):
        self.o, self.say, self.progress = opts, say, progress
        self.lock = threading.Lock()

    def run(self) -> tuple[dict, str]:
        o = self.o
        why = engine.have_ansible()
        if why:
            raise PyvmmError(f"pyvmm fleet needs Ansible: {why}")
        old = None
        if o.retry:
            old, todo = prepare_retry(o)
            if not todo:
                raise PyvmmError(f"--retry {o.retry}: every host finished; nothing to run")
            o.inventory = o.inventory or old["inventory"]
            o.specs, o.bench_args = old["job_specs"], old.get("bench_args", "")
            o.jobs = jobs.parse(o.specs, o.bench_args)
            o.limit = ",".join(todo)
        names, self.hostvars = engine.hosts(o.inventory, o.limit)
        b = bundle.build(self.say)
        out = o.retry or new_run_dir(o.out, "fleet")
        run_id = f"{os.path.basename(out)}-{secrets.token_hex(3)}"
        fetch = os.path.join(out, ".fetch")
        pdd = os.path.join(out, ".ansible")
        control = os.path.join("/tmp", f"pyvmm-fleet-{os.getpid()}-{secrets.token_hex(2)}")
        project = os.path.join(pdd, "project")
        pb = play.write(project, play.run_play(), "run.json")
        if old is not None:
            doc = old
            doc["status"], doc["finished"] = "running", None
            doc.setdefault("retries", []).append({"hosts": names, "run_id": run_id})
        else:
            doc = envelope(SCHEMA, None, status="running", finished=None,
                           inventory=os.path.abspath(o.inventory), limit=o.limit,
                           jobs=[j.name for j in o.jobs], job_specs=o.specs or [],
                           bench_args=o.bench_args, bundle={
                               "key": b.key, "files": b.files, "bytes": b.bytes,
                               "machine": b.machine, "python": b.python},
                           forks=o.forks, rows=[], timings={}, run_id=run_id)
        rows_by = {r["host"]: r for r in doc["rows"]}
        for n in names:
            rows_by[n] = {"host": n, "status": "pending", "reason": ""}
        doc["rows"] = list(rows_by.values())
        path = os.path.join(out, "fleet.json")
        saver = Saver(path, doc)
        events = engine.Events(names, [j.name for j in o.jobs], self.say,
                               lambda h: self._changed(doc, h, saver))
        extravars = {"pyvmm_hostside": hostside_path(), "pyvmm_key": b.key,
                     "pyvmm_python": b.python, "pyvmm_machine": b.machine,
                     "pyvmm_bundle": b.path, "pyvmm_reinstall": o.reinstall,
                     "pyvmm_jobs": [j.to_vars() for j in o.jobs], "pyvmm_run": run_id,
                     "pyvmm_fetch": os.path.abspath(fetch), "pyvmm_become": o.become}
        t0 = time.monotonic()
        with self.lock:
            saver(force=True)
        try:
            with finishing(doc, lambda: self._save_final(saver), doc["timings"], t0):
                try:
                    status = engine.run_playbook(pdd, pb, o.inventory, extravars, o.limit,
                                                 o.forks, events, control, o.timeout_s)
                except KeyboardInterrupt:
                    self.say("interrupted: stopping what runs on the hosts")
                    self._stop(pdd, project, extravars, names, control)
                    self._finish(doc, events, names, fetch, out, interrupted=True)
                    raise
                doc["ansible_status"] = status
                self._finish(doc, events, names, fetch, out)
                doc["timings"]["per_host_s"] = round((time.monotonic() - t0) / len(names)
                                                     * min(o.forks, len(names)), 2)
                doc["status"] = "complete" if all(
                    r["status"] in DONE for r in doc["rows"]) else "failed"
        finally:
            engine.close_control_sockets(control)
            shutil.rmtree(control, ignore_errors=True)
            if not os.environ.get("PYVMM_FLEET_KEEP"):     # Ansible's artifacts, to debug
                shutil.rmtree(pdd, ignore_errors=True)
            shutil.rmtree(fetch, ignore_errors=True)
        return doc, out

    def _changed(self, doc: dict, h: engine.Host, saver: Saver) -> None:
        with self.lock:
            for i, r in enumerate(doc["rows"]):
                if r["host"] == h.name and r.get("dir") is None:
                    doc["rows"][i] = {"host": h.name, "status": h.status, "reason": h.reason,
                                      "step": h.step, "install": h.install,
                                      "jobs": {k: {"status": v.get("status")}
                                               for k, v in h.jobs.items()}}
            saver()
        if self.progress:
            self.progress(h)

    def _save_final(self, saver: Saver) -> None:
        with self.lock:
            saver(force=True)

    def _finish(self, doc: dict, events: engine.Events, names: list[str], fetch: str,
                out: str, interrupted: bool = False) -> None:
        """Fetched archives unpacked into HOST/JOB/, each host's row read from them."""
        with self.lock:
            for name in names:
                h = events.hosts[name]
                h.wall_s = round(time.monotonic() - h.t0, 1)
                host_dir = os.path.join(out, name)
                src = os.path.join(fetch, name)
                if os.path.isdir(src):
                    os.makedirs(host_dir, exist_ok=True)
                    for f in os.listdir(src):
                        os.replace(os.path.join(src, f), os.path.join(host_dir, f))
                    rows.unpack(host_dir)
                state = h.to_dict()
                if interrupted and h.status in ("pending", "running"):
                    done = {k: v for k, v in h.jobs.items() if k in h.fetched}
                    state["jobs"] = done
                    state["status"], state["reason"] = "interrupted", (
                        f"stopped during {h.step or 'its start'}; kept "
                        f"{', '.join(done) or 'nothing'}")
                elif h.status == "pending":
                    state["status"], state["reason"] = "failed", "Ansible ran nothing here"
                r = rows.row(state, host_dir, self.hostvars.get(name) or {})
                if interrupted and state["status"] == "interrupted":
                    r["status"], r["reason"] = state["status"], state["reason"]
                for i, old in enumerate(doc["rows"]):
                    if old["host"] == name:
                        doc["rows"][i] = r
            rows.flag(doc["rows"])

    def _stop(self, pdd, project, extravars, names, control) -> None:
        """After an interruption: a short play that ends the run's processes on the hosts
        and removes its files (bounded: 60 s)."""
        pb = play.write(project, play.stop_play(), "stop.json")
        quiet = engine.Events(names, [], lambda m: None, lambda h: None)
        try:
            engine.run_playbook(pdd, pb, self.o.inventory, extravars, self.o.limit,
                                self.o.forks, quiet, control, 60)
        except KeyboardInterrupt:
            pass


def clean(inventory: str, limit: str | None, become: bool, say) -> list[dict]:
    """`pyvmm fleet clean`: every host's install root removed (what runs there stopped)."""
    why = engine.have_ansible()
    if why:
        raise PyvmmError(f"pyvmm fleet needs Ansible: {why}")
    names, _ = engine.hosts(inventory, limit)
    import tempfile
    with tempfile.TemporaryDirectory(prefix="pyvmm-fleet-clean-") as pdd:
        control = os.path.join(pdd, "cp")
        pb = play.write(os.path.join(pdd, "project"), play.clean_play(), "clean.json")
        ev = engine.Events(names, [], say, lambda h: None)
        results: dict[str, dict] = {}

        def keep(event):
            d = event.get("event_data") or {}
            if event.get("event") == "runner_on_ok" and d.get("task") == "pyvmm clean":
                results[d.get("host")] = engine._stdout_json(d.get("res") or {}) or {}
            return ev(event)
        ev_call = keep
        try:
            engine.run_playbook(pdd, pb, inventory, {"pyvmm_hostside": hostside_path(),
                                                     "pyvmm_become": become},
                                limit, 5, ev_call, control, 600)
        finally:
            engine.close_control_sockets(control)
    out = []
    for n in names:
        h = ev.hosts[n]
        r = results.get(n)
        out.append({"host": n, "status": "removed" if r and r.get("removed") else
                    ("nothing installed" if r is not None else h.status),
                    "path": (r or {}).get("removed") or (r or {}).get("why"),
                    "bytes": (r or {}).get("bytes"), "reason": h.reason})
    return out


def machine() -> str:
    return f"{platform.machine()} Python {sys.version_info.major}.{sys.version_info.minor}"
