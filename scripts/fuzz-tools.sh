#!/bin/sh
# Tools `make fuzz` needs: clang with its libFuzzer and sanitizer runtimes (Debian:
# clang, libclang-rt-14-dev). Says what is missing and fails; with --install (as root,
# with apt) installs it. Nothing is reinstalled when everything is present.
missing=""
command -v clang >/dev/null 2>&1 || missing="$missing clang"
ls /usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a >/dev/null 2>&1 \
    || missing="$missing libclang-rt-14-dev"
exec sh "$(dirname "$0")/install-packages.sh" "$1" fuzz $missing
