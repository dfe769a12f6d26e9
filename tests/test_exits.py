"""decode() on hand-made kvm_run images (no KVM needed)."""

import struct

import pytest

from pyvmm.vmm import abi
from pyvmm.vmm.abi import ffi
from pyvmm.vmm.exits import (FailEntry, Hlt, InternalError, Interrupted, Io, MemoryFault, Mmio,
                         Shutdown, SystemEvent, Unknown, decode, describe)

PAGE = 4096


def run_image(reason: int) -> bytearray:
    buf = bytearray(PAGE)
    struct.pack_into("<I", buf, ffi.offsetof("struct kvm_run", "exit_reason"), reason)
    return buf


def test_io_out_reads_data_from_the_page():
    buf = run_image(abi.KVM_EXIT_IO)
    off = ffi.offsetof("struct kvm_run", "io")
    struct.pack_into("<BBHIQ", buf, off, abi.KVM_EXIT_IO_OUT, 1, 0x3F8, 3, 0x1000 - 16)
    buf[0x1000 - 16:0x1000 - 13] = b"abc"
    ex = decode(bytes(buf))
    assert ex == Io(0x3F8, True, 1, 3, b"abc", 0x1000 - 16)
    assert ex.value == ord("a")


def test_io_in_has_no_data():
    buf = run_image(abi.KVM_EXIT_IO)
    struct.pack_into("<BBHIQ", buf, ffi.offsetof("struct kvm_run", "io"),
                     abi.KVM_EXIT_IO_IN, 4, 0x84, 1, 2048)
    ex = decode(buf)
    assert isinstance(ex, Io) and not ex.is_write and ex.data == b"" and ex.size == 4


def test_io_data_outside_the_page_is_an_error():
    buf = run_image(abi.KVM_EXIT_IO)
    struct.pack_into("<BBHIQ", buf, ffi.offsetof("struct kvm_run", "io"),
                     abi.KVM_EXIT_IO_OUT, 4, 0x80, 2, PAGE - 4)
    with pytest.raises(ValueError, match="outside"):
        decode(buf)


def test_mmio_write_and_read():
    buf = run_image(abi.KVM_EXIT_MMIO)
    off = ffi.offsetof("struct kvm_run", "mmio")
    struct.pack_into("<Q8sIB", buf, off, 0xD0000008, b"\x01\x00\x00\x00\0\0\0\0", 4, 1)
    ex = decode(buf)
    assert ex == Mmio(0xD0000008, True, 4, b"\x01\x00\x00\x00") and ex.value == 1
    struct.pack_into("<Q8sIB", buf, off, 0xE0000000, b"\xff" * 8, 4, 0)
    ex = decode(buf)
    assert ex == Mmio(0xE0000000, False, 4, b"")


def test_simple_exits():
    assert decode(run_image(abi.KVM_EXIT_HLT)) == Hlt()
    assert decode(run_image(abi.KVM_EXIT_SHUTDOWN)) == Shutdown()
    assert decode(run_image(abi.KVM_EXIT_INTR)) == Interrupted()


def test_fail_entry():
    buf = run_image(abi.KVM_EXIT_FAIL_ENTRY)
    struct.pack_into("<QI", buf, ffi.offsetof("struct kvm_run", "fail_entry"), 0x80000021, 3)
    assert decode(buf) == FailEntry(0x80000021, 3)


def test_internal_error_keeps_only_ndata_words():
    buf = run_image(abi.KVM_EXIT_INTERNAL_ERROR)
    struct.pack_into("<II3Q", buf, ffi.offsetof("struct kvm_run", "internal"), 1, 2, 7, 8, 9)
    ex = decode(buf)
    assert ex == InternalError(1, (7, 8)) and ex.suberror_name == "EMULATION"
    assert "EMULATION" in describe(ex)


def test_system_event_and_memory_fault():
    buf = run_image(abi.KVM_EXIT_SYSTEM_EVENT)
    struct.pack_into("<IIQ", buf, ffi.offsetof("struct kvm_run", "system_event"), 2, 1, 5)
    ex = decode(buf)
    assert ex == SystemEvent(2, (5,)) and ex.type_name == "RESET"
    buf = run_image(abi.KVM_EXIT_MEMORY_FAULT)
    struct.pack_into("<QQQ", buf, ffi.offsetof("struct kvm_run", "memory_fault"), 8, 0x5000,
                     0x1000)
    assert decode(buf) == MemoryFault(8, 0x5000, 0x1000)


def test_unknown_reason_is_typed_not_an_exception():
    buf = run_image(77)
    struct.pack_into("<Q", buf, ffi.offsetof("struct kvm_run", "hw"), 0x1234)
    ex = decode(buf)
    assert ex == Unknown(77, 0x1234) and "77" in describe(ex)


def test_short_image_is_rejected():
    with pytest.raises(ValueError, match="at least"):
        decode(b"\0" * 100)
