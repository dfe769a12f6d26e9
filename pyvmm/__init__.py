"""pyvmm: a userspace VMM in Python on /dev/kvm, and a boot-latency lab."""

from .errors import (GuestError, GuestTimeout, KvmError, KvmUnavailable, PyvmmError,
                     ResourceLimit, UnexpectedExit)
from .vmm.kvm import Kvm

__version__ = "0.1.0"

__all__ = ["Kvm", "KvmError", "KvmUnavailable", "PyvmmError", "GuestError", "GuestTimeout",
           "ResourceLimit", "UnexpectedExit", "__version__"]
