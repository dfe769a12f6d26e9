#!/bin/sh
# Tools `make fuzz` needs: clang with its libFuzzer and sanitizer runtimes (Debian:
# clang, libclang-rt-14-dev). Says what is missing and fails; with --install (as root,
# with apt) installs it. Nothing is reinstalled when everything is present.
missing=""
command -v clang >/dev/null 2>&1 || missing="$missing clang"
ls /usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a >/dev/null 2>&1 \
    || missing="$missing libclang-rt-14-dev"
if [ -z "$missing" ]; then exit 0; fi
if [ "$1" = "--install" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing fuzz packages:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends $missing \
        || { apt-get update -q && apt-get install -y -q --no-install-recommends $missing; }
    exit $?
fi
echo "pyvmm fuzz: missing tools; install them with: sudo apt-get install$missing" >&2
exit 1
