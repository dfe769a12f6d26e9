"""The process's one kicker thread: it kicks a vCPU out of KVM_RUN once its deadline has
passed (immediate_exit, then KICK_SIGNAL to the vCPU's thread), so timeouts cost no
thread per boot. Use install_kick_handler() once from the main thread, then
kick_after()."""

from __future__ import annotations

import signal
import threading
import time

KICK_SIGNAL = signal.SIGUSR1


def install_kick_handler() -> bool:
    """Make KICK_SIGNAL interrupt KVM_RUN without killing the process.

    Python can only install handlers from the main thread; returns False elsewhere
    (kick() then relies on immediate_exit, checked at the next entry).
    """
    if signal.getsignal(KICK_SIGNAL) not in (signal.SIG_DFL, None):
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(KICK_SIGNAL, lambda *_: None)
    signal.siginterrupt(KICK_SIGNAL, True)
    return True


class _KickService:
    """One thread for the whole process that kicks a vCPU out of KVM_RUN once its time is
    up (then every 10 ms until cancelled), instead of a watchdog thread per boot or check.
    Use kick_after()."""

    def __init__(self):
        self.cond = threading.Condition()
        self.armed: dict[int, list] = {}     # id -> [deadline, vcpu or None]
        self.next_id = 0
        self.wake_at = 0.0                   # when the thread wakes next, unless notified
        self.thread = threading.Thread(target=self._loop, daemon=True, name="pyvmm-kicker")
        self.thread.start()

    def arm(self, timeout: float, vcpu=None) -> "Kick":
        with self.cond:
            self.next_id += 1
            deadline = time.monotonic() + timeout
            entry = self.armed[self.next_id] = [deadline, vcpu, False]
            if deadline < self.wake_at:
                # Wake the thread only when it would sleep past this deadline: a boot
                # that arms a 10 s deadline every few ms then costs the thread nothing.
                self.cond.notify()
            return Kick(self, self.next_id, entry)

    def _loop(self):
        with self.cond:
            while True:
                now = time.monotonic()
                due = [e for e in self.armed.values() if e[0] <= now]
                for e in due:
                    if e[1] is not None:
                        e[1].kick()
                        e[2] = True
                    e[0] = now + 0.01
                wait = min((e[0] for e in self.armed.values()), default=now + 3600) - now
                self.wake_at = now + max(wait, 0.001)
                self.cond.wait(max(wait, 0.001))


class Kick:
    """One armed deadline: set `vcpu` (if not given to kick_after), read `fired`, and
    cancel() when the work is done; no kick comes after cancel() returns."""

    def __init__(self, service: _KickService, kid: int, entry: list):
        self.service, self.kid, self._entry = service, kid, entry
        self.fired = False

    @property
    def vcpu(self):
        return self._entry[1]

    @vcpu.setter
    def vcpu(self, v):
        # One store into the armed entry: atomic under the GIL, and the kicker thread
        # reads it under its lock, so it sees the old vCPU or the new one. No lock here:
        # this is set inside a boot's timed run phase.
        self._entry[1] = v

    def cancel(self):
        with self.service.cond:
            e = self.service.armed.pop(self.kid, None)
            if e is not None:
                self.fired = self.fired or e[2]


_KICKS: _KickService | None = None


def kick_after(timeout: float, vcpu=None) -> Kick:
    """Kick `vcpu` (or the one set on the returned Kick) out of KVM_RUN once `timeout`
    seconds have passed, and every 10 ms after, until cancelled. Call
    install_kick_handler() first (from the main thread)."""
    global _KICKS
    if _KICKS is None:
        _KICKS = _KickService()
    return _KICKS.arm(timeout, vcpu)
