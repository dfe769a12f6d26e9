"""The boot-cost bench: the sweep on this host (sweep.py), `pyvmm compare` (compare.py),
pyperf export (export.py), both drivers' syscalls through tracefs (syscalls.py) and the
commands (cli.py). The recipe drivers it runs live below it (pyvmm.drivers)."""
