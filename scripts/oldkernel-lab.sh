#!/bin/sh
# The old-kernel lab: the registration sweep on Debian's 6.1 or 6.12 under QEMU.
#   scripts/oldkernel-lab.sh [--kernel 6.1|6.12|PATH.deb] [--smp 1|2] [sweep options]
# Installs what it needs (apt, as root), builds pyvmm into .venv, then runs
# `pyvmm lab oldkernel` with the arguments given; see docs/lab.md.
set -e
cd "$(dirname "$0")/.."
sh scripts/lab-tools.sh --install
make -s install
exec .venv/bin/pyvmm lab oldkernel "$@"
