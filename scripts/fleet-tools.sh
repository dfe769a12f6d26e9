#!/bin/sh
# Tools the fleet's tests need: OpenSSH's server (test hosts on loopback addresses, each
# in namespaces of its own) and client, and util-linux's unshare. The fleet itself needs
# only the client on the controller and python3 on the hosts. Says what is missing and
# fails; with --install (as root, with apt) installs it. Nothing is reinstalled when
# everything is present.
missing=""
[ -x /usr/sbin/sshd ] || missing="$missing openssh-server"
command -v ssh >/dev/null 2>&1 || missing="$missing openssh-client"
command -v ssh-keygen >/dev/null 2>&1 || missing="$missing openssh-client"
command -v unshare >/dev/null 2>&1 || missing="$missing util-linux"
missing=$(echo $missing | tr ' ' '\n' | sort -u | tr '\n' ' ')
exec sh "$(dirname "$0")/install-packages.sh" "$1" fleet $missing
