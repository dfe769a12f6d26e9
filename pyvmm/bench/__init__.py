"""The boot-cost bench: the sweep, the C helper in-process, statistics, reports, compare
and export, and ptwrite. Recipes and the Python runner live below it (pyvmm.recipe,
pyvmm.drivers.runner)."""
