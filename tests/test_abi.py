"""Our cffi layouts and ioctl numbers against the system <linux/kvm.h>."""

import os
import shutil
import subprocess

import pytest

from pyvmm.vmm import abi
from pyvmm.vmm.abi import ffi

# struct -> fields to check (nested names use '.'), all present in the 6.1 header.
CHECKED = {
    "struct kvm_userspace_memory_region": ["slot", "flags", "guest_phys_addr", "memory_size",
                                           "userspace_addr"],
    "struct kvm_regs": ["rax", "rbx", "rsp", "r8", "r15", "rip", "rflags"],
    "struct kvm_segment": ["base", "limit", "selector", "type", "present", "l", "g",
                           "unusable", "padding"],
    "struct kvm_dtable": ["base", "limit", "padding"],
    "struct kvm_sregs": ["cs", "ss", "tr", "ldt", "gdt", "idt", "cr0", "cr3", "cr4", "cr8",
                         "efer", "apic_base", "interrupt_bitmap"],
    "struct kvm_run": ["request_interrupt_window", "immediate_exit", "exit_reason",
                       "ready_for_interrupt_injection", "if_flag", "flags", "cr8", "apic_base",
                       "io.direction", "io.size", "io.port", "io.count", "io.data_offset",
                       "mmio.phys_addr", "mmio.data", "mmio.len", "mmio.is_write",
                       "fail_entry.hardware_entry_failure_reason", "fail_entry.cpu",
                       "internal.suberror", "internal.ndata", "internal.data",
                       "system_event.type", "system_event.ndata", "system_event.data",
                       "kvm_valid_regs", "kvm_dirty_regs", "s"],
    "struct kvm_ioeventfd": ["datamatch", "addr", "len", "fd", "flags", "pad"],
    "struct kvm_stats_header": ["flags", "name_size", "num_desc", "id_offset", "desc_offset",
                                "data_offset"],
    "struct kvm_stats_desc": ["flags", "exponent", "size", "offset", "bucket_size"],
    "struct kvm_cpuid_entry2": ["function", "index", "flags", "eax", "edx", "padding"],
    "struct kvm_dirty_log": ["slot", "dirty_bitmap"],
    "struct kvm_coalesced_mmio_zone": ["addr", "size", "pio"],
}

IOCTLS_IN_61 = ["KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_CHECK_EXTENSION",
                "KVM_GET_VCPU_MMAP_SIZE", "KVM_GET_SUPPORTED_CPUID", "KVM_CREATE_VCPU",
                "KVM_SET_USER_MEMORY_REGION", "KVM_IOEVENTFD", "KVM_GET_STATS_FD", "KVM_RUN",
                "KVM_GET_REGS", "KVM_SET_REGS", "KVM_GET_SREGS", "KVM_SET_SREGS",
                "KVM_SET_CPUID2", "KVM_GET_DIRTY_LOG", "KVM_REGISTER_COALESCED_MMIO",
                "KVM_UNREGISTER_COALESCED_MMIO"]
CAPS_IN_61 = ["KVM_CAP_USER_MEMORY", "KVM_CAP_NR_VCPUS", "KVM_CAP_NR_MEMSLOTS",
              "KVM_CAP_IOEVENTFD", "KVM_CAP_XEN_HVM", "KVM_CAP_MAX_VCPUS",
              "KVM_CAP_IOEVENTFD_ANY_LENGTH", "KVM_CAP_BINARY_STATS_FD",
              "KVM_CAP_COALESCED_MMIO", "KVM_CAP_READONLY_MEM"]


def _offset(ctype: str, path: str) -> int:
    return ffi.offsetof(ctype, *path.split("."))


def _c_program() -> str:
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>",
             "int main(void) {"]
    for st, fields in CHECKED.items():
        lines.append(f'printf("size {st} %zu\\n", sizeof({st}));')
        for f in fields:
            lines.append(f'printf("off {st} {f} %zu\\n", offsetof({st}, {f}));')
    for name in IOCTLS_IN_61:
        lines.append(f'printf("ioctl {name} %lu\\n", (unsigned long)({name}));')
    for name in CAPS_IN_61:
        lines.append(f'printf("cap {name} %d\\n", (int)({name}));')
    lines.append("return 0; }")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def header_facts(tmp_path_factory):
    if not os.path.exists("/usr/include/linux/kvm.h"):
        pytest.skip("requires <linux/kvm.h> (linux-libc-dev)")
    if shutil.which("gcc") is None:
        pytest.skip("requires gcc")
    d = tmp_path_factory.mktemp("abi")
    src = d / "facts.c"
    src.write_text(_c_program())
    exe = d / "facts"
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    facts = {}
    for line in out.splitlines():
        parts = line.split(" ")
        if parts[0] == "off":
            facts[("off", f"{parts[1]} {parts[2]}", parts[3])] = int(parts[4])
        elif parts[0] == "size":
            facts[("size", f"{parts[1]} {parts[2]}")] = int(parts[3])
        else:
            facts[(parts[0], parts[1])] = int(parts[2])
    return facts


@pytest.mark.parametrize("ctype", sorted(CHECKED))
def test_struct_matches_system_header(header_facts, ctype):
    assert ffi.sizeof(ctype) == header_facts[("size", ctype)], ctype
    for f in CHECKED[ctype]:
        assert _offset(ctype, f) == header_facts[("off", ctype, f)], f"{ctype}.{f}"


def test_ioctl_numbers_match_system_header(header_facts):
    for name in IOCTLS_IN_61:
        assert getattr(abi, name) == header_facts[("ioctl", name)], name


def test_cap_numbers_match_system_header(header_facts):
    for name in CAPS_IN_61:
        assert getattr(abi, name) == header_facts[("cap", name)], name


def test_newer_structs_have_documented_sizes():
    for ctype, size in abi.DOCUMENTED_SIZES.items():
        assert ffi.sizeof(ctype) == size, ctype
    # Field placement documented in api.rst for the guest_memfd binding.
    assert ffi.offsetof("struct kvm_userspace_memory_region2", "guest_memfd_offset") == 32
    assert ffi.offsetof("struct kvm_userspace_memory_region2", "guest_memfd") == 40
    # memory_fault sits in the exit union like every other exit.
    assert ffi.offsetof("struct kvm_run", "memory_fault") == 32
    assert ffi.offsetof("struct kvm_run", "memory_fault", "gpa") == 40


def test_newer_ioctl_numbers():
    # _IOW(KVMIO, 0x49, 160-byte struct) and _IOWR(KVMIO, 0xd4, 64-byte struct)
    assert abi.KVM_SET_USER_MEMORY_REGION2 == (1 << 30) | (160 << 16) | (0xAE << 8) | 0x49
    assert abi.KVM_CREATE_GUEST_MEMFD == (3 << 30) | (64 << 16) | (0xAE << 8) | 0xD4


def test_every_ioctl_is_tagged_with_its_fd_kind():
    for i in abi.IOCTLS.values():
        assert i.fd in ("system", "vm", "vcpu", "vm+vcpu")
        if i.cap is not None:
            assert i.cap_name and i.cap_name.startswith("KVM_CAP_")


def test_built_ioctl_numbers_are_ioctl_opts():
    """The table the build wrote (pyvmm/_ioctl_numbers.py) is what ioctl-opt computes now,
    for every ioctl, so importing pyvmm without ioctl-opt loses nothing."""
    from pyvmm.vmm import _ioctl_numbers
    assert _ioctl_numbers.NUMBERS == abi.computed_numbers()
    assert {i.name: i.number for i in abi.IOCTLS.values()} == abi.computed_numbers()


def test_calls_are_compiled_and_return_minus_errno():
    import errno
    import mmap
    import os
    assert abi.COMPILED_CALLS, "pyvmm.vmm._sys was not built"
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        assert abi.ioctl_val(fd, abi.KVM_GET_API_VERSION, 0) == -errno.ENOTTY
        assert abi.ioctl(fd, abi.KVM_GET_REGS, abi.ffi.new("struct kvm_regs *")) == \
            -errno.ENOTTY
    finally:
        os.close(fd)
    assert abi.ioctl_val(-1, abi.KVM_RUN, 0) == -errno.EBADF
    addr = abi.mmap(4096, mmap.PROT_READ | mmap.PROT_WRITE,
                    mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    assert addr > 0 and addr % 4096 == 0
    assert abi.madvise(addr, 4096, 4) == 0          # MADV_DONTNEED
    assert abi.munmap(addr, 4096) == 0
    assert abi.mmap(0, mmap.PROT_READ, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0) == \
        -errno.EINVAL
    assert abi.getcpu() >= 0
