"""The lab's initramfs: busybox, the static helper, the KVM modules, a plan and /init.

Written as a gzip-compressed cpio archive in the "newc" format the kernel unpacks
(Documentation/driver-api/early-userspace/buffer-format.rst). /init loads the modules,
checks /dev/kvm, runs the plan with pyvmm-bootbench and writes everything the host needs
to the second serial port (ttyS1) between BEGIN and END markers, then powers off.
Kernel messages stay on ttyS0, so they never interleave with the data.
"""

from __future__ import annotations

import gzip
import shlex
from dataclasses import dataclass

BEGIN = "PYVMM-LAB-BEGIN"
END = "PYVMM-LAB-END"
FACT = "PYVMM-LAB-FACT"
ERROR = "PYVMM-LAB-ERROR"
DATA_TTY = "/dev/ttyS1"
BUSYBOX_APPLETS = ("sh", "mount", "insmod", "cat", "echo", "uname", "nproc", "stty", "poweroff",
                   "sleep", "ls", "grep", "head", "cut", "tr", "dmesg", "tail", "env", "awk")


@dataclass(frozen=True)
class Entry:
    path: str           # without leading slash
    mode: int           # full st_mode (type bits included)
    data: bytes = b""   # file contents or symlink target
    rdev: tuple[int, int] = (0, 0)   # (major, minor) of a device node
    mtime: int = 0


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


def cpio_newc(entries: list[Entry]) -> bytes:
    """A newc cpio archive of the entries (directories must come before their contents)."""
    out = bytearray()
    ino = 1
    for e in entries + [Entry("TRAILER!!!", 0)]:
        name = e.path.encode() + b"\0"
        nlink = 2 if (e.mode & 0o170000) == 0o040000 else 1
        # ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor
        # namesize check
        fields = [ino, e.mode, 0, 0, nlink, e.mtime, len(e.data), 0, 0, e.rdev[0], e.rdev[1],
                  len(name), 0]
        out += b"070701" + b"".join(b"%08X" % f for f in fields)
        out += name + b"\0" * _pad4(110 + len(name))
        out += e.data + b"\0" * _pad4(len(e.data))
        ino += 1
    return bytes(out)


def read_cpio_newc(blob: bytes) -> dict[str, Entry]:
    """Parse a newc archive back (used by the tests, and to inspect a built image)."""
    if blob[:2] == b"\x1f\x8b":
        blob = gzip.decompress(blob)
    entries: dict[str, Entry] = {}
    off = 0
    while True:
        if blob[off:off + 6] != b"070701":
            raise ValueError(f"bad cpio magic at offset {off}")
        fields = [int(blob[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name = blob[off + 110: off + 110 + namesize - 1].decode()
        off += 110 + namesize
        off += _pad4(off)
        data = blob[off: off + size]
        off += size + _pad4(size)
        if name == "TRAILER!!!":
            return entries
        entries[name] = Entry(name, mode, data, (fields[9], fields[10]))


def init_script(modules: list[str], timeout_ms: int, ioev_len: int,
                clock_cost: bool = True, module_args: dict[str, str] | None = None,
                python: list[str] | None = None, data_tty: str = DATA_TTY) -> str:
    """The /init shell script (busybox sh). `modules` are file names under /modules,
    in load order; `module_args` adds parameters to a module's insmod (by file name).
    With `python` (a command line, e.g. the inner runner) /init runs that instead of the
    helper's plan, with its stdout on the data port. A `data_tty` other than the second
    serial port (arm64's virtio console, /dev/hvc0) exists only once the modules are
    loaded: /init loads them first, saying any failure on the kernel console."""
    q = shlex.quote
    late = data_tty != DATA_TTY
    lines = [
        "#!/bin/sh",
        f"# pyvmm old-kernel lab: load KVM, run the plan, report on {data_tty}, power off.",
        "export PATH=/bin",
        "mount -t proc proc /proc",
        "mount -t sysfs sysfs /sys",
        "mount -t devtmpfs devtmpfs /dev",
    ]
    if late:
        for m in modules:
            lines.append(f"insmod /modules/{q(m)} || {{ echo 'pyvmm-lab: insmod {m} failed'; "
                         "poweroff -f; }")
        lines += [
            "i=0",
            f"while [ ! -c {data_tty} ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done",
            f"[ -c {data_tty} ] || {{ echo 'pyvmm-lab: no {data_tty} (the data port)'; "
            "poweroff -f; }",
        ]
        modules = []
    lines += [
        f"stty -F {data_tty} raw -echo 2>/dev/null",
        f"exec 3>{data_tty}",
        "say() { echo \"$*\" >&3; }",
        f"fail() {{ say \"{ERROR} $*\"; echo \"pyvmm-lab: $*\"; say \"{END} rc=3\"; "
        "poweroff -f; sleep 5; echo o > /proc/sysrq-trigger; }",
        f"say {BEGIN}",
        f"say \"{FACT} kernel $(uname -r)\"",
        f"say \"{FACT} kernel_version $(uname -v)\"",
        f"say \"{FACT} machine $(uname -m)\"",
        f"say \"{FACT} cpus $(nproc)\"",
        f"say \"{FACT} cpu_model $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)\"",
        f"say \"{FACT} cmdline $(cat /proc/cmdline)\"",
        f"say \"{FACT} clocksource $(cat /sys/devices/system/clocksource/clocksource0/"
        "current_clocksource)\"",
    ]
    for m in modules:
        # A module that will not load: the insmod line, what it said and the kernel's
        # last words go back to the host.
        params = (module_args or {}).get(m, "")
        if params:
            lines.append(f"say \"{FACT} module_args {m} {params}\"")
        lines.append(f"insmod /modules/{q(m)} {params} 2>/tmp/insmod || {{ "
                     f"say \"{ERROR} insmod /modules/{m}: $(cat /tmp/insmod)\"; "
                     f"dmesg | tail -n 8 | while read -r l; do say \"{ERROR} dmesg: $l\"; done; "
                     f"fail 'insmod {m} failed'; }}")
    lines += [
        "[ -c /dev/kvm ] || fail 'no /dev/kvm after loading the KVM modules'",
        f"say \"{FACT} modules $(cut -d' ' -f1 /proc/modules | tr '\\n' ' ')\"",
        # Up to 4094 ioeventfds per boot, one fd each: lift the default limit of 1024.
        "ulimit -n 16384 || fail 'cannot raise RLIMIT_NOFILE'",
    ]
    if python:
        lines += [
            "echo 'pyvmm-lab: running pyvmm'",
            f"say \"{FACT} python_start $(cut -d' ' -f1 /proc/uptime)\"",
            " ".join(q(a) for a in python) + " >&3 2>/tmp/err",
            "rc=$?",
        ]
    else:
        lines += [
            "echo 'pyvmm-lab: running the plan'",
            f"/bin/pyvmm-bootbench --plan /plan --timeout-ms {int(timeout_ms)} "
            f"--ioev-len {int(ioev_len)}{' --clock-cost' if clock_cost else ''} >&3 2>/tmp/err",
            "rc=$?",
        ]
    lines += [
        "while read -r l; do say \"" + ERROR + " $l\"; done < /tmp/err",
        f"say \"{END} rc=$rc\"",
        "echo \"pyvmm-lab: done (rc=$rc)\"",
        "poweroff -f",
        "sleep 5",
        "echo o > /proc/sysrq-trigger",
    ]
    return "\n".join(lines) + "\n"


HOST_ADDR, HOST_GATEWAY = "10.0.2.15/24", "10.0.2.2"     # QEMU's user network


def host_script(modules: list[str], module_args: dict[str, str] | None = None,
                data_tty: str = DATA_TTY) -> str:
    """/init of a lab host (pyvmm lab hosts): load KVM and the NIC's modules, bring up
    the network QEMU's user mode forwards SSH to, start sshd, say so on the data port,
    and stay up (the host is stopped by ending QEMU)."""
    q = shlex.quote
    lines = [
        "#!/bin/sh",
        "# pyvmm lab host: KVM, the network and sshd; a fleet host until QEMU is stopped.",
        "export PATH=/bin:/usr/bin:/sbin:/usr/sbin",
        "/bin/busybox mount -t proc proc /proc",
        "/bin/busybox --install -s /bin",
        "mount -t sysfs sysfs /sys",
        "mount -t devtmpfs devtmpfs /dev",
        "mkdir -p /dev/pts /dev/shm /tmp /run/sshd",
        "mount -t devpts devpts /dev/pts",
        "mount -t tmpfs tmpfs /dev/shm",
        f"stty -F {data_tty} raw -echo 2>/dev/null",
        f"exec 3>{data_tty}",
        "say() { echo \"$*\" >&3; }",
        f"fail() {{ say \"{ERROR} $*\"; echo \"pyvmm-lab: $*\"; say \"{END} rc=3\"; "
        "poweroff -f; }",
        f"say {BEGIN}",
        f"say \"{FACT} kernel $(uname -r)\"",
    ]
    for m in modules:
        params = (module_args or {}).get(m, "")
        lines.append(f"insmod /modules/{q(m)} {params} 2>/tmp/insmod || "
                     f"fail \"insmod {m}: $(cat /tmp/insmod)\"")
    lines += [
        "[ -c /dev/kvm ] || fail 'no /dev/kvm after loading the KVM modules'",
        "ulimit -Hn 65536; ulimit -n 65536",
        "ip link set lo up",
        "i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; "
        "i=$((i+1)); done",
        "ip link set eth0 up || fail 'no network interface eth0'",
        f"ip addr add {HOST_ADDR} dev eth0 && ip route add default via {HOST_GATEWAY} "
        "|| fail 'cannot configure eth0'",
        "/usr/sbin/sshd -f /etc/ssh/sshd_config -E /tmp/sshd.log "
        "|| fail \"sshd: $(cat /tmp/sshd.log)\"",
        f"say \"{FACT} host_ready $(cut -d' ' -f1 /proc/uptime)\"",
        "echo 'pyvmm-lab: host ready (sshd on port 22)'",
        "while true; do sleep 3600; done",
    ]
    return "\n".join(lines) + "\n"


def build_host(busybox: bytes, modules: dict[str, bytes], module_args: dict[str, str],
               extra: bytes, data_tty: str = DATA_TTY) -> bytes:
    """A lab host's initramfs: busybox, the modules, /init (host_script), then `extra`
    (the host runtime and the host's own files)."""
    d, f, x = 0o040755, 0o100644, 0o100755
    entries = [Entry(p, d) for p in ("bin", "dev", "proc", "sys", "tmp", "modules")]
    entries += [Entry("bin/busybox", x, busybox), Entry("bin/sh", 0o120777, b"busybox")]
    entries += [Entry(f"modules/{name}", f, data) for name, data in modules.items()]
    entries.append(Entry("init", x, host_script(list(modules), module_args,
                                                data_tty).encode()))
    entries.append(Entry("dev/console", 0o020600, b"", (5, 1)))
    return gzip.compress(cpio_newc(entries), compresslevel=6, mtime=0) + extra


def build(busybox: bytes, helper: bytes, modules: dict[str, bytes], plan: str,
          timeout_ms: int = 60000, ioev_len: int = 4,
          module_args: dict[str, str] | None = None, python: list[str] | None = None,
          extra: bytes = b"", data_tty: str = DATA_TTY) -> bytes:
    """The gzip-compressed initramfs. `modules` maps file name -> contents, in load order.
    `extra` is another gzip'd newc archive appended as is (the kernel unpacks
    concatenated archives in turn): the cached Python runtime."""
    d, f, x = 0o040755, 0o100644, 0o100755
    entries = [Entry(p, d) for p in ("bin", "dev", "proc", "sys", "tmp", "modules")]
    entries += [Entry("bin/busybox", x, busybox), Entry("bin/pyvmm-bootbench", x, helper)]
    entries += [Entry(f"bin/{a}", 0o120777, b"busybox") for a in BUSYBOX_APPLETS]
    entries += [Entry(f"modules/{name}", f, data) for name, data in modules.items()]
    entries.append(Entry("plan", f, plan.encode()))
    entries.append(Entry("init", x, init_script(list(modules), timeout_ms, ioev_len,
                                                module_args=module_args,
                                                python=python, data_tty=data_tty).encode()))
    # The console device must exist before devtmpfs is mounted, for the kernel to open it.
    entries.append(Entry("dev/console", 0o020600, b"", (5, 1)))
    return gzip.compress(cpio_newc(entries), compresslevel=6, mtime=0) + extra
