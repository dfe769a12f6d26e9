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
    kvm_builtin: bool = False       # Debian's image has KVM built in (no modules to load)
    lab_modules: tuple[str, ...] = ()   # modules /init loads besides KVM's (data port)
    data_tty: str = "/dev/ttyS1"    # where /init writes the lab's data
    cross_prefix: str = ""          # binutils/gcc prefix for this architecture's binaries
    kernel_args: str = "tsc=reliable clocksource=tsc"   # the lab's own kernel parameters
    kbuild_arch: str = "x86"        # ARCH= of a kernel build

    @property
    def source_subset(self) -> tuple[str, ...]:
        """What a module rebuild takes from linux-source; patches may touch nothing else."""
        return ("virt/kvm", self.kvm_dir, "include/linux/kvm_host.h")

    @property
    def built(self) -> dict[str, str]:
        return dict(self.modules_built)

    @property
    def objdump(self) -> str:
        """objdump for this architecture's binaries (the cross one for arm64)."""
        return f"{self.cross_prefix}objdump"

    @property
    def make_args(self) -> tuple[str, ...]:
        """What `make` of a kernel build needs for this architecture on an x86 host."""
        if not self.cross_prefix:
            return ()
        return (f"ARCH={self.kbuild_arch}", f"CROSS_COMPILE={self.cross_prefix}")


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

# arm64: Debian's image has KVM built in (nVHE under QEMU's virtualization=on), the
# virt machine has one UART, so the data goes out through a virtio console (hvc0).
ARM64 = Arch(
    name="aarch64", debian="arm64", image_metapackage="linux-image-arm64",
    kvm_vendor_module="", kvm_dir="arch/arm64/kvm",
    modules_built=(), build_disable=(),
    qemu="qemu-system-aarch64", qemu_package="qemu-system-arm",
    qemu_machine=("-machine", "virt,virtualization=on,gic-version=3", "-cpu", "max"),
    console="ttyAMA0",
    lab_cpu_model="QEMU max (TCG)", lab_backend="nVHE KVM (built in), nested under QEMU TCG",
    kernel_target="Image", kernel_image="arch/arm64/boot/Image",
    lab_config="lab-arm64.config", kvm_builtin=True,
    lab_modules=("virtio_mmio", "virtio_console"), data_tty="/dev/hvc0",
    cross_prefix="aarch64-linux-gnu-", kernel_args="", kbuild_arch="arm64")

ARCHES = {a.name: a for a in (X86_64, ARM64)}
ALIASES = {"x86_64": X86_64, "amd64": X86_64, "x86": X86_64, "arm64": ARM64,
           "aarch64": ARM64}


def get_arch(name: str) -> Arch:
    """'arm64' (or aarch64), 'x86_64' (or amd64, x86) -> its Arch; one line when unknown."""
    from ..errors import LabError
    a = ALIASES.get(name.strip().lower())
    if a is None:
        raise LabError(f"unknown architecture '{name}': the lab runs x86_64 or arm64")
    return a
