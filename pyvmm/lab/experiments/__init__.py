"""The lab's top stage: experiments on a booted kit. What every one does first
(prepare.py: options, variants, tools, kit, modules, kernel-check), the sweep in a lab
kernel (kernel_lab.py), the same sweep on several variants (matrix.py), and pyvmm's
Python workloads in a lab kernel (jobs.py on the host, inner.py inside)."""
