"""The three recipe drivers, side by side: the same boot recipe run by the C helper
in-process (native.py), by the least Python that makes the same calls (floor.py) and by
the Python VMM (runner.py). Each returns the same result dict, so the sweep, `pyvmm boot`
and `bench --python-vs-c` can put them next to each other."""
