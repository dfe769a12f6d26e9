"""`pyvmm fleet`: the same jobs on many hosts through Ansible, merged into one table.

jobs.py (the jobs as pyvmm command lines, checked first), bundle.py (pyvmm and what its
jobs import, one archive per build), hostside.py (what runs on each host with nothing but
python3), play.py (the playbooks), engine.py (ansible-runner: the inventory's hosts, the
event stream, cancellation), run.py (a fleet run and its fleet.json), rows.py (a row per
host, groups by kernel, the table and plot), compare.py (two fleet runs), cli.py."""
