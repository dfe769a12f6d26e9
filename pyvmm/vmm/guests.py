"""Find and load the guest images built from guests/*.S (package data)."""

from __future__ import annotations

import os

from .record import Record
from ..errors import GuestError

# The package is installed as files (pip install / make), so its data sits beside this
# module; importlib.resources would cost several ms of imports per process for the same.
# The build writes the guests (guests/*.bin) and the helper (bin/) into the package root.
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class GuestInfo(Record):
    """A guest image: its name, its mode ("real" or "long") and what it does."""

    __slots__ = ("name", "mode", "description")

    def __init__(self, name: str, mode: str, description: str):
        self.name, self.mode, self.description = name, mode, description


GUESTS = {
    "hello": GuestInfo("hello", "real", "real mode: prints a line on COM1 and halts"),
    "doorbell": GuestInfo("doorbell", "long",
                          "64-bit: phase markers, rings the doorbells in the parameter block, "
                          "reads the BAR window, halts"),
    "spin": GuestInfo("spin", "long", "64-bit: never halts (timeout handling)"),
    "triple": GuestInfo("triple", "long", "64-bit: triple-faults (KVM_EXIT_SHUTDOWN)"),
    "mmiofetch": GuestInfo("mmiofetch", "long",
                           "64-bit: jumps into MMIO (KVM_EXIT_INTERNAL_ERROR)"),
    "ringloop": GuestInfo("ringloop", "long",
                          "64-bit: rings doorbell 0 forever, one marker exit per write "
                          "(pyvmm check ioeventfd-ordering)"),
    "readloop": GuestInfo("readloop", "long",
                          "64-bit: reads, reports and writes back PROBE_GPA forever "
                          "(pyvmm check memslot-coherence, guest-memfd)"),
    "stressloop": GuestInfo("stressloop", "long",
                            "64-bit: doorbell, port, coalesced-MMIO writes and a probe read, "
                            "forever (pyvmm stress)"),
    "ptwrite": GuestInfo("ptwrite", "long",
                         "64-bit: builds its own page tables, then times PTE writes against "
                         "data writes (pyvmm bench ptwrite)"),
    "xenloop": GuestInfo("xenloop", "long",
                         "64-bit: EVTCHNOP_send hypercalls (vmmcall) forever, a marker every "
                         "64 (pyvmm stress --xen)"),
}


# Firmware images assembled from guests/ like the guests, for other VMMs (not bootable by
# pyvmm): name -> what it does.
FIRMWARE = {
    "qemu-microvm-fw": "64 KiB -bios image for QEMU microvm: brings up every virtio-mmio "
                       "device it finds (the queues, then DRIVER_OK), then writes "
                       "isa-debug-exit (pyvmm trace --vmm qemu-microvm[:K])",
}


def firmware_path(name: str) -> str:
    if name not in FIRMWARE:
        raise GuestError(f"unknown firmware '{name}': {', '.join(sorted(FIRMWARE))}")
    path = os.path.join(PACKAGE_DIR, "guests", f"{name}.bin")
    if not os.path.isfile(path):
        raise GuestError(f"firmware {name}.bin is not built: reinstall pyvmm (make install) "
                         f"so the build assembles guests/{name}.S")
    return path


def info(name: str) -> GuestInfo:
    try:
        return GUESTS[name]
    except KeyError:
        raise GuestError(f"unknown guest '{name}': choose one of {', '.join(sorted(GUESTS))}") \
            from None


def image_path(name: str) -> str:
    info(name)
    path = os.path.join(PACKAGE_DIR, "guests", f"{name}.bin")
    if not os.path.isfile(path):
        raise GuestError(f"guest image {name}.bin is not built: reinstall pyvmm "
                         f"(make run / pip install .) so the build assembles guests/{name}.S")
    return path


_IMAGES: dict[str, bytes] = {}


def load(name: str) -> bytes:
    """The guest image, read once per process (images are part of the installed
    package and do not change under a running process)."""
    data = _IMAGES.get(name)
    if data is None:
        with open(image_path(name), "rb") as f:
            data = f.read()
        if not data:
            raise GuestError(f"guest image {name}.bin is empty")
        _IMAGES[name] = data
    return data


def helper_path() -> str:
    """The standalone static pyvmm-bootbench executable shipped with the package."""
    p = os.path.join(PACKAGE_DIR, "bin", "pyvmm-bootbench")
    if not os.path.isfile(p):
        raise GuestError("pyvmm-bootbench is not built: reinstall pyvmm (make run)")
    if not os.access(p, os.X_OK):
        os.chmod(p, 0o755)
    return p
