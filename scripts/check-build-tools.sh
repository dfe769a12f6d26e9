#!/bin/sh
# Say which Debian/Ubuntu package provides each missing build tool, then fail.
# With --install (used by .ci/run, as root), install the missing packages instead.
missing=""
need() { command -v "$1" >/dev/null 2>&1 || missing="$missing $2"; }
need gcc gcc
need ld binutils
need objcopy binutils
need make make
need python3 python3
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing="$missing python3-venv"
python3 - <<'PY' >/dev/null 2>&1 || missing="$missing python3-dev"
import os, sysconfig
raise SystemExit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else 1)
PY
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || [ -e /usr/lib64/libc.a ] || [ -e /usr/lib/libc.a ] || missing="$missing libc6-dev"
missing=$(echo $missing | tr ' ' '\n' | sort -u | tr '\n' ' ')
if [ -z "$(echo $missing)" ]; then exit 0; fi
if [ "$1" = "--install" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing build packages:$missing"
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing
    exit $?
fi
echo "pyvmm: missing build tools; install them with: sudo apt-get install $missing" >&2
exit 1
