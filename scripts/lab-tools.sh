#!/bin/sh
# Tools the kernel lab needs: QEMU, a static busybox (it runs inside the initramfs),
# dpkg-deb (unpacks kernel packages), objdump (kernel-check), and for rebuilt KVM
# modules (--kvm-patch, lab matrix) make, patch, xz and the compiler Debian built the
# kernel with (gcc-12 for bookworm's 6.1); for whole-kernel builds (KERNEL@hzN) also
# flex, bison, bc and the libelf and OpenSSL headers; for the arm64 lab (--arch arm64)
# qemu-system-aarch64 and the arm64 cross compiler, binutils and static C library.
# Says what is missing and fails; with --install (as root, with apt) installs it instead.
# Nothing is reinstalled when everything is present.
missing=""
command -v qemu-system-x86_64 >/dev/null 2>&1 || missing="$missing qemu-system-x86"
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "ok installed" \
    || missing="$missing busybox-static"
command -v dpkg-deb >/dev/null 2>&1 || missing="$missing dpkg"
command -v objdump >/dev/null 2>&1 || missing="$missing binutils"
command -v make >/dev/null 2>&1 || missing="$missing make"
command -v patch >/dev/null 2>&1 || missing="$missing patch"
command -v xz >/dev/null 2>&1 || missing="$missing xz-utils"
command -v gcc-12 >/dev/null 2>&1 || missing="$missing gcc-12"
command -v flex >/dev/null 2>&1 || missing="$missing flex"
command -v bison >/dev/null 2>&1 || missing="$missing bison"
command -v bc >/dev/null 2>&1 || missing="$missing bc"
[ -e /usr/include/libelf.h ] || missing="$missing libelf-dev"
[ -e /usr/include/openssl/ssl.h ] || missing="$missing libssl-dev"
command -v qemu-system-aarch64 >/dev/null 2>&1 || missing="$missing qemu-system-arm"
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || missing="$missing gcc-aarch64-linux-gnu"
command -v aarch64-linux-gnu-objdump >/dev/null 2>&1 \
    || missing="$missing binutils-aarch64-linux-gnu"
[ -e /usr/aarch64-linux-gnu/lib/libc.a ] || missing="$missing libc6-dev-arm64-cross"
exec sh "$(dirname "$0")/install-packages.sh" "$1" lab $missing
