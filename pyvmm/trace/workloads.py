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


class Workload:
    """A command line, the exit statuses that mean it ran to its end, the port whose
    first write is a milestone, and how many devices the guest should bring up."""

    def __init__(self, name: str, argv: list[str], ok_status: set[int], port: int | None,
                 devices: int = 0, spec: str = "", captures_json: bool = False):
        self.name, self.argv, self.ok_status, self.port = name, argv, ok_status, port
        self.devices, self.spec = devices, spec or name
        self.captures_json = captures_json      # its stdout is a JSON report to keep


WORKLOADS = {"qemu-microvm": "QEMU microvm, the project's firmware, K virtio-mmio devices "
                             "brought up at boot (qemu-microvm:K)",
             "pyvmm-boot": "pyvmm's own Python VMM booting the during-boot recipe with N "
                           "registrations (pyvmm-boot:N), its phase timer beside the trace"}


def parse(spec: str, qemu: str | None = None) -> Workload:
    """'qemu-microvm' or 'qemu-microvm:K' as a Workload; `qemu` overrides the binary."""
    name, _, arg = spec.strip().partition(":")
    if name not in WORKLOADS:
        raise PyvmmError(f"unknown workload '{spec}': {', '.join(f'{k}[:K]' for k in WORKLOADS)}")
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
    binary = qemu or shutil.which(QEMU)
    if not binary:
        raise PyvmmError(f"{QEMU} not found: apt-get install {QEMU_PACKAGE} (or "
                         "sh scripts/lab-tools.sh --install)")
    return Workload(name, qemu_microvm_argv(binary, k), {1}, layout.MARKER_PORT, k,
                    f"{name}:{k}")


def qemu_microvm_argv(binary: str, k: int, firmware: str | None = None) -> list[str]:
    fw = firmware or guests.firmware_path("qemu-microvm-fw")
    argv = [binary, "-M", "microvm", "-accel", "kvm", "-bios", fw, "-m", "16",
            "-nodefaults", "-no-user-config", "-display", "none",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]
    for _ in range(k):
        argv += ["-device", "virtio-rng-device"]
    return argv
