"""The KVM ABI as pyvmm sees it: struct layouts (cffi) and ioctl numbers (ioctl_opt).

This is the only module that knows struct layouts and ioctl numbers. Structs that
are newer than the oldest header we support (Debian 12 ships 6.1) are declared here
and checked against their documented sizes by tests/test_abi.py; the others are
checked field by field against the system <linux/kvm.h>.
"""

from __future__ import annotations

from .record import Record

try:        # built ahead of time from _cdef (csrc/build_abi.py): nothing to parse here
    from ._abi import ffi
except ImportError:     # a source tree that was never built: parse the declarations now
    import cffi

    from ._cdef import CDEF, LIBC_CDEF
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

KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1

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


class Ioctl(Record):
    """One ioctl: its name, number, the fd kind it is issued on ("system", "vm" or "vcpu";
    "vm+vcpu" where both accept it) and the cap it needs."""

    __slots__ = ("name", "number", "fd", "cap")

    def __init__(self, name: str, number: int, fd: str, cap: int | None = None):
        self.name, self.number, self.fd, self.cap = name, number, fd, cap

    @property
    def cap_name(self) -> str | None:
        return CAP_NAMES.get(self.cap) if self.cap is not None else None


# name, direction ("", "r", "w", "rw"), nr, argument struct, fd kind, cap
_SPECS = [
    # /dev/kvm
    ("KVM_GET_API_VERSION", "", 0x00, None, "system", None),
    ("KVM_CREATE_VM", "", 0x01, None, "system", None),
    ("KVM_CHECK_EXTENSION", "", 0x03, None, "system", None),
    ("KVM_GET_VCPU_MMAP_SIZE", "", 0x04, None, "system", None),
    ("KVM_GET_SUPPORTED_CPUID", "rw", 0x05, "struct kvm_cpuid2", "system", None),
    # VM fd
    ("KVM_CREATE_VCPU", "", 0x41, None, "vm", None),
    ("KVM_SET_USER_MEMORY_REGION", "w", 0x46, "struct kvm_userspace_memory_region", "vm",
     KVM_CAP_USER_MEMORY),
    ("KVM_SET_USER_MEMORY_REGION2", "w", 0x49, "struct kvm_userspace_memory_region2", "vm",
     KVM_CAP_USER_MEMORY2),
    ("KVM_IOEVENTFD", "w", 0x79, "struct kvm_ioeventfd", "vm", KVM_CAP_IOEVENTFD),
    ("KVM_GET_DIRTY_LOG", "w", 0x42, "struct kvm_dirty_log", "vm", None),
    ("KVM_REGISTER_COALESCED_MMIO", "w", 0x67, "struct kvm_coalesced_mmio_zone", "vm",
     KVM_CAP_COALESCED_MMIO),
    ("KVM_UNREGISTER_COALESCED_MMIO", "w", 0x68, "struct kvm_coalesced_mmio_zone", "vm",
     KVM_CAP_COALESCED_MMIO),
    ("KVM_CREATE_GUEST_MEMFD", "rw", 0xD4, "struct kvm_create_guest_memfd", "vm",
     KVM_CAP_GUEST_MEMFD),
    ("KVM_GET_STATS_FD", "", 0xCE, None, "vm+vcpu", KVM_CAP_BINARY_STATS_FD),
    ("KVM_XEN_HVM_CONFIG", "w", 0x7A, "struct kvm_xen_hvm_config", "vm", KVM_CAP_XEN_HVM),
    ("KVM_XEN_HVM_SET_ATTR", "w", 0xC9, "struct kvm_xen_hvm_attr", "vm", KVM_CAP_XEN_HVM),
    ("KVM_X86_SET_MSR_FILTER", "w", 0xC6, "struct kvm_msr_filter", "vm",
     KVM_CAP_X86_MSR_FILTER),
    # vCPU fd
    ("KVM_RUN", "", 0x80, None, "vcpu", None),
    ("KVM_XEN_VCPU_SET_ATTR", "w", 0xCB, "struct kvm_xen_vcpu_attr", "vcpu", KVM_CAP_XEN_HVM),
    ("KVM_GET_REGS", "r", 0x81, "struct kvm_regs", "vcpu", None),
    ("KVM_SET_REGS", "w", 0x82, "struct kvm_regs", "vcpu", None),
    ("KVM_GET_SREGS", "r", 0x83, "struct kvm_sregs", "vcpu", None),
    ("KVM_SET_SREGS", "w", 0x84, "struct kvm_sregs", "vcpu", None),
    ("KVM_SET_CPUID2", "w", 0x90, "struct kvm_cpuid2", "vcpu", None),
]


def computed_numbers() -> dict[str, int]:
    """Every ioctl number, computed by ioctl-opt from its direction, nr and struct size.
    The build runs this once and stores the result in pyvmm/_ioctl_numbers.py (ioctl-opt
    imports ctypes, a millisecond per process); tests/test_abi.py checks the two agree."""
    from ioctl_opt import IOC, IOC_NONE, IOC_READ, IOC_WRITE
    dirs = {"": IOC_NONE, "r": IOC_READ, "w": IOC_WRITE, "rw": IOC_READ | IOC_WRITE}
    return {name: IOC(dirs[d], KVMIO, nr, ffi.sizeof(ctype) if ctype else 0)
            for name, d, nr, ctype, _, _ in _SPECS}


try:
    from ._ioctl_numbers import NUMBERS as _NUMBERS
    if set(_NUMBERS) != {spec[0] for spec in _SPECS}:
        raise ImportError("stale")
except ImportError:     # a source tree, or a build older than this table
    _NUMBERS = computed_numbers()

_TABLE = [Ioctl(name, _NUMBERS[name], fd, cap) for name, _, _, _, fd, cap in _SPECS]

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


# --- the calls --------------------------------------------------------------------------
# The VMM's syscalls go through these functions. Each returns -errno on failure (never
# raises): ioctl(fd, request, pointer cdata), ioctl_val(fd, request, int),
# mmap(length, prot, flags, fd, offset) -> host address, munmap(address, length),
# madvise(address, length, advice); and getcpu(). They are compiled API-mode calls (pyvmm.vmm._sys, see
# csrc/build_sys.py); a tree that was never built falls back to libc through libffi.
# (fcntl.ioctl() passes an integer argument as a C int, which truncates pointers.)
libc = ffi.dlopen(None)
MAP_FAILED = ffi.cast("void *", -1)

try:
    from ._sys import lib as _sys
    ioctl = _sys.pyvmm_ioctl
    ioctl_val = _sys.pyvmm_ioctl_val
    mmap = _sys.pyvmm_mmap
    munmap = _sys.pyvmm_munmap
    madvise = _sys.pyvmm_madvise
    getcpu = _sys.pyvmm_getcpu
    COMPILED_CALLS = True
except ImportError:     # pragma: no cover - only in a tree that was never built
    COMPILED_CALLS = False

    def ioctl(fd: int, request: int, arg) -> int:
        r = libc.ioctl(fd, request, ffi.cast("void *", arg))
        return r if r >= 0 else -ffi.errno

    def ioctl_val(fd: int, request: int, arg: int) -> int:
        r = libc.ioctl(fd, request, ffi.cast("unsigned long", arg))
        return r if r >= 0 else -ffi.errno

    def mmap(length: int, prot: int, flags: int, fd: int, offset: int) -> int:
        p = libc.mmap(ffi.NULL, length, prot, flags, fd, offset)
        return -ffi.errno if p == MAP_FAILED else int(ffi.cast("uintptr_t", p))

    def munmap(address: int, length: int) -> int:
        return -ffi.errno if libc.munmap(ffi.cast("void *", address), length) else 0

    def madvise(address: int, length: int, advice: int) -> int:
        return -ffi.errno if libc.madvise(ffi.cast("void *", address), length, advice) else 0

    def getcpu() -> int:
        return libc.sched_getcpu()
