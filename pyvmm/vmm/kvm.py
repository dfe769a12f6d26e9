"""Kvm: the system fd (/dev/kvm)."""

from __future__ import annotations

import errno
import os

from . import abi
from .abi import ffi
from .fd import FdOwner
from ..errors import KvmError, KvmUnavailable

DEFAULT_PATH = "/dev/kvm"
_Vm = None          # pyvmm.vmm.vm.Vm, once a VM has been created

# Capabilities reported by `pyvmm info`, in display order.
INFO_CAPS = [
    ("ioeventfd", abi.KVM_CAP_IOEVENTFD),
    ("ioeventfd any length", abi.KVM_CAP_IOEVENTFD_ANY_LENGTH),
    ("user memory", abi.KVM_CAP_USER_MEMORY),
    ("user memory2", abi.KVM_CAP_USER_MEMORY2),
    ("guest_memfd", abi.KVM_CAP_GUEST_MEMFD),
    ("guest_memfd flags", abi.KVM_CAP_GUEST_MEMFD_FLAGS),
    ("memory fault info", abi.KVM_CAP_MEMORY_FAULT_INFO),
    ("binary stats fd", abi.KVM_CAP_BINARY_STATS_FD),
    ("nr memslots", abi.KVM_CAP_NR_MEMSLOTS),
    ("nr vcpus (recommended)", abi.KVM_CAP_NR_VCPUS),
    ("max vcpus", abi.KVM_CAP_MAX_VCPUS),
    ("xen hvm", abi.KVM_CAP_XEN_HVM),
]


def open_kvm_fd(path: str = DEFAULT_PATH) -> int:
    """Open /dev/kvm, turning the two common failures into actionable messages."""
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KvmUnavailable(
            f"{path} does not exist: this host has no KVM. Load the module "
            "(modprobe kvm_intel or kvm_amd), enable virtualization in the firmware, "
            "or run on a host/VM with nested virtualization") from None
    except PermissionError:
        raise KvmUnavailable(
            f"{path}: permission denied: run as root or add your user to the 'kvm' group "
            "(sudo usermod -aG kvm $USER, then log in again)") from None
    except OSError as e:
        raise KvmUnavailable(f"cannot open {path}: {e.strerror}") from None


class Kvm(FdOwner):
    """The KVM system fd. `with Kvm() as kvm: vm = kvm.create_vm()`."""

    kind = "/dev/kvm fd"

    def __init__(self, path: str = DEFAULT_PATH):
        super().__init__(open_kvm_fd(path))
        self.path = path
        version = self.get_api_version()
        if version != 12:
            self.close()
            raise KvmUnavailable(f"{path} reports KVM API version {version}, pyvmm needs 12")
        self.api_version = version
        self._mmap_size: int | None = None
        self._cpuid = None

    def get_api_version(self) -> int:
        """KVM_GET_API_VERSION."""
        return self._ioctl("KVM_GET_API_VERSION")

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the system fd: 0 when absent, else a cap-specific value."""
        ret, err = self._try_ioctl("KVM_CHECK_EXTENSION", cap)
        return 0 if err else ret

    def get_vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE: bytes to mmap from each vCPU fd (kvm_run and friends)."""
        if self._mmap_size is None:
            self._mmap_size = self._ioctl("KVM_GET_VCPU_MMAP_SIZE")
        return self._mmap_size

    def get_supported_cpuid(self):
        """KVM_GET_SUPPORTED_CPUID, asked once per Kvm object: a `struct kvm_cpuid2 *`
        ready to hand to Vcpu.set_cpuid()."""
        if self._cpuid is None:
            nent = 256
            buf = ffi.new("uint8_t[]", ffi.sizeof("struct kvm_cpuid2")
                          + nent * ffi.sizeof("struct kvm_cpuid_entry2"))
            cpuid = ffi.cast("struct kvm_cpuid2 *", buf)
            cpuid.nent = nent
            self._ioctl("KVM_GET_SUPPORTED_CPUID", cpuid,
                        hint=lambda e: f"more than {nent} CPUID entries" if e == errno.E2BIG
                        else "")
            self._cpuid = (buf, cpuid)
        return self._cpuid[1]

    def caps_summary(self, vm=None) -> dict[str, int]:
        """Capabilities that matter to pyvmm: {name: value}. Asks the VM fd when given,
        since some caps (guest_memfd flags, memslots) are per VM type."""
        target = vm if vm is not None else self
        return {name: target.check_extension(cap) for name, cap in INFO_CAPS}

    def create_vm(self, vm_type: int = 0):
        """KVM_CREATE_VM. Returns a Vm that owns the new fd."""
        global _Vm
        if _Vm is None:     # imported on first use (import pyvmm stays light), then kept:
            from .vm import Vm as _Vm   # an import statement per VM costs a boot ~4 us
        fd = self._ioctl("KVM_CREATE_VM", vm_type, hint=_create_vm_hint)
        return _Vm(self, fd)


_SHARED: dict[str, Kvm] = {}


def shared(path: str = DEFAULT_PATH) -> Kvm:
    """One open /dev/kvm per path for the life of the process, as a VMM holds it: the
    API version, the vCPU mmap size and the supported CPUID are asked once, not once per
    VM. Closed at interpreter exit; whoever holds it must not close it."""
    kvm = _SHARED.get(path)
    if kvm is None or kvm.fd < 0:
        kvm = _SHARED[path] = Kvm(path)
        if len(_SHARED) == 1:
            import atexit
            atexit.register(_close_shared)
    return kvm


def _close_shared() -> None:
    for kvm in _SHARED.values():
        kvm.close()
    _SHARED.clear()


def _create_vm_hint(err: int) -> str:
    if err == errno.EMFILE:
        return "too many open files: raise the limit with ulimit -n"
    if err == errno.ENOMEM:
        return "the kernel could not allocate a VM"
    if err == errno.EINVAL:
        return "this VM type is not supported by the host"
    return ""


__all__ = ["Kvm", "KvmError", "KvmUnavailable", "open_kvm_fd", "INFO_CAPS"]
