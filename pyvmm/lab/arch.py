"""The architecture a lab runs: one value that every stage reads (which Debian packages,
which KVM modules and sources, which emulator and machine), so a second architecture is
a second value, not a copy of the stages."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    name: str                       # as `uname -m` prints it
    debian: str                     # Debian's architecture name
    image_metapackage: str          # the package that always depends on the newest image
    kvm_vendor_module: str          # the module that makes /dev/kvm in the emulated CPU
    kvm_dir: str                    # KVM's architecture directory in the kernel source
    modules_built: tuple[tuple[str, str], ...]   # (module name, .ko file) a rebuild makes
    build_disable: tuple[str, ...]  # make variables that leave out what the lab cannot load
    qemu: str                       # emulator binary
    qemu_package: str               # its Debian package
    qemu_machine: tuple[str, ...]   # machine and CPU options (an emulated CPU with KVM)
    console: str                    # the kernel console's serial device
    lab_cpu_model: str              # what the emulated CPU is called in the results
    lab_backend: str                # how KVM runs inside the lab, in the results
    kernel_target: str              # make target of a whole-kernel build, and its file
    kernel_image: str
    lab_config: str                 # the lab's config fragment (pyvmm/lab/builds/)

    @property
    def source_subset(self) -> tuple[str, ...]:
        """What a module rebuild takes from linux-source; patches may touch nothing else."""
        return ("virt/kvm", self.kvm_dir, "include/linux/kvm_host.h")

    @property
    def built(self) -> dict[str, str]:
        return dict(self.modules_built)


X86_64 = Arch(
    name="x86_64", debian="amd64", image_metapackage="linux-image-amd64",
    kvm_vendor_module="kvm_amd", kvm_dir="arch/x86/kvm",
    modules_built=(("kvm", "kvm.ko"), ("kvm_amd", "kvm-amd.ko")),
    build_disable=("CONFIG_KVM_INTEL=",),
    qemu="qemu-system-x86_64", qemu_package="qemu-system-x86",
    qemu_machine=("-machine", "pc", "-cpu", "EPYC,+svm"), console="ttyS0",
    lab_cpu_model="QEMU EPYC (TCG)", lab_backend="svm (kvm_amd, nested under QEMU TCG)",
    kernel_target="bzImage", kernel_image="arch/x86/boot/bzImage",
    lab_config="lab-x86_64.config")

ARCHES = {a.name: a for a in (X86_64,)}
