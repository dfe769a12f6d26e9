"""KVM binary stats: the pure parser on hand-made blobs, and real stats fds."""

import struct

import pytest

from pyvmm.vmm import kvmstats as stats, layout
from pyvmm.vmm.kvmstats import StatsFormatError, StatsReader, decode_data, diff, parse_layout

NAME = 48


def make_blob(descs, values):
    """descs: [(name, flags, exponent, size)], values: flat list of u64."""
    header = struct.calcsize("<6I")
    id_off = header
    desc_off = id_off + NAME
    data_off = desc_off + len(descs) * (16 + NAME)
    blob = bytearray(struct.pack("<6I", 0, NAME, len(descs), id_off, desc_off, data_off))
    blob += b"kvm-1234".ljust(NAME, b"\0")
    offset = 0
    for name, flags, exp, size in descs:
        blob += struct.pack("<IhHII", flags, exp, size, offset, 0) + name.encode().ljust(NAME,
                                                                                     b"\0")
        offset += 8 * size
    blob += struct.pack(f"<{len(values)}Q", *values)
    return bytes(blob), data_off


def test_parse_and_decode_recorded_shape():
    # cumulative count, instant boolean, peak, a pow2 nanosecond histogram of 3 buckets
    blob, data_off = make_blob([("exits", 0x00, 0, 1), ("ready", 0x41, 0, 1),
                                ("max_mmu_pages", 0x02, 0, 1), ("halt_ns_hist", 0x124, -9, 3)],
                               [7, 1, 300, 1, 2, 3])
    lay = parse_layout(blob)
    assert lay.id == "kvm-1234" and lay.data_offset == data_off and lay.data_size == 48
    d = {x.name: x for x in lay.descs}
    assert d["exits"].type == "cumulative" and d["ready"].unit == "boolean"
    assert d["ready"].type == "instant" and d["max_mmu_pages"].type == "peak"
    h = d["halt_ns_hist"]
    assert h.type == "log_hist" and h.unit == "seconds" and h.base == 2 and h.exponent == -9
    vals = decode_data(lay, blob[data_off:])
    assert vals == {"exits": 7, "ready": 1, "max_mmu_pages": 300, "halt_ns_hist": (1, 2, 3)}


def test_diff_by_type():
    blob, off = make_blob([("exits", 0, 0, 1), ("ready", 0x41, 0, 1)], [5, 1])
    lay = parse_layout(blob)
    assert diff({"exits": 5, "ready": 1}, {"exits": 12, "ready": 0}, lay) == {"exits": 7,
                                                                              "ready": 0}


def test_truncated_blob_is_rejected():
    blob, _ = make_blob([("exits", 0, 0, 1)], [1])
    with pytest.raises(StatsFormatError):
        parse_layout(blob[:10])
    with pytest.raises(StatsFormatError, match="points past"):
        parse_layout(blob[:60])


@pytest.mark.kvm
def test_ioeventfd_doorbells_never_reach_userspace_as_mmio(vm):
    from test_vmm import _doorbell_vm, _run_collect
    n = 12
    addrs = [layout.DOORBELL_BASE + 8 * i for i in range(n)]
    v = _doorbell_vm(vm, addrs)
    fds = [vm.ioeventfd(a, 4) for a in addrs]
    with StatsReader.open(v) as reader:
        before = reader.read()
        assert _run_collect(v) == []
        delta = diff(before, reader.read(), reader.layout)
    assert sum(f.count() for f in fds) == n
    assert delta["mmio_exits"] == 1          # only the guest's read of the unmapped BAR
    assert delta["halt_exits"] == 1


@pytest.mark.kvm
def test_without_ioeventfds_every_doorbell_is_an_mmio_exit(vm):
    from test_vmm import _doorbell_vm, _run_collect
    n = 12
    v = _doorbell_vm(vm, [layout.DOORBELL_BASE + 8 * i for i in range(n)])
    with StatsReader.open(v) as reader:
        before = reader.read()
        assert len(_run_collect(v)) == n
        delta = diff(before, reader.read(), reader.layout)
    assert delta["mmio_exits"] == n + 1


@pytest.mark.kvm
def test_vm_stats_fd_has_named_descriptors(vm):
    with StatsReader.open(vm) as reader:
        names = {d.name for d in reader.layout.descs}
        assert "remote_tlb_flush" in names
        assert reader.describe("remote_tlb_flush").type == "cumulative"
        with pytest.raises(KeyError):
            reader.describe("no_such_stat")
    assert stats.interesting({"exits": 3, "odd": 0, "moved": 2}) == {"exits": 3, "moved": 2}
