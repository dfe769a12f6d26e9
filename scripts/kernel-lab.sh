#!/bin/sh
# The kernel lab: the registration sweep on a Debian kernel under QEMU, optionally with
# KVM modules rebuilt with one of the project's patches.
#   scripts/kernel-lab.sh [--kernel 6.1|6.12|7.2|7.3|latest|PATH.deb] [--kvm-patch NAME]
#                         [--smp 1|2] [sweep options]
# Installs what the lab needs (guarded), builds the venv, then runs
# `pyvmm lab kernel` with the arguments given; see docs/lab.md.
set -e
cd "$(dirname "$0")/.."
sh scripts/lab-tools.sh --install
make -s install
exec .venv/bin/pyvmm lab kernel "$@"
