"""A lab variant as one value: which kernel (a Debian version, 'latest' or a .deb), which
of the project's patches, a whole-kernel build's HZ, and the architecture. Parsed once
from its name ('6.1', '6.1+defer-free', '7.3+srcu-kick@hz100', 'arm64:6.1') and carried
whole from the command line to the row it ends in; every rule about what a name may say
lives here, checked without the network."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ...errors import LabError
from ..arch import ARM64, X86_64, Arch, get_arch
from ..sources import debian
from .kernel import HZ_VALUES, check_hz
from .patch import Patch, load_patches

# Debian's CONFIG_HZ on each architecture: a patched arm64 variant without @hzN builds at it
DEBIAN_HZ = {"x86_64": 250, "aarch64": 250}


@dataclass(frozen=True)
class Variant:
    """A kernel spec, an optional patch, for a whole-kernel build its HZ, and the
    architecture. Make one with parse_variant(), which applies every rule."""
    kernel: str
    patch: str | None = None
    hz: int | None = None
    arch: Arch = X86_64

    @property
    def label(self) -> str:
        return (("arm64:" if self.arch == ARM64 else "") + self.kernel
                + (f"+{self.patch}" if self.patch else "")
                + (f"@hz{self.hz}" if self.hz else ""))

    @property
    def whole_kernel(self) -> bool:
        """Built whole from Debian's source (at self.hz) rather than Debian's image."""
        return self.hz is not None

    def get_patch(self) -> Patch | None:
        return load_patches()[self.patch] if self.patch else None


def split_arch(text: str, default: Arch = X86_64) -> tuple[str, Arch]:
    """'arm64:6.1' -> ('6.1', ARM64); without a prefix, `default` (--arch)."""
    head, colon, tail = text.partition(":")
    if colon and head and os.sep not in head and not head[0].isdigit():
        return tail, get_arch(head)
    return text, default


def split_build(text: str) -> tuple[str, int | None]:
    """'7.3@hz100' -> ('7.3', 100): a whole-kernel build at that HZ; no '@': Debian's own
    image (None)."""
    head, at, tail = text.rpartition("@")
    if not at or os.sep in tail:
        return text, None
    m = re.fullmatch(r"hz(\d+)", tail)
    if not m:
        raise LabError(f"unknown build option '@{tail}' in '{text}': give @hzN for a "
                       f"whole-kernel build ticking at N Hz ({', '.join(map(str, HZ_VALUES))}),"
                       " e.g. 7.3@hz100")
    return head, check_hz(int(m.group(1)))


def parse_variant(text: str, patches: dict | None = None, arch: Arch = X86_64,
                  patch: str | None = None) -> Variant:
    """'[ARCH:]KERNEL[+PATCH][@hzN]', checked without touching the network (a .deb path
    may itself hold '+', so only a known patch name after the last '+' splits it).
    `patch` is a patch given apart (lab kernel's --kvm-patch); the name may not name
    another."""
    text = text.strip()
    if not text:
        raise LabError("empty variant: give KERNEL or KERNEL+PATCH, e.g. 6.1+defer-free")
    patches = load_patches() if patches is None else patches
    text, arch = split_arch(text, arch)
    text, hz = split_build(text)
    kernel, named = text, None
    if "+" in text and not text.endswith(".deb"):
        head, _, tail = text.rpartition("+")
        if tail in patches:
            kernel, named = head, tail
        elif os.sep not in text:
            raise LabError(f"unknown KVM patch '{tail}' in variant '{text}': the project has "
                           f"{', '.join(patches) or 'none'} "
                           "(see pyvmm/lab/builds/patches/INDEX)")
    if patch is not None:
        if patch not in patches:
            raise LabError(f"unknown KVM patch '{patch}': the project has "
                           f"{', '.join(patches) or 'none'} (see pyvmm/lab/builds/patches/INDEX)")
        if named and named != patch:
            raise LabError(f"--kernel {text} names patch {named} but --kvm-patch says "
                           f"{patch}: give one")
        named = patch
    debian.check_spec(kernel)
    if named and re.fullmatch(r"\d+\.\d+", kernel) and patches[named].series \
            and kernel not in patches[named].series:
        raise LabError(f"patch {named} is written for {', '.join(patches[named].series)}, not "
                       f"{kernel}: {patches[named].summary}")
    if hz and (kernel.endswith(".deb") or os.sep in kernel):
        raise LabError(f"'{kernel}@hz{hz}': a whole-kernel build starts from a Debian "
                       "version (6.1, 7.3, latest), not a package file")
    if named and not hz and patches[named].whole_kernel():
        raise LabError(f"patch {named} changes the kernel image, not only KVM: it needs a "
                       f"whole-kernel build, e.g. {kernel}+{named}@hz250")
    if arch.kvm_builtin and named and not hz:
        # KVM is built into the image: a patched KVM is a whole-kernel build, at the HZ
        # of Debian's own kernel unless one is asked for
        hz = DEBIAN_HZ[arch.name]
    return Variant(kernel, named, hz, arch)


def parse_variants(text: str, arch: Arch = X86_64) -> list[Variant]:
    """Comma-separated variants, all checked before anything runs; `arch` (--arch) for
    those without an 'arm64:' prefix."""
    patches = load_patches()
    items = [t for t in (x.strip() for x in text.split(",")) if t]
    if not items:
        raise LabError("no variants given: e.g. --variants 6.1,6.1+defer-free,latest")
    out = [parse_variant(t, patches, arch) for t in items]
    labels = [v.label for v in out]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise LabError(f"variant {', '.join(dup)} given twice")
    return out
