"""The kernel of a Linux guest of the lab's own making (the linux-microvm workload): built
from Debian's source of a series with tinyconfig + lab-guest-x86_64.config (serial,
paravirtual clock, virtio-mmio with virtio-blk, -net, -rng and the console), cached by
version and config as lab kernels are. Its initramfs is boot/linuxguest.py's."""

from __future__ import annotations


from ...errors import LabError
from ..sources.kits import Kit
from .kernel import KernelBuilder

GUEST_HZ = 250
GUEST_SERIES = "6.1"


class GuestKernelBuilder(KernelBuilder):
    """The lab's kernel build, with the guest's fragment and cache entries of its own."""

    flavour = "guest"

    @property
    def config_file(self) -> str:
        return "lab-guest-x86_64.config"

    def localversion(self, patch, hz: int) -> str:
        return "-pyvmm-guest"


def build_kernel(kit: Kit, log=print, install: bool = True):
    """The guest kernel (a BuiltKernel: its vmlinuz is a bzImage) from the source of
    `kit`'s version, cached."""
    if kit.arch.cross_prefix:
        raise LabError("the Linux guest is x86_64 (QEMU microvm)")
    b = GuestKernelBuilder(kit, log=log, install=install)
    return b.cached(None, GUEST_HZ) or b.build(None, GUEST_HZ)
