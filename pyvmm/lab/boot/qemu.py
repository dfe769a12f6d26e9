"""Boot a kit under QEMU's software emulation (TCG) with an emulated SVM CPU.

KVM inside the emulated machine (kvm_amd on `-cpu EPYC,+svm`) gives the old kernel a
working /dev/kvm on any host, KVM or not. Multi-threaded TCG with two vCPUs has hung
on this machine kind, so `--smp 2` uses single-threaded TCG (one host thread runs
both emulated CPUs, round robin).

Serial port 0 (kernel console) and port 1 (the lab's data) go to files that are polled
while QEMU runs; a run that shows no progress within its bounds is killed and reported
with the last lines of both.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections import deque
from dataclasses import dataclass

from ...errors import LabError, LabHang
from ..arch import X86_64, Arch
from .serial import LabStream

QEMU = X86_64.qemu
KERNEL_ARGS = "console={console} panic=-1 quiet"


@dataclass
class QemuConfig:
    kernel: str
    initrd: str
    smp: int = 1
    mem_mb: int = 1024
    boot_timeout_s: float = 120.0    # until the lab's BEGIN marker
    stall_timeout_s: float = 90.0    # longest gap between two data lines after BEGIN
    total_timeout_s: float = 1800.0
    extra_args: str = ""
    arch: Arch = X86_64
    # Another QEMU as the emulator: the argv that starts it (a launcher's loader, library
    # path, binary and -L), None for this host's; and multi-threaded TCG (a thread per
    # emulated CPU) instead of one thread for all of them.
    emulator: tuple[str, ...] | None = None
    mttcg: bool = False


def command(cfg: QemuConfig, console_log: str, data_log: str, qemu: str | None = None) \
        -> list[str]:
    accel = "tcg,thread=multi" if cfg.mttcg else ("tcg" if cfg.smp == 1 else "tcg,thread=single")
    words = [KERNEL_ARGS.format(console=cfg.arch.console), cfg.arch.kernel_args,
             cfg.extra_args]
    append = " ".join(w for w in words if w)
    machine = list(cfg.arch.qemu_machine)
    if cfg.arch.data_tty == "/dev/ttyS1":
        data = ["-serial", f"file:{data_log}"]
    else:       # a virtio console (the machine has one UART)
        data = ["-device", "virtio-serial-device", "-chardev", f"file,id=data,path={data_log}",
                "-device", "virtconsole,chardev=data"]
    start = list(cfg.emulator) if cfg.emulator and not qemu else [qemu or cfg.arch.qemu]
    return [*start, "-nodefaults", "-no-user-config", *machine[:2],
            "-accel", accel, *machine[2:], "-smp", str(cfg.smp), "-m", str(cfg.mem_mb),
            "-display", "none", "-monitor", "none",
            "-serial", f"file:{console_log}", *data,
            "-no-reboot", "-kernel", cfg.kernel, "-initrd", cfg.initrd, "-append", append]


def qemu_version(qemu: str = QEMU, emulator: tuple[str, ...] | None = None) -> str:
    try:
        out = subprocess.run([*(emulator or [qemu]), "--version"], capture_output=True,
                             text=True).stdout
    except OSError:
        return "unknown"
    return out.splitlines()[0] if out else "unknown"


def tail(path: str, n: int = 15) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return [l.rstrip("\r") for l in deque(text.splitlines(), maxlen=n)]


def run(cfg: QemuConfig, workdir: str, on_boot=None, on_stage=None,
        qemu: str | None = None) -> tuple[LabStream, float]:
    """Boot and stream the data port. on_boot(line) per boot line; on_stage(name) when
    the stage changes ('kernel', 'sweep'). Returns the stream and QEMU's wall time.
    `qemu` overrides the emulator binary (the tests use a stand-in that writes the data
    port file and exits, or hangs)."""
    if not cfg.emulator:
        qemu = qemu or shutil.which(cfg.arch.qemu)
        if not qemu:
            raise LabError(f"{cfg.arch.qemu} not found: apt-get install "
                           f"{cfg.arch.qemu_package}")
    console_log = os.path.join(workdir, "console.log")
    data_log = os.path.join(workdir, "data.log")
    for p in (console_log, data_log):
        open(p, "w").close()
    cmd = command(cfg, console_log, data_log, qemu)
    with open(os.path.join(workdir, "qemu.cmd"), "w") as f:
        f.write(" ".join(cmd) + "\n")
    stream = LabStream()
    qerr = open(os.path.join(workdir, "qemu.stderr"), "w")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=qerr, stderr=qerr)
    last_data = t0
    if on_stage:
        on_stage("kernel")

    def pump(data) -> bool:
        """Feed whatever the data port wrote since the last call; True if anything."""
        chunk = data.read()
        if not chunk:
            return False
        was_begun = stream.begun
        for line in stream.feed(chunk.decode(errors="replace")):
            if on_boot:
                on_boot(line)
        if stream.begun and not was_begun and on_stage:
            on_stage("sweep")
        return True

    try:
        with open(data_log, "rb") as data:
            while True:
                exited = proc.poll() is not None
                got = pump(data)
                now = time.monotonic()
                if got:
                    last_data = now
                if exited:
                    pump(data)
                    stream.close()
                    break
                why = None
                if not stream.begun and now - t0 > cfg.boot_timeout_s:
                    why = ("the kernel did not reach the lab's /init within "
                           f"{cfg.boot_timeout_s:.0f} s")
                elif stream.begun and now - last_data > cfg.stall_timeout_s:
                    why = f"no output from the sweep for {cfg.stall_timeout_s:.0f} s"
                elif now - t0 > cfg.total_timeout_s:
                    why = f"the lab ran longer than {cfg.total_timeout_s:.0f} s"
                if why:
                    _kill(proc)
                    pump(data)
                    stream.close()
                    raise LabHang(_hang_text(why, stream, console_log, data_log, workdir), stream)
                time.sleep(0.1)
    except BaseException:
        _kill(proc)
        raise
    finally:
        qerr.close()
    elapsed = time.monotonic() - t0
    if not stream.ended:
        raise LabHang(_hang_text(f"QEMU exited (status {proc.returncode}) before the lab "
                                 "finished", stream, console_log, data_log, workdir), stream)
    return stream, elapsed


_DEATH = re.compile(r"Kernel panic - not syncing:.*|BUG: .*|Oops: .*|"
                    r"general protection fault.*|kernel BUG at .*")


def kernel_death(console_log: str) -> str | None:
    """The first line where the lab kernel said it was dying (a panic, an oops, a BUG),
    which a long call trace after it pushes out of the console's last lines."""
    try:
        with open(console_log, errors="replace") as f:
            for line in f:
                m = _DEATH.search(line)
                if m:
                    return m.group(0).strip()[:200]
    except OSError:
        pass
    return None


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def _hang_text(why: str, stream: LabStream, console_log: str, data_log: str,
               workdir: str) -> str:
    parts = [f"{why} ({len(stream.boots)} boots recorded)."]
    died = kernel_death(console_log)
    if died:
        parts.append(f"the lab kernel said: {died}")
    con = tail(console_log)
    if con:
        parts.append("last kernel console lines:\n  " + "\n  ".join(con))
    dat = [l[:200] for l in tail(data_log, 5)]
    if dat:
        parts.append("last data lines:\n  " + "\n  ".join(dat))
    qerr = [l for l in tail(os.path.join(workdir, "qemu.stderr"), 5)
            if "TCG doesn't support requested feature" not in l]
    if qerr:
        parts.append("QEMU said:\n  " + "\n  ".join(qerr))
    if stream.errors:
        parts.append("errors from the lab: " + "; ".join(stream.errors[-3:]))
    parts.append(f"logs kept in {workdir}")
    return "\n".join(parts)
