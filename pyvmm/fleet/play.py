"""The playbooks the fleet hands to Ansible, written as JSON (which is YAML) into the
run's private data directory. Every task is named "pyvmm <step>" so the event stream
says where each host is; the host side of every step is hostside.py, run by the script
module with the host's python3.

run:   check -> (refuse) -> directory, push, install (skipped when this build is already
       installed) -> for each job: run, fetch -> always: stop (nothing left running, the
       run's temporary files removed)
clean: stop everything and remove the install root
"""

from __future__ import annotations

import json
import os

ROOT_VAR = "pyvmm_fleet_root"
DEFAULT_ROOT = "~/.cache/pyvmm-fleet"
# the install root on a host: an inventory variable, quoted for the host's shell (~ is
# expanded by hostside.py)
ROOT = f"{{{{ ({ROOT_VAR} | default('{DEFAULT_ROOT}')) | quote }}}}"
HOSTSIDE = "{{ pyvmm_hostside }} "


def _script(args: str, **kw) -> dict:
    return {"script": {"cmd": HOSTSIDE + args, "executable": "python3"}, **kw}


def run_play() -> list[dict]:
    need_install = "pyvmm_reinstall | bool or not facts.installed"
    return [{
        "name": "pyvmm fleet run",
        "hosts": "all",
        "gather_facts": False,
        "become": "{{ pyvmm_become | default(false) | bool }}",
        "tasks": [
            _script(f"check --key {{{{ pyvmm_key }}}} --root {ROOT} "
                    "--python {{ pyvmm_python }} --machine {{ pyvmm_machine }}",
                    name="pyvmm check", register="check", changed_when=False),
            {"name": "pyvmm facts", "set_fact": {"facts": "{{ check.stdout | from_json }}"}},
            # Ansible's own modules run with the python3 the check ran with (interpreter
            # discovery may pick another one, or one that is not there)
            {"name": "pyvmm interpreter",
             "set_fact": {"ansible_python_interpreter": "{{ facts.python_path }}"}},
            {"name": "pyvmm refuse", "fail": {"msg": "pyvmm-fleet {{ facts.refuse }}"},
             "when": "facts.refuse is not none"},
            {"name": "pyvmm directory", "file": {"path": "{{ facts.root }}",
                                                 "state": "directory", "mode": "0700"},
             "when": need_install},
            {"name": "pyvmm push", "copy": {
                "src": "{{ pyvmm_bundle }}", "mode": "0600",
                "dest": "{{ facts.root }}/incoming-{{ pyvmm_key }}.tar.gz"},
             "when": need_install},
            _script("install --key {{ pyvmm_key }} --root {{ facts.root | quote }}",
                    name="pyvmm install", when=need_install),
            {"name": "pyvmm jobs", "block": [
                {"name": "pyvmm job", "include_tasks": "job.json", "loop": "{{ pyvmm_jobs }}",
                 "loop_control": {"loop_var": "job", "label": "{{ job.name }}"}},
            ], "always": [
                _script("stop --root {{ facts.root | quote }} --run {{ pyvmm_run }}",
                        name="pyvmm stop", changed_when=False),
            ]},
        ],
    }]


def job_tasks() -> list[dict]:
    needs = "{{ ('--needs ' + job.needs) if job.needs else '' }}"
    return [
        _script("run --key {{ pyvmm_key }} --root {{ facts.root | quote }} --run "
                "{{ pyvmm_run }} --job {{ job.name }} --timeout {{ job.timeout }} "
                f"{needs} -- {{{{ job.argv | map('quote') | join(' ') }}}}",
                name="pyvmm run job", register="jobres",
                timeout="{{ (job.timeout | int) + 120 }}"),
        {"name": "pyvmm fetch", "fetch": {
            "src": "{{ facts.root }}/runs/{{ pyvmm_run }}/{{ job.name }}.tar.gz",
            "dest": "{{ pyvmm_fetch }}/{{ inventory_hostname }}/{{ job.name }}.tar.gz",
            "flat": True}},
    ]


def stop_play() -> list[dict]:
    """After an interruption: end what the run left on each host."""
    return [{"name": "pyvmm fleet stop", "hosts": "all", "gather_facts": False,
             "become": "{{ pyvmm_become | default(false) | bool }}",
             "tasks": [_script(f"stop --root {ROOT} --run {{{{ pyvmm_run }}}}",
                               name="pyvmm stop", changed_when=False)]}]


def clean_play() -> list[dict]:
    return [{"name": "pyvmm fleet clean", "hosts": "all", "gather_facts": False,
             "become": "{{ pyvmm_become | default(false) | bool }}",
             "tasks": [_script(f"clean --root {ROOT}",
                               name="pyvmm clean", register="cleaned",
                               changed_when=True)]}]


def write(project: str, play: list[dict], name: str) -> str:
    os.makedirs(project, exist_ok=True)
    with open(os.path.join(project, "job.json"), "w") as f:
        json.dump(job_tasks(), f, indent=1)
    path = os.path.join(project, name)
    with open(path, "w") as f:
        json.dump(play, f, indent=1)
    return path
