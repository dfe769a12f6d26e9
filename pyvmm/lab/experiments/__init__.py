"""The lab's top stage: experiments on a booted kit. options.py (what an experiment is
asked, checked first), ready.py (a kernel ready to boot: tools, packages, kit, modules,
kernel-check), labrun.py (one lab run's skeleton), kernel_lab.py (the sweep in a lab
kernel), jobs.py + inside.py (pyvmm's Python jobs: the host's side and what runs inside
the lab kernel), multi.py (the per-variant loop of matrix.py and vcpus.py)."""
