"""The KVM ABI as pyvmm sees it: struct layouts (cffi) and ioctl numbers (ioctl_opt).

This is the only module that knows struct layouts and ioctl numbers. Structs that
are newer than the oldest header we support (Debian 12 ships 6.1) are declared here
and checked against their documented sizes by tests/test_abi.py; the others are
checked field by field against the system <linux/kvm.h>.
"""

from __future__ import annotations

from dataclasses import dataclass

import cffi
from ioctl_opt import IOC, IOC_NONE, IOC_READ, IOC_WRITE

from ._cdef import CDEF, LIBC_CDEF


try:        # built ahead of time from _cdef (csrc/build_abi.py): nothing to parse here
    from ._abi import ffi
except ImportError:     # a source tree that was never built: parse the declarations now
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    ffi.cdef(LIBC_CDEF)

KVMIO = 0xAE

# --- capabilities (KVM_CHECK_EXTENSION arguments) ---------------------------------
KVM_CAP_USER_MEMORY = 3
KVM_CAP_COALESCED_MMIO = 15
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_IOEVENTFD = 36
KVM_CAP_READONLY_MEM = 81
KVM_CAP_XEN_HVM = 38             # returns the supported KVM_XEN_HVM_CONFIG_* flags
KVM_CAP_X86_MSR_FILTER = 189
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_IOEVENTFD_ANY_LENGTH = 122
KVM_CAP_BINARY_STATS_FD = 203
KVM_CAP_USER_MEMORY2 = 231
KVM_CAP_MEMORY_FAULT_INFO = 232
KVM_CAP_GUEST_MEMFD = 234
KVM_CAP_GUEST_MEMFD_FLAGS = 244  # returns the supported GUEST_MEMFD_FLAG_* mask

CAP_NAMES = {v: k for k, v in dict(globals()).items() if k.startswith("KVM_CAP_")}

# --- flags --------------------------------------------------------------------------
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEM_GUEST_MEMFD = 1 << 2

KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2

GUEST_MEMFD_FLAG_MMAP = 1 << 0
GUEST_MEMFD_FLAG_INIT_SHARED = 1 << 1

KVM_XEN_HVM_CONFIG_INTERCEPT_HCALL = 1 << 1
KVM_XEN_HVM_CONFIG_SHARED_INFO = 1 << 2
KVM_XEN_HVM_CONFIG_EVTCHN_SEND = 1 << 5
KVM_XEN_ATTR_TYPE_LONG_MODE = 0
KVM_XEN_ATTR_TYPE_SHARED_INFO = 1
KVM_XEN_ATTR_TYPE_EVTCHN = 3
KVM_XEN_VCPU_ATTR_TYPE_VCPU_INFO = 0
KVM_IRQ_ROUTING_XEN_EVTCHN_PRIO_2LEVEL = 0xFFFFFFFF    # (__u32)-1
EVTCHNSTAT_INTERDOMAIN = 2
KVM_MSR_FILTER_DEFAULT_ALLOW = 0

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1


@dataclass(frozen=True)
class Ioctl:
    """One ioctl: its name, number, the fd kind it is issued on and the cap it needs."""

    name: str
    number: int
    fd: str  # "system", "vm" or "vcpu"; "vm+vcpu" where both accept it
    cap: int | None = None

    @property
    def cap_name(self) -> str | None:
        return CAP_NAMES.get(self.cap) if self.cap is not None else None


def _io(nr: int) -> int:
    return IOC(IOC_NONE, KVMIO, nr, 0)


def _ior(nr: int, ctype: str) -> int:
    return IOC(IOC_READ, KVMIO, nr, ffi.sizeof(ctype))


def _iow(nr: int, ctype: str) -> int:
    return IOC(IOC_WRITE, KVMIO, nr, ffi.sizeof(ctype))


def _iowr(nr: int, ctype: str) -> int:
    return IOC(IOC_READ | IOC_WRITE, KVMIO, nr, ffi.sizeof(ctype))


_TABLE = [
    # /dev/kvm
    Ioctl("KVM_GET_API_VERSION", _io(0x00), "system"),
    Ioctl("KVM_CREATE_VM", _io(0x01), "system"),
    Ioctl("KVM_CHECK_EXTENSION", _io(0x03), "system"),
    Ioctl("KVM_GET_VCPU_MMAP_SIZE", _io(0x04), "system"),
    Ioctl("KVM_GET_SUPPORTED_CPUID", _iowr(0x05, "struct kvm_cpuid2"), "system"),
    # VM fd
    Ioctl("KVM_CREATE_VCPU", _io(0x41), "vm"),
    Ioctl("KVM_SET_USER_MEMORY_REGION", _iow(0x46, "struct kvm_userspace_memory_region"),
          "vm", KVM_CAP_USER_MEMORY),
    Ioctl("KVM_SET_USER_MEMORY_REGION2", _iow(0x49, "struct kvm_userspace_memory_region2"),
          "vm", KVM_CAP_USER_MEMORY2),
    Ioctl("KVM_IOEVENTFD", _iow(0x79, "struct kvm_ioeventfd"), "vm", KVM_CAP_IOEVENTFD),
    Ioctl("KVM_GET_DIRTY_LOG", _iow(0x42, "struct kvm_dirty_log"), "vm"),
    Ioctl("KVM_REGISTER_COALESCED_MMIO", _iow(0x67, "struct kvm_coalesced_mmio_zone"), "vm",
          KVM_CAP_COALESCED_MMIO),
    Ioctl("KVM_UNREGISTER_COALESCED_MMIO", _iow(0x68, "struct kvm_coalesced_mmio_zone"),
          "vm", KVM_CAP_COALESCED_MMIO),
    Ioctl("KVM_CREATE_GUEST_MEMFD", _iowr(0xD4, "struct kvm_create_guest_memfd"),
          "vm", KVM_CAP_GUEST_MEMFD),
    Ioctl("KVM_GET_STATS_FD", _io(0xCE), "vm+vcpu", KVM_CAP_BINARY_STATS_FD),
    Ioctl("KVM_XEN_HVM_CONFIG", _iow(0x7A, "struct kvm_xen_hvm_config"), "vm", KVM_CAP_XEN_HVM),
    Ioctl("KVM_XEN_HVM_SET_ATTR", _iow(0xC9, "struct kvm_xen_hvm_attr"), "vm", KVM_CAP_XEN_HVM),
    Ioctl("KVM_X86_SET_MSR_FILTER", _iow(0xC6, "struct kvm_msr_filter"), "vm",
          KVM_CAP_X86_MSR_FILTER),
    # vCPU fd
    Ioctl("KVM_RUN", _io(0x80), "vcpu"),
    Ioctl("KVM_XEN_VCPU_SET_ATTR", _iow(0xCB, "struct kvm_xen_vcpu_attr"), "vcpu",
          KVM_CAP_XEN_HVM),
    Ioctl("KVM_GET_REGS", _ior(0x81, "struct kvm_regs"), "vcpu"),
    Ioctl("KVM_SET_REGS", _iow(0x82, "struct kvm_regs"), "vcpu"),
    Ioctl("KVM_GET_SREGS", _ior(0x83, "struct kvm_sregs"), "vcpu"),
    Ioctl("KVM_SET_SREGS", _iow(0x84, "struct kvm_sregs"), "vcpu"),
    Ioctl("KVM_SET_CPUID2", _iow(0x90, "struct kvm_cpuid2"), "vcpu"),
]

IOCTLS: dict[str, Ioctl] = {i.name: i for i in _TABLE}

# Exported as plain module constants too, for call sites and for the header check.
globals().update({i.name: i.number for i in _TABLE})
KVM_GET_API_VERSION: int
KVM_CREATE_VM: int
KVM_CHECK_EXTENSION: int
KVM_GET_VCPU_MMAP_SIZE: int
KVM_GET_SUPPORTED_CPUID: int
KVM_CREATE_VCPU: int
KVM_SET_USER_MEMORY_REGION: int
KVM_SET_USER_MEMORY_REGION2: int
KVM_IOEVENTFD: int
KVM_CREATE_GUEST_MEMFD: int
KVM_GET_STATS_FD: int
KVM_RUN: int
KVM_GET_REGS: int
KVM_SET_REGS: int
KVM_GET_SREGS: int
KVM_SET_SREGS: int
KVM_SET_CPUID2: int
KVM_GET_DIRTY_LOG: int
KVM_REGISTER_COALESCED_MMIO: int
KVM_UNREGISTER_COALESCED_MMIO: int
KVM_XEN_HVM_CONFIG: int
KVM_XEN_HVM_SET_ATTR: int
KVM_XEN_VCPU_SET_ATTR: int
KVM_X86_SET_MSR_FILTER: int

# Exit reasons (kvm_run.exit_reason)
EXIT_REASONS = {
    0: "UNKNOWN", 1: "EXCEPTION", 2: "IO", 3: "HYPERCALL", 4: "DEBUG", 5: "HLT", 6: "MMIO",
    7: "IRQ_WINDOW_OPEN", 8: "SHUTDOWN", 9: "FAIL_ENTRY", 10: "INTR", 17: "INTERNAL_ERROR",
    24: "SYSTEM_EVENT", 34: "XEN", 39: "MEMORY_FAULT",
}
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_MEMORY_FAULT = 39

# Struct sizes documented in Documentation/virt/kvm/api.rst for structs newer than 6.1.
DOCUMENTED_SIZES = {
    "struct kvm_userspace_memory_region2": 160,
    "struct kvm_create_guest_memfd": 64,
}


def addr(cdata) -> int:
    """Address of a cffi object, as an int to hand to fcntl.ioctl."""
    return int(ffi.cast("uintptr_t", cdata))


# --- libc entry points used with the structs above -------------------------------------
# fcntl.ioctl() passes an integer argument as a C int, which truncates pointers, so the
# raw ioctl(2) is called through cffi instead.
libc = ffi.dlopen(None)
MAP_FAILED = ffi.cast("void *", -1)
