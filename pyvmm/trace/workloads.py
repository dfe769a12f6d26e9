"""Named workloads for `pyvmm trace --vmm NAME[:K]`: a real VMM's start-up without its
command line.

qemu-microvm[:K]  QEMU's microvm machine with KVM and the project's own 64 KiB firmware
                  (guests/qemu-microvm-fw.S), 16 MiB of RAM, no default devices, an
                  isa-debug-exit port, and K virtio-rng devices on virtio-mmio (default
                  0). The firmware brings every device up as a guest driver probing at
                  boot does (queues, then DRIVER_OK), which makes QEMU register one
                  ioeventfd per queue while the guest runs (the during-boot recipe, with
                  a real device model), then writes 0 to isa-debug-exit: QEMU exits with
                  status 1. It marks its start and end on port 0x80 and writes how many
                  devices it brought up to port 0x84.
linux-microvm[:BxQ]  QEMU microvm booting a Linux guest of the lab's making (a small
                  kernel and a static /init, pyvmm/lab/boot/linuxguest.py) with B
                  virtio-blk devices of Q queues each (default 1x1), one virtio-net
                  and one virtio-rng on virtio-mmio: QEMU registers each queue's
                  ioeventfd when the guest's driver brings the queue up, during the
                  guest's boot. /init writes INIT_PORT ("init started", the moment a
                  boot-time measurement wants) and ends the VM through
                  isa-debug-exit. The kernel and initramfs come from the environment
                  (PYVMM_TRACE_LINUX_KERNEL, PYVMM_TRACE_LINUX_INITRD: the lab sets
                  them).
pyvmm-boot[:N]    pyvmm's own Python VMM (`pyvmm boot --json`) booting the during-boot
                  recipe with N registrations then a memslot change: its own per-phase
                  timer is kept beside the trace, two instruments on one start-up.
"""

from __future__ import annotations

import os
import shutil
import sys

from .. import recipe
from ..vmm import guests, layout
from ..errors import PyvmmError

QEMU = "qemu-system-x86_64"
QEMU_PACKAGE = "qemu-system-x86"
MAX_VIRTIO = 24                 # virtio-mmio transports of QEMU 7.2's microvm


def qemu_command(qemu: str | None) -> tuple[list[str], str | None]:
    """How to start QEMU: a binary (a path, or on PATH), or a launcher directory
    (launch.json: another suite's QEMU with its own loader and C library, made by `pyvmm
    lab qemu`). Returns (argv prefix, the C library whose ioctl() it calls, when that is
    not the one ldd finds)."""
    launch = os.path.join(qemu, "launch.json") if qemu else ""
    if qemu and os.path.isdir(qemu) and os.path.exists(launch):
        import json
        try:
            with open(launch) as f:
                ln = json.load(f)
            return ([ln["loader"], "--library-path", ln["library_path"], ln["binary"], "-L",
                     ln["datadir"]], ln["libc"])
        except (OSError, ValueError, KeyError) as e:
            raise PyvmmError(f"--qemu {qemu}: its launch.json is unreadable ({e}): make it "
                             "again with pyvmm lab qemu") from None
    binary = qemu or shutil.which(QEMU)
    if not binary or (os.sep in binary and not os.path.exists(binary)):
        raise PyvmmError(f"{qemu or QEMU} not found: apt-get install {QEMU_PACKAGE} (or sh "
                         "scripts/lab-tools.sh --install), or give --qemu with a binary or "
                         "a launcher of pyvmm lab qemu debian:SUITE")
    return [binary], None


class Workload:
    """A command line, the exit statuses that mean it ran to its end, the port whose
    first write is a milestone, and how many devices the guest should bring up."""

    def __init__(self, name: str, argv: list[str], ok_status: set[int], port,
                 devices: int = 0, spec: str = "", captures_json: bool = False):
        # port: an I/O port whose first guest write is a milestone, or {port: label}
        self.name, self.argv, self.ok_status, self.port = name, argv, ok_status, port
        self.devices, self.spec = devices, spec or name
        self.captures_json = captures_json      # its stdout is a JSON report to keep
        self.libc: str | None = None            # the C library a launcher's QEMU uses


WORKLOADS = {"qemu-microvm": "QEMU microvm, the project's firmware, K virtio-mmio devices "
                             "brought up at boot (qemu-microvm:K)",
             "pyvmm-boot": "pyvmm's own Python VMM booting the during-boot recipe with N "
                           "registrations (pyvmm-boot:N), its phase timer beside the trace",
             "linux-microvm": "QEMU microvm booting a small Linux guest to its /init, with B "
                              "virtio-blk devices of Q queues, a virtio-net and a virtio-rng "
                              "(linux-microvm:BxQ; the lab provides the guest)"}
LINUX_MILESTONES = {layout.SERIAL_PORT: "guest's first output", layout.INIT_PORT: "init started"}
MAX_BLK_QUEUES = 16


def parse(spec: str, qemu: str | None = None) -> Workload:
    """'qemu-microvm' or 'qemu-microvm:K' as a Workload; `qemu` overrides the binary."""
    name, _, arg = spec.strip().partition(":")
    if name not in WORKLOADS:
        raise PyvmmError(f"unknown workload '{spec}': {', '.join(f'{k}[:K]' for k in WORKLOADS)}")
    if name == "linux-microvm":
        return linux_microvm(spec, arg, qemu)
    if arg and not arg.isdigit():
        raise PyvmmError(f"workload '{spec}': K must be a number of devices, e.g. "
                         "qemu-microvm:4")
    k = int(arg or 0)
    if name == "pyvmm-boot":
        exe = os.path.join(os.path.dirname(sys.executable), "pyvmm")
        argv = [exe if os.path.exists(exe) else "pyvmm", "boot", "--recipe",
                recipe.expand("during-boot", k), "--json"]
        return Workload(name, argv, {0}, None, 0, f"{name}:{k}", captures_json=True)
    if k > MAX_VIRTIO:
        raise PyvmmError(f"workload '{spec}': microvm has {MAX_VIRTIO} virtio-mmio "
                         "transports; give K up to that")
    prefix, libc = qemu_command(qemu)
    w = Workload(name, qemu_microvm_argv(prefix, k), {1}, layout.MARKER_PORT, k, f"{name}:{k}")
    w.libc = libc
    return w


def qemu_microvm_argv(qemu, k: int, firmware: str | None = None) -> list[str]:
    """`qemu`: a binary, or the argv prefix that starts one (qemu_command)."""
    fw = firmware or guests.firmware_path("qemu-microvm-fw")
    prefix = [qemu] if isinstance(qemu, str) else list(qemu)
    argv = [*prefix, "-M", "microvm", "-accel", "kvm", "-bios", fw, "-m", "16",
            "-nodefaults", "-no-user-config", "-display", "none",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]
    for _ in range(k):
        argv += ["-device", "virtio-rng-device"]
    return argv


def parse_blk(spec: str, arg: str) -> tuple[int, int]:
    """'BxQ' -> (B, Q); '' -> (1, 1)."""
    if not arg:
        return 1, 1
    b, x, q = arg.partition("x")
    if not x or not b.isdigit() or not q.isdigit() or not 0 <= int(b) <= MAX_VIRTIO - 2 \
            or not 1 <= int(q) <= MAX_BLK_QUEUES:
        raise PyvmmError(f"workload '{spec}': give linux-microvm:BxQ, B virtio-blk devices "
                         f"(0 to {MAX_VIRTIO - 2}) of Q queues (1 to {MAX_BLK_QUEUES}), "
                         "e.g. linux-microvm:2x4")
    return int(b), int(q)


def linux_microvm(spec: str, arg: str, qemu: str | None = None,
                  kernel: str | None = None, initrd: str | None = None) -> Workload:
    b, q = parse_blk(spec, arg)
    kernel = kernel or os.environ.get("PYVMM_TRACE_LINUX_KERNEL")
    initrd = initrd or os.environ.get("PYVMM_TRACE_LINUX_INITRD")
    if not kernel or not initrd or not os.path.exists(kernel) or not os.path.exists(initrd):
        raise PyvmmError("linux-microvm boots the lab's Linux guest: run it in a lab kernel "
                         "(pyvmm lab run trace:linux-microvm, pyvmm lab matrix --workload "
                         "linux-microvm), or give PYVMM_TRACE_LINUX_KERNEL and "
                         "PYVMM_TRACE_LINUX_INITRD")
    prefix, libc = qemu_command(qemu)
    w = Workload("linux-microvm", linux_microvm_argv(prefix, kernel, initrd, b, q), {1},
                 dict(LINUX_MILESTONES), b + 2, f"linux-microvm:{b}x{q}")
    w.libc = libc
    return w


def linux_microvm_argv(qemu, kernel: str, initrd: str, b: int, q: int,
                       accel: str = "kvm") -> list[str]:
    """QEMU microvm with the Linux guest: no option ROMs, no RTC, the ISA serial port
    (discarded), isa-debug-exit, and the devices on virtio-mmio (QEMU puts them on the
    guest's command line)."""
    disk = os.path.join(os.environ.get("TMPDIR", "/tmp"), "pyvmm-linux-microvm.img")
    if not os.path.exists(disk):
        with open(disk, "wb") as f:
            f.truncate(1 << 20)
    prefix = [qemu] if isinstance(qemu, str) else list(qemu)
    argv = [*prefix, "-M", "microvm,x-option-roms=off,rtc=off,isa-serial=on,acpi=off",
            "-accel", accel, "-m", "256", "-smp", "1", "-nodefaults", "-no-user-config",
            "-display", "none", "-serial", "null", "-kernel", kernel, "-initrd", initrd,
            "-append", "console=ttyS0 loglevel=4 io_delay=none panic=-1 rdinit=/init",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]
    for i in range(b):
        argv += ["-drive", f"file={disk},if=none,id=b{i},format=raw,cache=unsafe,"
                           "read-only=on",
                 "-device", f"virtio-blk-device,drive=b{i},num-queues={q}"]
    argv += ["-netdev", "user,id=n0", "-device", "virtio-net-device,netdev=n0",
             "-device", "virtio-rng-device"]
    return argv
