"""Shared plumbing for objects that own a KVM file descriptor."""

from __future__ import annotations

import os

from .abi import IOCTLS, ioctl, ioctl_val
from ..errors import KvmError

NUMBERS = {name: i.number for name, i in IOCTLS.items()}


def call(fd: int, name: str, arg=0) -> int:
    """Issue ioctl `name` on `fd`: the result, or -errno. `arg` is an int (passed as
    unsigned long) or a cffi pointer."""
    if isinstance(arg, int):
        return ioctl_val(fd, NUMBERS[name], arg)
    return ioctl(fd, NUMBERS[name], arg)


def raw_ioctl(fd: int, name: str, arg=0) -> tuple[int, int]:
    """Issue ioctl `name` on `fd`; return (result, errno). Never raises on kernel errors."""
    r = call(fd, name, arg)
    return (r, 0) if r >= 0 else (-1, -r)


class FdOwner:
    """Owns one fd; close() is idempotent; usable as a context manager."""

    kind = "fd"

    def __init__(self, fd: int):
        self.fd = fd

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def _live_fd(self) -> int:
        if self.fd < 0:
            raise ValueError(f"{self.kind} is closed")
        return self.fd

    def _try_ioctl(self, name: str, arg=0) -> tuple[int, int]:
        """Raw tier: (result, errno) for negative tests."""
        return raw_ioctl(self._live_fd(), name, arg)

    def _ioctl(self, name: str, arg=0, hint=None) -> int:
        """Normal tier: raises KvmError naming the ioctl, the errno and a hint.
        `hint` is a string or a callable taking the errno and returning a string.

        call()'s dispatch is written out here: every VM and vCPU ioctl of a boot comes
        through this method, and each Python frame it saves is paid for after a KVM
        ioctl, when the interpreter's code is cold (docs/methodology.md)."""
        fd = self.fd
        if fd < 0:
            self._live_fd()                 # raises: closed
        r = (ioctl_val if arg.__class__ is int else ioctl)(fd, NUMBERS[name], arg)
        if r < 0:
            text = hint(-r) if callable(hint) else (hint or "")
            raise KvmError(name, -r, text or "")
        return r

    def _close_fd(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def close(self) -> None:
        self._close_fd()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        # Last resort only: owners are expected to be closed explicitly.
        try:
            self.close()
        except Exception:
            pass
