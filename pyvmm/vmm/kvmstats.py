"""KVM binary statistics (KVM_GET_STATS_FD, KVM_CAP_BINARY_STATS_FD).

A stats fd holds a header, an id string, one descriptor per statistic and the data. The
layout is parsed once (parse_layout, a pure function fed bytes); reads then fetch only the
data block with pread.
"""

from __future__ import annotations

import os
import struct
from .fd import FdOwner
from .record import Record
from ..errors import StatsFormatError  # noqa: F401 (re-exported)
from .abi import ffi

HEADER_SIZE = ffi.sizeof("struct kvm_stats_header")
DESC_SIZE = ffi.sizeof("struct kvm_stats_desc")

TYPES = {0: "cumulative", 1: "instant", 2: "peak", 3: "linear_hist", 4: "log_hist"}
UNITS = {0: "", 1: "bytes", 2: "seconds", 3: "cycles", 4: "boolean"}
BASES = {0: 10, 1: 2}

# The statistics worth showing after a boot.
INTERESTING = ("exits", "io_exits", "mmio_exits", "insn_emulation", "insn_emulation_fail",
               "halt_exits", "halt_successful_poll", "mmu_pte_write", "mmu_flooded",
               "mmu_shadow_zapped", "mmu_cache_miss", "remote_tlb_flush", "pf_fixed",
               "pf_taken", "signal_exits", "request_irq_exits", "irq_exits")



class StatDesc(Record):
    """One statistic's descriptor: `size` u64 values at byte `offset` of the data block."""

    __slots__ = ("name", "type", "unit", "base", "exponent", "size", "offset", "bucket_size")

    def __init__(self, name: str, type: str, unit: str, base: int, exponent: int, size: int,
                 offset: int, bucket_size: int):
        self.name, self.type, self.unit, self.base = name, type, unit, base
        self.exponent, self.size, self.offset, self.bucket_size = (exponent, size, offset,
                                                                   bucket_size)

    def scale(self, value: int) -> float:
        return value * (self.base ** self.exponent)


class StatsLayout(Record):
    __slots__ = ("id", "descs", "data_offset", "data_size")

    def __init__(self, id: str, descs: tuple[StatDesc, ...], data_offset: int,
                 data_size: int):
        self.id, self.descs, self.data_offset, self.data_size = (id, descs, data_offset,
                                                                 data_size)


def layout_extent(header: bytes) -> int:
    """How many leading bytes of a stats fd hold its header, id and descriptors."""
    if len(header) < HEADER_SIZE:
        raise StatsFormatError(f"stats blob of {len(header)} bytes is shorter than its header")
    _, name_size, num_desc, id_off, desc_off, _ = struct.unpack_from("<6I", header)
    return max(id_off + name_size, desc_off + num_desc * (DESC_SIZE + name_size))


def parse_layout(blob: bytes) -> StatsLayout:
    """Parse header, id and descriptors from the first bytes of a stats fd."""
    extent = layout_extent(blob)
    _, name_size, num_desc, id_off, desc_off, data_off = struct.unpack_from("<6I", blob)
    if name_size == 0 or extent > len(blob):
        raise StatsFormatError(f"stats header points past the {len(blob)} bytes read "
                               f"(name_size {name_size}, {num_desc} descriptors)")
    ident = blob[id_off:id_off + name_size].split(b"\0", 1)[0].decode(errors="replace")
    descs = []
    data_size = 0
    for i in range(num_desc):
        o = desc_off + i * (DESC_SIZE + name_size)
        dflags, exponent, size, offset, bucket = struct.unpack_from("<IhHII", blob, o)
        name = blob[o + DESC_SIZE:o + DESC_SIZE + name_size].split(b"\0", 1)[0].decode()
        descs.append(StatDesc(name, TYPES.get(dflags & 0xF, f"type{dflags & 0xF}"),
                              UNITS.get((dflags >> 4) & 0xF, "?"),
                              BASES.get((dflags >> 8) & 0xF, 10), exponent, size, offset,
                              bucket))
        data_size = max(data_size, offset + 8 * size)
    return StatsLayout(ident, tuple(descs), data_off, data_size)


def decode_data(layout: StatsLayout, data: bytes) -> dict[str, int | tuple[int, ...]]:
    """Values by name: an int for single-value stats, a tuple for histograms."""
    out: dict[str, int | tuple[int, ...]] = {}
    for d in layout.descs:
        vals = struct.unpack_from(f"<{d.size}Q", data, d.offset)
        out[d.name] = vals[0] if d.size == 1 else vals
    return out


def diff(before: dict, after: dict, layout: StatsLayout | None = None) -> dict:
    """Cumulative stats: after - before. Instant and peak stats: the value after."""
    absolute = {d.name for d in layout.descs if d.type in ("instant", "peak")} if layout else set()
    out = {}
    for name, b in after.items():
        a = before.get(name)
        if a is None or name in absolute:
            out[name] = b
        elif isinstance(b, tuple):
            out[name] = tuple(y - x for x, y in zip(a, b))
        else:
            out[name] = b - a
    return out


class StatsReader(FdOwner):
    """Reads one VM's or vCPU's statistics by name."""

    kind = "stats fd"

    def __init__(self, fd: int):
        super().__init__(fd)
        need = layout_extent(os.pread(fd, HEADER_SIZE, 0))
        self.layout = parse_layout(os.pread(fd, need, 0))

    @classmethod
    def open(cls, owner) -> "StatsReader":
        """KVM_GET_STATS_FD on a Vm or Vcpu."""
        return cls(owner._ioctl("KVM_GET_STATS_FD",
                                hint="this kernel has no binary stats (KVM_CAP_BINARY_STATS_FD)"))

    def read(self) -> dict:
        data = os.pread(self._live_fd(), self.layout.data_size, self.layout.data_offset)
        return decode_data(self.layout, data)

    def describe(self, name: str) -> StatDesc:
        for d in self.layout.descs:
            if d.name == name:
                return d
        raise KeyError(f"no statistic named {name!r} in {self.layout.id}")


def interesting(delta: dict) -> dict:
    """The deltas worth printing: the well-known names, and anything else that moved."""
    return {k: v for k, v in delta.items() if isinstance(v, int) and (k in INTERESTING or v)}
