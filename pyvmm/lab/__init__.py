"""The kernel lab, in stages that each import only the stages before it: the
architecture (arch.py), where kernels come from (sources/), what is built from them
(builds/), booting a kit under QEMU (boot/), and the experiments (experiments/); cli.py
on top."""
