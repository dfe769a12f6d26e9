#!/bin/sh
# The shared end of lab-tools.sh and fuzz-tools.sh: given the missing Debian packages,
# install them with --install (as root, with apt; the package lists are refreshed only
# if the first attempt fails), else say how and fail. Nothing missing: nothing to do.
#   install-packages.sh MODE LABEL [PACKAGE...]
mode=$1; label=$2; shift 2
[ $# -eq 0 ] && exit 0
if [ "$mode" = "--install" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing $label packages: $*"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "$@" \
        || { apt-get update -q && apt-get install -y -q --no-install-recommends "$@"; }
    exit $?
fi
echo "pyvmm $label: missing tools; install them with: sudo apt-get install $*" >&2
exit 1
