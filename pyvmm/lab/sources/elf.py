"""ELF files and kernel modules (pure): sections, the .modinfo strings, dependencies,
module names, decompression and the load order. A damaged file raises LabError naming
what is wrong, never anything else."""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import struct
import subprocess
import zlib

from ...errors import LabError

MODULE_EXTS = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")


def _unpack(fmt: str, data: bytes, off: int, what: str) -> tuple:
    if off < 0 or off + struct.calcsize(fmt) > len(data):
        raise LabError(f"truncated or damaged ELF file: its {what} at offset {off:#x} lies "
                       f"beyond the file's {len(data)} bytes")
    return struct.unpack_from(fmt, data, off)


def _elf_ident(data: bytes) -> None:
    if data[:4] != b"\x7fELF":
        raise LabError("not an ELF file")
    if len(data) < 6 or data[4] != 2 or data[5] != 1:
        raise LabError("only 64-bit little-endian ELF files are supported")


def elf_section(data: bytes, name: str) -> bytes | None:
    """Contents of the named section of a 64-bit little-endian ELF file, or None.
    A damaged file raises LabError, never anything else."""
    _elf_ident(data)
    shoff, = _unpack("<Q", data, 0x28, "section header offset")
    shentsize, shnum, shstrndx = _unpack("<HHH", data, 0x3A, "section header counts")
    if shoff == 0 or shnum == 0:
        return None
    if shentsize < 64:
        raise LabError(f"damaged ELF file: section headers of {shentsize} bytes (64 expected)")
    if shstrndx >= shnum:
        raise LabError(f"damaged ELF file: section name table {shstrndx} of {shnum} sections")

    def header(i):
        # sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size
        return _unpack("<IIQQQQ", data, shoff + i * shentsize, f"section header {i}")

    def contents(h, what):
        off, size = h[4], h[5]
        if h[1] == 8:               # SHT_NOBITS: no bytes in the file
            return b""
        if off + size > len(data):
            raise LabError(f"truncated or damaged ELF file: {what} ends at {off + size:#x}, "
                           f"beyond the file's {len(data)} bytes")
        return data[off:off + size]

    names = contents(header(shstrndx), "the section name table")
    want = name.encode()
    for i in range(shnum):
        h = header(i)
        end = names.find(b"\0", h[0])
        if h[0] < len(names) and end >= 0 and names[h[0]:end] == want:
            return contents(h, f"section {name}")
    return None


def elf_is_dynamic(data: bytes) -> bool:
    """True when an ELF executable asks for a program interpreter (is not static)."""
    if data[:4] != b"\x7fELF" or len(data) < 5 or data[4] != 2:
        raise LabError("not a 64-bit ELF file")
    phoff, = _unpack("<Q", data, 0x20, "program header offset")
    phentsize, phnum = _unpack("<HH", data, 0x36, "program header counts")
    if phnum and phentsize < 56:
        raise LabError(f"damaged ELF file: program headers of {phentsize} bytes (56 expected)")
    for i in range(phnum):
        p_type, = _unpack("<I", data, phoff + i * phentsize, f"program header {i}")
        if p_type == 3:     # PT_INTERP
            return True
    return False


def modinfo(data: bytes) -> dict[str, list[str]]:
    """The key=value strings of a module's .modinfo section (keys may repeat)."""
    sec = elf_section(data, ".modinfo")
    info: dict[str, list[str]] = {}
    if sec is None:
        return info
    for item in sec.split(b"\0"):
        if b"=" in item:
            k, v = item.decode(errors="replace").split("=", 1)
            info.setdefault(k, []).append(v)
    return info


def module_depends(data: bytes) -> list[str]:
    vals = modinfo(data).get("depends", [""])
    return [norm_module(d) for d in ",".join(vals).split(",") if d]


def norm_module(name: str) -> str:
    """Module names as the kernel sees them: '-' and '_' are the same."""
    base = os.path.basename(name)
    for ext in MODULE_EXTS:
        if base.endswith(ext):
            base = base[:-len(ext)]
            break
    return base.replace("-", "_")


def decompress_module(path: str) -> bytes:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if path.endswith(".xz"):
            return lzma.decompress(raw)
        if path.endswith(".gz"):
            return gzip.decompress(raw)
    except (lzma.LZMAError, OSError, EOFError, zlib.error) as e:
        raise LabError(f"{os.path.basename(path)} is damaged: cannot decompress it "
                       f"({' '.join(str(e).split())})") from None
    if path.endswith(".zst"):
        if not shutil.which("zstd"):
            raise LabError(f"{os.path.basename(path)} is zstd-compressed and zstd is not "
                           "installed: apt-get install zstd")
        p = subprocess.run(["zstd", "-dc", path], capture_output=True)
        if p.returncode != 0:
            raise LabError(f"{os.path.basename(path)} is damaged: zstd cannot decompress it")
        return p.stdout
    return raw


def load_order(root: str, deps: dict[str, list[str]]) -> list[str]:
    """Modules needed by `root`, dependencies first. Raises on a missing module or a cycle."""
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(m: str, chain: tuple[str, ...]):
        if state.get(m) == 2:
            return
        if state.get(m) == 1:
            raise LabError(f"module dependency cycle: {' -> '.join(chain + (m,))}")
        if m not in deps:
            via = f" (needed by {chain[-1]})" if chain else ""
            raise LabError(f"module {m}{via} is not in the kernel package")
        state[m] = 1
        for d in deps[m]:
            visit(d, chain + (m,))
        state[m] = 2
        order.append(m)

    visit(root, ())
    return order
