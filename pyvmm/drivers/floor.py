"""The floor: the least Python a boot recipe can run on this host.

The same ioctls, mappings, guest writes and measurements as the C helper and the Python
VMM (a wall and a thread-CPU clock read at every phase edge, a wall clock read around
every timed ioctl, the marker events), written straight through: no classes, no typed
exits, no error hints, one /dev/kvm for the process. Whatever the floor costs over the C
helper, any Python VMM pays on this host (cold interpreter code after every ioctl);
what pyvmm's VMM costs over the floor is its own. `pyvmm bench --python-vs-c` runs the
three interleaved (drivers 'c', 'floor', 'py').

Only what the sweep's recipes need: the doorbell guest in long mode; a failed ioctl ends
the boot with the ioctl and errno and nothing more (the result says ok False).
"""

from __future__ import annotations

import errno
import mmap
import os
import resource
import signal
import struct
import threading
import time

from ..vmm import abi, guests, layout
from ..vmm.abi import ffi
from ..errors import PyvmmError
from ..vmm.kvm import shared
from ..recipe import Recipe, native_module
from ..vmm.kicker import KICK_SIGNAL, install_kick_handler, kick_after
from ..vmm.x86 import long_mode_sregs_patch, long_mode_tables

MAP_NORESERVE = 0x4000
_PRW = mmap.PROT_READ | mmap.PROT_WRITE
_ANON = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE
_EXIT = struct.Struct("<I20xBBHIQ").unpack_from      # reason, then the io fields
_MMIO = struct.Struct("<Q8sIB").unpack_from           # kvm_run.mmio at offset 32
_TARGETS = {"probe": layout.MARK_PROBE, "rung": layout.MARK_RUNG, "halt": 0}
_BAR_SLOTS = 16


class _Kickable:
    """What the process's kicker thread needs to end a KVM_RUN that overran: set
    immediate_exit in the run page and signal the thread (vcpu.kick's work)."""

    __slots__ = ("page", "tid")

    def __init__(self):
        self.page = None
        self.tid = None

    def kick(self):
        if self.page is not None:
            self.page[1] = 1               # kvm_run.immediate_exit
            if self.tid is not None:
                signal.pthread_kill(self.tid, KICK_SIGNAL)


def make(ioev_len: int = 4, timeout: float | None = 10.0):
    """A boot(recipe) -> result dict (the C helper's shape) for the floor driver."""
    kvm = shared()
    kfd = kvm.fd
    cpuid = kvm.get_supported_cpuid()
    run_size = kvm.get_vcpu_mmap_size()
    image = guests.load("doorbell")
    tables = long_mode_tables()
    patch = long_mode_sregs_patch()
    batch_min = native_module().lib.BB_BATCH_MIN
    bar_bytes = layout.BAR_PATTERN.to_bytes(4, "little")
    io, iv, mono, cpu = abi.ioctl, abi.ioctl_val, time.monotonic_ns, time.thread_time_ns
    getrlimit, RLIMIT_NOFILE = resource.getrlimit, resource.RLIMIT_NOFILE
    new = ffi.new
    KVM_SET_USER_MEMORY_REGION, KVM_IOEVENTFD = abi.KVM_SET_USER_MEMORY_REGION, \
        abi.KVM_IOEVENTFD
    KVM_RUN, KVM_EXIT_IO, KVM_EXIT_HLT, KVM_EXIT_MMIO = abi.KVM_RUN, abi.KVM_EXIT_IO, \
        abi.KVM_EXIT_HLT, abi.KVM_EXIT_MMIO
    marker_port, data_port, rung, abort = layout.MARKER_PORT, layout.DATA_PORT, \
        layout.MARK_RUNG, layout.MARK_ABORT
    bell_lo = layout.DOORBELL_BASE
    bell_hi = bell_lo + layout.DOORBELL_STRIDE * layout.PARAM_MAX_DOORBELLS
    if timeout:
        install_kick_handler()

    def check(r, what):
        if r < 0:
            raise PyvmmError(f"floor: {what} failed: {errno.errorcode.get(-r, -r)}")
        return r

    def boot(recipe: Recipe) -> dict:
        res = {"ok": False, "error": "", "errno": 0, "failed_step": -1, "boot_wall_ns": 0,
               "boot_cpu_ns": 0, "phases": [], "events": [], "doorbells_expected": 0,
               "doorbells_completed": 0, "doorbell_mmio_exits": 0, "other_mmio_exits": 0,
               "io_exits": 0, "exits": 0, "bar_value": 0, "halted": False,
               "cpu_start": abi.getcpu(), "cpu_end": -1, "pinned_cpu": -1,
               "samples_dropped": 0}
        phases, events = res["phases"], res["events"]
        vm = vcpu = ram = bar = -1
        vcpus: list[tuple[int, int]] = []       # (vCPU fd, run page address)
        page = None
        bells: list[tuple[int, int]] = []       # (eventfd, address)
        nbar = nexits = nio = 0
        kickable = _Kickable()
        kick = kick_after(timeout, kickable) if timeout else None
        deadline = time.monotonic() + timeout if timeout else None
        t0 = mono()

        def params():
            blob = struct.pack(f"<QQ{len(bells)}Q", layout.PARAM_MAGIC, len(bells),
                               *(a for _, a in bells))
            ffi.memmove(ffi.cast("char *", ram) + layout.PARAM_GPA, blob, len(blob))

        error = None
        try:
            for i, step in enumerate(recipe.steps):
                op, n = step.op, step.count
                samples: list[int] = []
                end_marker = batch = 0
                w0, c0 = mono(), cpu()
                if op == "vm":
                    vm = check(iv(kfd, abi.KVM_CREATE_VM, 0), "KVM_CREATE_VM")
                elif op == "mem":
                    ram = check(abi.mmap(layout.RAM_SIZE, _PRW, _ANON, -1, 0), "mmap")
                    check(io(vm, KVM_SET_USER_MEMORY_REGION, new(
                        "struct kvm_userspace_memory_region *",
                        (0, 0, 0, layout.RAM_SIZE, ram))), "KVM_SET_USER_MEMORY_REGION")
                    p = ffi.cast("char *", ram)
                    ffi.memmove(p + layout.CODE_GPA, image, len(image))
                    ffi.memmove(p + layout.GDT_GPA, tables, len(tables))
                    params()
                    bar = check(abi.mmap(layout.BAR_SIZE * _BAR_SLOTS, _PRW, _ANON, -1, 0),
                                "mmap")
                    ffi.memmove(ffi.cast("char *", bar), bar_bytes, 4)
                elif op == "vcpu":
                    for _ in range(n):
                        fd = check(iv(vm, abi.KVM_CREATE_VCPU, len(vcpus)), "KVM_CREATE_VCPU")
                        run = abi.mmap(run_size, _PRW, mmap.MAP_SHARED, fd, 0)
                        vcpus.append((fd, run))
                        check(run, "mmap of kvm_run")
                        if vcpu == -1:              # the recipe runs vCPU 0
                            vcpu = fd
                            page = ffi.buffer(ffi.cast("char *", run), run_size)
                        vfd = fd
                        check(io(vfd, abi.KVM_SET_CPUID2, cpuid), "KVM_SET_CPUID2")
                        sregs = new("struct kvm_sregs *")
                        check(io(vfd, abi.KVM_GET_SREGS, sregs), "KVM_GET_SREGS")
                        buf = ffi.buffer(sregs)
                        for off, data in patch:
                            buf[off:off + len(data)] = data
                        check(io(vfd, abi.KVM_SET_SREGS, sregs), "KVM_SET_SREGS")
                        regs = new("struct kvm_regs *")
                        regs.rip, regs.rflags, regs.rsp = layout.CODE_GPA, 2, layout.STACK_TOP
                        check(io(vfd, abi.KVM_SET_REGS, regs), "KVM_SET_REGS")
                    kickable.page = page
                elif op == "ioev":
                    if n:           # the descriptor limit, asked as the C helper asks it
                        getrlimit(RLIMIT_NOFILE)
                    for _ in range(n):
                        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                        addr = bell_lo + layout.DOORBELL_STRIDE * len(bells)
                        arg = new("struct kvm_ioeventfd *", (0, addr, ioev_len, efd, 0))
                        t = mono()
                        r = io(vm, KVM_IOEVENTFD, arg)
                        samples.append(mono() - t)
                        bells.append((efd, addr))
                        check(r, "KVM_IOEVENTFD")
                    if n:
                        params()
                elif op == "eexist":
                    efd, addr = bells[0]
                    arg = new("struct kvm_ioeventfd *", (0, addr, ioev_len, efd, 0))
                    if n:
                        k = n * -(-batch_min // n)
                        t = mono()
                        for _ in range(k):
                            io(vm, KVM_IOEVENTFD, arg)
                        batch = (mono() - t, k)
                        for _ in range(n):
                            t = mono()
                            r = io(vm, KVM_IOEVENTFD, arg)
                            samples.append(mono() - t)
                        if r != -errno.EEXIST:
                            raise PyvmmError(f"floor: duplicate KVM_IOEVENTFD returned {r}")
                elif op == "deassign":
                    for _ in range(n):
                        efd, addr = bells.pop()
                        arg = new("struct kvm_ioeventfd *",
                                  (0, addr, ioev_len, efd, abi.KVM_IOEVENTFD_FLAG_DEASSIGN))
                        t = mono()
                        r = io(vm, KVM_IOEVENTFD, arg)
                        samples.append(mono() - t)
                        check(r, "KVM_IOEVENTFD deassign")
                        try:
                            res["doorbells_completed"] += os.eventfd_read(efd)
                        except BlockingIOError:
                            pass
                        os.close(efd)
                    params()
                elif op == "memslot":
                    for _ in range(n):
                        arg = new("struct kvm_userspace_memory_region *",
                                  (1 + nbar, 0, layout.BAR_GPA + layout.BAR_SIZE * nbar,
                                   layout.BAR_SIZE, bar + layout.BAR_SIZE * nbar))
                        t = mono()
                        r = io(vm, KVM_SET_USER_MEMORY_REGION, arg)
                        samples.append(mono() - t)
                        check(r, "KVM_SET_USER_MEMORY_REGION")
                        nbar += 1
                elif op == "run":
                    target = _TARGETS[step.target]
                    kickable.tid = threading.get_ident()
                    while True:
                        r = iv(vcpu, KVM_RUN, 0)
                        if r < 0:
                            if r == -errno.EINTR:
                                page[1] = 0
                                if time.monotonic() >= deadline:
                                    raise PyvmmError(f"floor: guest did not reach "
                                                     f"{step.target} within {timeout:g} s")
                                continue
                            check(r, "KVM_RUN")
                        nexits += 1
                        reason, out, size, port, count, off = _EXIT(page, 8)
                        if reason == KVM_EXIT_IO:
                            nio += 1
                            if not out:
                                page[off:off + size * count] = b"\xff" * (size * count)
                            elif port == marker_port:
                                m = page[off][0]
                                events.append([m, mono() - t0])
                                if m == rung:
                                    res["doorbells_expected"] = len(bells)
                                elif m == abort:
                                    raise PyvmmError("floor: guest aborted")
                                if target and m == target:
                                    end_marker = m
                                    break
                            elif port == data_port and size == 4:
                                res["bar_value"] = int.from_bytes(page[off:off + 4], "little")
                        elif reason == KVM_EXIT_HLT:
                            res["halted"] = True
                            break
                        elif reason == KVM_EXIT_MMIO:
                            addr, _, _, is_write = _MMIO(page, 32)
                            if is_write and bell_lo <= addr < bell_hi:
                                res["doorbell_mmio_exits"] += 1
                            else:
                                res["other_mmio_exits"] += 1
                        else:
                            raise PyvmmError(f"floor: unexpected exit reason {reason}")
                c1, w1 = cpu(), mono()
                ph = {"op": op, "count": n, "target": _TARGETS.get(step.target, 0)
                      if op == "run" else 0, "end_marker": end_marker, "wall_ns": w1 - w0,
                      "cpu_ns": c1 - c0, "samples": samples}
                if batch:
                    ph["batch_ns"], ph["batch_ops"] = batch
                phases.append(ph)
                res["boot_wall_ns"] += w1 - w0
                res["boot_cpu_ns"] += c1 - c0
        except PyvmmError as e:             # the boot failed: reported, not raised
            error = e
            res["failed_step"] = i
        finally:
            if kick is not None:
                kick.cancel()
            w0, c0 = mono(), cpu()
            for efd, _ in bells:
                try:
                    res["doorbells_completed"] += os.eventfd_read(efd)
                except BlockingIOError:
                    pass
                os.close(efd)
            for fd, run in vcpus:
                if run >= 0:
                    abi.munmap(run, run_size)
                os.close(fd)
            if vm != -1:
                os.close(vm)
            if ram != -1:
                abi.munmap(ram, layout.RAM_SIZE)
            if bar != -1:
                abi.munmap(bar, layout.BAR_SIZE * _BAR_SLOTS)
            c1, w1 = cpu(), mono()
            phases.append({"op": "teardown", "count": 1, "target": 0, "end_marker": 0,
                           "wall_ns": w1 - w0, "cpu_ns": c1 - c0, "samples": []})
            res["exits"], res["io_exits"] = nexits, nio
            res["cpu_end"] = abi.getcpu()
        if error is not None:
            res["error"] = str(error)
            return res
        res["ok"] = True
        return res

    return boot
