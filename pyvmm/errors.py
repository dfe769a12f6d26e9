"""Errors raised by pyvmm. Every message names what failed and what to do about it."""

from __future__ import annotations

import errno as _errno
import os


# Exit statuses every command shares (README, "Exit codes"):
EXIT_OK = 0
EXIT_FAILED = 1         # it ran, and something failed (a check's violation, a failed variant)
EXIT_NOTHING = 2        # bad input, no permission, or a run that measured nothing
EXIT_FOUND = 3          # --fail-on: the kernel shows the behaviour asked about
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM: what was measured is kept, marked interrupted


def errno_name(err: int) -> str:
    return _errno.errorcode.get(err, f"errno {err}")


class PyvmmError(Exception):
    """Base class: a failure with a one-line, user-facing message."""


class KvmError(PyvmmError):
    """An ioctl on a KVM fd failed.

    Carries the ioctl name, the errno and a hint saying what was wrong and what to do.
    """

    def __init__(self, ioctl: str, err: int, hint: str = ""):
        self.ioctl = ioctl
        self.errno = err
        self.errno_name = errno_name(err)
        self.hint = hint
        msg = f"{ioctl} failed: {self.errno_name} ({os.strerror(err)})"
        if hint:
            msg += f": {hint}"
        super().__init__(msg)


class KvmUnavailable(PyvmmError):
    """/dev/kvm is missing or not accessible."""


class GuestError(PyvmmError):
    """A guest image is unknown, missing or malformed."""


class UnexpectedExit(PyvmmError):
    """The guest stopped in a way the caller did not expect (shutdown, internal error, ...)."""

    def __init__(self, message: str, exit=None, regs=None):
        self.exit = exit
        self.regs = regs
        super().__init__(message)


class GuestTimeout(PyvmmError):
    """The guest did not halt within the time allowed."""

    def __init__(self, message: str, regs=None):
        self.regs = regs
        super().__init__(message)


class ResourceLimit(PyvmmError):
    """A request exceeds a process limit (open files) before touching KVM."""


# --- by layer ---------------------------------------------------------------------------
# Each layer raises its own kind, so a caller can catch one layer's failures; all are
# PyvmmError, which the CLI turns into one line and exit status 2.

class StatsFormatError(PyvmmError, ValueError):
    """A KVM binary-stats blob does not have the layout KVM documents."""


class RecipeError(PyvmmError):
    """A boot recipe does not parse or breaks the ordering rules."""


class CheckError(PyvmmError):
    """A correctness check could not run (as opposed to finding a violation)."""


class CheckSkipped(PyvmmError):
    """A check cannot run on this host (the reason says why)."""


class LabError(PyvmmError):
    """The kernel lab could not do what was asked (with the reason and what to do)."""


class LabHang(LabError):
    """QEMU or the lab inside it stopped making progress and was killed; `stream` holds
    what the lab had sent by then."""

    def __init__(self, msg: str, stream=None):
        super().__init__(msg)
        self.stream = stream


class TraceUnavailable(PyvmmError):
    """tracefs or its syscall events are missing or not writable (bench --per-ioctl)."""


class DiskFull(PyvmmError):
    """No space (or quota) left where pyvmm writes results or its cache."""


NO_SPACE = (28, 122)        # ENOSPC, EDQUOT


def disk_full(path: str, needed: int | None = None, what: str = "") -> DiskFull:
    """The one-line error for a full disk: which path, how much was needed, what is
    intact."""
    need = f" ({needed / 2**20:.1f} MiB needed)" if needed else ""
    kept = f"; {what}" if what else ""
    return DiskFull(f"no space left on the device of {os.path.dirname(path) or '.'} to write "
                    f"{os.path.basename(path)}{need}: free some space or write elsewhere "
                    f"(--out, or PYVMM_CACHE for the lab's cache){kept}")
