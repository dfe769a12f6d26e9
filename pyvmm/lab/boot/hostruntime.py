"""What a lab kernel needs to serve as a fleet host (pyvmm lab hosts): this machine's
OpenSSH server (sshd, its sftp-server, the libraries they load) and this machine's python3
with its whole standard library (Ansible's modules import much more of it than pyvmm's
jobs do), packed at their own paths (archive.pack, cached); and the files of one host
(its host key, the client's public key, sshd_config, passwd, the kernel's config for
hostinfo) as a small archive of its own. The initramfs's /init (initramfs.host_script)
brings up the network and starts sshd; nothing of pyvmm is in it: the fleet installs pyvmm
as on any host."""

from __future__ import annotations

import gzip
import os
import sys
import sysconfig

from ...errors import LabError
from .archive import ldd, pack
from .initramfs import Entry, cpio_newc

SSHD = "/usr/sbin/sshd"
SSH_HELPERS = ("/usr/lib/openssh/sftp-server", "/usr/lib/openssh/sshd-session",
               "/usr/lib/openssh/sshd-auth")
SKIP = {"test", "tests", "idle_test", "idlelib", "tkinter", "turtledemo", "ensurepip",
        "lib2to3", "site-packages", "dist-packages", "config-3", "__phello__"}
NSS = ("libnss_files.so.2",)


class HostRuntime:
    def __init__(self, archive: bytes, python: str, files: int, size: int, cached: bool):
        self.archive, self.python, self.files = archive, python, files
        self.size, self.cached = size, cached


def _stdlib_files() -> list[str]:
    stdlib = sysconfig.get_paths()["stdlib"]
    tag = sys.implementation.cache_tag
    out = []
    for d, dirs, names in os.walk(stdlib):
        dirs[:] = [x for x in dirs if x not in SKIP and not x.startswith("config-")]
        in_cache = os.path.basename(d) == "__pycache__"
        for n in names:
            if in_cache:
                # the plain bytecode only (no -O copies): the emulated CPU does not compile
                if n.endswith(f".{tag}.pyc"):
                    out.append(os.path.join(d, n))
            elif n.endswith((".py", ".so")) or d.endswith("lib-dynload"):
                out.append(os.path.join(d, n))
    return out


def _site_libs() -> set[str]:
    """The system libraries that this interpreter's installed extension modules load
    (libpthread for cffi's backend, libgcc_s for a Rust one...): what a real host has and
    what pyvmm's fleet bundle, unpacked on a lab host, will ask for."""
    out: set[str] = set()
    for base in {p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)}:
        for d, _, names in os.walk(base):
            for n in names:
                if n.endswith(".so") or ".so." in n:
                    out.update(x for x in ldd(os.path.join(d, n))
                               if x.startswith(("/lib", "/usr/lib")))
    return out


def build(log=print) -> HostRuntime:
    if not os.path.exists(SSHD):
        raise LabError(f"{SSHD} not found: a lab host serves SSH with this machine's OpenSSH "
                       "(apt-get install openssh-server, or sh scripts/fleet-tools.sh "
                       "--install)")
    python = os.path.realpath(sys._base_executable)
    files = {SSHD, python, *_stdlib_files()}
    files.update(p for p in SSH_HELPERS if os.path.exists(p))
    libs = set()
    for f in list(files):
        if f == python or f == SSHD or f in SSH_HELPERS or f.endswith(".so") or ".so." in f:
            libs.update(ldd(f))
    files |= libs
    files |= _site_libs()
    # getpwnam's file backend, which glibc loads by name (ldd does not list it)
    libdir = os.path.dirname(next((x for x in libs if "libc.so" in x), "/lib/x86_64-linux-gnu/"))
    files.update(os.path.join(libdir, n) for n in NSS if os.path.exists(os.path.join(libdir, n)))
    files = sorted(f for f in files if os.path.isfile(f))
    blob, cached, size = pack(files, "hostruntime", "a lab host's sshd and Python", log)
    return HostRuntime(blob, python, len(files), size, cached)


SSHD_CONFIG = """\
Port 22
ListenAddress 0.0.0.0
HostKey /etc/ssh/ssh_host_ed25519_key
AuthorizedKeysFile /etc/ssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
UseDNS no
MaxStartups 50
PidFile /run/sshd.pid
LogLevel ERROR
Subsystem sftp /usr/lib/openssh/sftp-server
SetEnv PATH=/usr/bin:/bin:/usr/sbin:/sbin
"""


def host_files(host_key: bytes, client_pub: bytes, python: str, config: bytes | None,
               release: str) -> bytes:
    """One host's own files as a gzip'd newc archive (appended to its initramfs)."""
    d, f, s = 0o040755, 0o100644, 0o100600
    entries = [Entry(p, d) for p in ("etc", "etc/ssh", "root", "run", "run/sshd", "var",
                                     "var/empty", "usr", "usr/bin", "boot")]
    entries += [
        Entry("etc/ssh/ssh_host_ed25519_key", s, host_key),
        Entry("etc/ssh/authorized_keys", f, client_pub),
        Entry("etc/ssh/sshd_config", f, SSHD_CONFIG.encode()),
        Entry("etc/passwd", f, b"root:x:0:0:root:/root:/bin/sh\n"
                               b"sshd:x:101:65534::/run/sshd:/bin/false\n"),
        Entry("etc/group", f, b"root:x:0:\nnogroup:x:65534:\n"),
        Entry("etc/shadow", s, b"root:*:19000:0:99999:7:::\nsshd:*:19000:0:99999:7:::\n"),
        Entry("etc/nsswitch.conf", f, b"passwd: files\ngroup: files\nshadow: files\n"),
        Entry("usr/bin/python3", 0o120777, python.encode()),
    ]
    if config:
        entries.append(Entry(f"boot/config-{release}", f, config))
    return gzip.compress(cpio_newc(entries), compresslevel=6, mtime=0)
