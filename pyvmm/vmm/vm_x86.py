"""The VM ioctls that only x86 has: Xen HVM emulation (KVM_CAP_XEN_HVM: the hypercall
MSR, shared_info, in-kernel event channels) and the MSR filter. A mixin of Vm, which
provides _ioctl, _try_ioctl and check_extension."""

from __future__ import annotations

import errno

from ..errors import PyvmmError
from . import abi
from .abi import ffi


class X86VmIoctls:
    """Methods of Vm; not used alone."""

    # --- Xen HVM emulation (KVM_CAP_XEN_HVM) -------------------------------------------
    def xen_hvm_config(self, flags: int, msr: int = 0x40000200) -> None:
        """KVM_XEN_HVM_CONFIG: e.g. INTERCEPT_HCALL | EVTCHN_SEND, so that KVM handles the
        guest's Xen hypercalls (EVTCHNOP_send in the kernel). Needs KVM_CAP_XEN_HVM, which
        reports the flags this kernel supports. `msr` is the hypercall-page MSR; KVM
        enables its Xen paths (a static key) only once a VM has set one, so a config
        without it would leave every hypercall to KVM's own ABI (-KVM_ENOSYS)."""
        have = self.check_extension(abi.KVM_CAP_XEN_HVM)
        if not have:
            raise PyvmmError("Xen HVM emulation needs KVM_CAP_XEN_HVM, which this kernel "
                             "lacks (built without CONFIG_KVM_XEN)")
        if flags & ~have:
            raise PyvmmError(f"KVM_XEN_HVM_CONFIG flags {flags:#x}: this kernel supports "
                             f"only {have:#x}")
        cfg = ffi.new("struct kvm_xen_hvm_config *")
        cfg.flags, cfg.msr = flags, msr
        self._ioctl("KVM_XEN_HVM_CONFIG", cfg)

    def _xen_attr(self, attr, what: str) -> None:
        def hint(err: int) -> str:
            if err == errno.EINVAL:
                return f"KVM rejected {what} (is KVM_XEN_HVM_CONFIG set with its flag?)"
            return ""
        self._ioctl("KVM_XEN_HVM_SET_ATTR", attr, hint=hint)

    def xen_set_long_mode(self, on: bool = True) -> None:
        """KVM_XEN_ATTR_TYPE_LONG_MODE: the guest's shared_info uses the 64-bit layout."""
        attr = ffi.new("struct kvm_xen_hvm_attr *")
        attr.type = abi.KVM_XEN_ATTR_TYPE_LONG_MODE
        attr.u.long_mode = int(on)
        self._xen_attr(attr, "the long-mode attribute")

    def xen_set_shared_info(self, gpa: int) -> None:
        """KVM_XEN_ATTR_TYPE_SHARED_INFO: KVM maps this guest page as shared_info (through
        a pfn cache that an mmu notifier invalidates when the page's mapping changes)."""
        attr = ffi.new("struct kvm_xen_hvm_attr *")
        attr.type = abi.KVM_XEN_ATTR_TYPE_SHARED_INFO
        attr.u.shared_info.gfn = gpa >> 12
        self._xen_attr(attr, f"shared_info at {gpa:#x}")

    def xen_bind_evtchn(self, send_port: int, deliver_port: int, vcpu: int = 0) -> None:
        """KVM_XEN_ATTR_TYPE_EVTCHN: the guest's EVTCHNOP_send on `send_port` is handled
        by KVM, which raises `deliver_port` on vCPU `vcpu` (2-level event channels)."""
        attr = ffi.new("struct kvm_xen_hvm_attr *")
        attr.type = abi.KVM_XEN_ATTR_TYPE_EVTCHN
        attr.u.evtchn.send_port = send_port
        attr.u.evtchn.type = abi.EVTCHNSTAT_INTERDOMAIN
        attr.u.evtchn.deliver.port.port = deliver_port
        attr.u.evtchn.deliver.port.vcpu = vcpu
        attr.u.evtchn.deliver.port.priority = abi.KVM_IRQ_ROUTING_XEN_EVTCHN_PRIO_2LEVEL
        self._xen_attr(attr, f"event channel {send_port} -> port {deliver_port} of vCPU {vcpu}")

    def set_msr_filter(self, default_allow: bool = True) -> None:
        """KVM_X86_SET_MSR_FILTER with no ranges: replaces the VM's filter. KVM takes
        kvm->lock and waits for a kvm->srcu grace period inside it."""
        filt = ffi.new("struct kvm_msr_filter *")
        filt.flags = abi.KVM_MSR_FILTER_DEFAULT_ALLOW if default_allow else 1
        self._ioctl("KVM_X86_SET_MSR_FILTER", filt)

    def try_set_msr_filter(self) -> int:
        """Raw KVM_X86_SET_MSR_FILTER (default allow): returns the errno."""
        filt = ffi.new("struct kvm_msr_filter *")
        return self._try_ioctl("KVM_X86_SET_MSR_FILTER", filt)[1]
