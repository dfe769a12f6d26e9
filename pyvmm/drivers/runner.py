"""Run a boot recipe with the Python VMM (Kvm/Vm/Vcpu), timing each phase.

Produces the same result dict as the C helper (pyvmm.drivers.native), so `pyvmm boot`,
`pyvmm bench --python-vs-c` and the reports treat both alike. Failures are raised as
PyvmmError subclasses after everything is torn down.
"""

from __future__ import annotations

import errno
import operator
import os
import resource
import struct
import time

from ..vmm import guests, layout
from ..vmm import abi
from ..errors import GuestTimeout, PyvmmError, UnexpectedExit
from ..vmm.exits import (FailEntry, Hlt, InternalError, Interrupted, Io, MemoryFault, Mmio, Shutdown, describe)
from ..vmm.kvm import shared as shared_kvm
from ..vmm.memory import GuestMemory
from ..vmm.kicker import install_kick_handler, kick_after
from ..vmm.x86 import long_mode_tables
from ..vmm.vm import check_nofile
from ..recipe import Recipe, native_module

MARKER_TARGETS = {"probe": layout.MARK_PROBE, "rung": layout.MARK_RUNG, "halt": 0}
_MARKER_PORT, _SERIAL_PORT, _DATA_PORT = layout.MARKER_PORT, layout.SERIAL_PORT, \
    layout.DATA_PORT
_RUNG, _ABORT = layout.MARK_RUNG, layout.MARK_ABORT
_from_bytes = int.from_bytes
MAX_BAR_SLOTS = 16

_NO_BELLS = struct.pack("<QQ", layout.PARAM_MAGIC, 0)
_pack = struct.pack
_addr_of = operator.attrgetter("addr")
_BAR_BYTES = layout.BAR_PATTERN.to_bytes(4, "little")
_RLIMIT_NOFILE = resource.RLIMIT_NOFILE
_getrlimit = resource.getrlimit

_mono = time.monotonic_ns
_cpu = time.thread_time_ns


class PyBoot:
    """One boot of `recipe` on the Python VMM."""

    def __init__(self, recipe: Recipe, guest: str = "doorbell", ioev_len: int = 4,
                 timeout: float | None = 10.0, pin_cpu: int | None = None,
                 kvm_path: str = "/dev/kvm", stats: bool = False,
                 memory: str = "anon"):
        if memory not in ("anon", "gmem"):
            raise PyvmmError(f"unknown memory kind '{memory}': use anon or gmem")
        self.memory = memory
        self.recipe = recipe
        self.guest = guests.info(guest)
        self.image = guests.load(guest)
        self.long_mode = self.guest.mode == "long"
        self.tables = long_mode_tables() if self.long_mode else b""
        self.batch_min = native_module().lib.BB_BATCH_MIN     # eexist: ops per batch
        if len(self.image) > layout.RAM_SIZE - layout.CODE_GPA - 0x10000:
            raise PyvmmError(f"guest image of {len(self.image)} bytes does not fit in RAM")
        self.ioev_len = ioev_len
        self.timeout = timeout
        self.pin_cpu = pin_cpu
        self.kvm_path = kvm_path
        self.stats = stats      # snapshot KVM binary stats of the VM and vCPU 0
        self._stats = {}        # "vm"/"vcpu0" -> (StatsReader, values before)
        self.kvm = None
        self.vm = None
        self.bells = []         # assigned Ioeventfd objects, in registration order
        self.next_bell = 0
        self.bar_mem = None
        self.ram_mem = None
        self.nbar = 0
        self.serial = bytearray()
        self.res: dict = {}
        self._t0 = 0

    # --- steps -------------------------------------------------------------------------
    def _vm(self, step, samples):
        # The system fd is the process's (kvm.shared, taken before the timed phases): a
        # VMM opens /dev/kvm once, not per VM.
        self.vm = self.kvm.create_vm()

    def _mem(self, step, samples):
        ram = self._gmem_ram() if self.memory == "gmem" else \
            self.vm.add_memory(0, layout.RAM_SIZE)
        mem = self.ram_mem = ram.memory          # RAM at GPA 0: offsets are GPAs
        mem.write(layout.CODE_GPA, self.image)
        if self.long_mode:
            mem.write(layout.GDT_GPA, self.tables)
        self._write_params()
        bar = self.bar_mem = GuestMemory(layout.BAR_SIZE * MAX_BAR_SLOTS)
        self.vm.memories.append(bar)
        bar.write(0, _BAR_BYTES)

    def _gmem_ram(self):
        """RAM from a guest_memfd created mmap-able and shared, bound with
        KVM_SET_USER_MEMORY_REGION2 and KVM_MEM_GUEST_MEMFD."""
        vm = self.vm
        want = abi.GUEST_MEMFD_FLAG_MMAP | abi.GUEST_MEMFD_FLAG_INIT_SHARED
        have = vm.check_extension(abi.KVM_CAP_GUEST_MEMFD_FLAGS)
        if have & want != want:
            raise PyvmmError(f"--memory gmem needs guest_memfd flags mmap and init-shared "
                             f"(KVM_CAP_GUEST_MEMFD_FLAGS reports {have:#x})")
        gmem = vm.create_guest_memfd(layout.RAM_SIZE, want)
        mem = GuestMemory(layout.RAM_SIZE, fd=gmem.fd)
        vm.memories.append(mem)
        return vm.add_memory(0, layout.RAM_SIZE, memory=mem, guest_memfd=gmem)

    def _write_params(self):
        bells = self.bells
        blob = _pack(f"<QQ{len(bells)}Q", layout.PARAM_MAGIC, len(bells),
                     *map(_addr_of, bells)) if bells else _NO_BELLS
        self.ram_mem.write(layout.PARAM_GPA, blob)

    def _ioev(self, step, samples):
        n = step.count
        if not n:
            return          # the parameter block already lists every doorbell
        # One getrlimit, as the C helper does; the full count of open fds only when that
        # says the limit is close.
        soft = _getrlimit(_RLIMIT_NOFILE)[0]
        if soft != resource.RLIM_INFINITY and len(self.bells) + n + 64 > soft:
            check_nofile(n + 16, f"ioev:{n}")
        first, stride = layout.DOORBELL_BASE + layout.DOORBELL_STRIDE * self.next_bell, \
            layout.DOORBELL_STRIDE
        self.bells += self.vm.assign_ioeventfds(
            range(first, first + stride * n, stride), self.ioev_len, samples=samples)
        self.next_bell += n
        self._write_params()

    def _eexist(self, step, samples):
        """As the C helper: a batch of at least BB_BATCH_MIN duplicates between two clock
        reads, then one clock read around each of `count` more (the distribution)."""
        first = self.bells[0]
        try_ = self.vm.try_ioeventfd
        efd, addr, length = first.efd, first.addr, first.length
        n = step.count
        if not n:
            return
        k = n * -(-self.batch_min // n)
        t = _mono()
        for _ in range(k):
            _expect_eexist(try_(efd, addr, length))
        self._batch = (_mono() - t, k)
        for _ in range(n):
            t = _mono()
            err = try_(efd, addr, length)
            samples.append(_mono() - t)
            _expect_eexist(err)

    def _deassign(self, step, samples):
        for _ in range(step.count):
            io = self.bells.pop()
            io.deassign()
            samples.append(self.vm.last_ioeventfd_ns)
            self.res["doorbells_completed"] += io.count()
            io.close()
        self._write_params()

    def _gic(self, step, samples):
        raise PyvmmError("'gic' is an arm64 step (a GICv3): the Python VMM runs x86 guests; "
                         "arm64 recipes run in the lab (pyvmm lab kernel --arch arm64)")

    def _vcpu(self, step, samples):
        for _ in range(step.count):
            v = self.vm.create_vcpu()
            if self.long_mode:
                v.setup_long_mode(write_tables=False)
            else:
                v.setup_real_mode()
            if self._vcpu0 is None:         # the vCPU the run steps run and time out
                self._vcpu0 = v
                if self._kicker is not None:
                    self._kicker.vcpu = v

    def _memslot(self, step, samples):
        for _ in range(step.count):
            if self.nbar >= MAX_BAR_SLOTS:
                raise PyvmmError(f"more than {MAX_BAR_SLOTS} BAR slots in one boot")
            off = layout.BAR_SIZE * self.nbar
            self.vm.add_memory(layout.BAR_GPA + off, layout.BAR_SIZE, slot=1 + self.nbar,
                               memory=self.bar_mem, offset=off)
            samples.append(self.vm.last_memslot_ns)     # the ioctl alone, as the C helper
            self.nbar += 1

    def _run(self, step, samples):
        res = self.res
        if res["halted"]:
            raise PyvmmError("run: the guest has already halted")
        vcpu = self._vcpu0
        target = MARKER_TARGETS[step.target]
        run = vcpu.run
        events, t0 = res["events"], self._t0
        exits = io_exits = 0
        try:
            while True:
                ex = run()
                exits += 1
                kind = ex.__class__
                if kind is Io:
                    io_exits += 1
                    if not ex.is_write:
                        vcpu.set_io_in_data(ex, 0xFFFFFFFF)
                    elif ex.port == _MARKER_PORT:
                        m = ex.data[0]
                        events.append([m, _mono() - t0])
                        if m == _RUNG:
                            res["doorbells_expected"] = len(self.bells)
                        elif m == _ABORT:
                            raise UnexpectedExit("guest aborted: bad parameter block", ex)
                        if target and m == target:
                            return m
                    elif ex.port == _SERIAL_PORT:
                        self.serial += ex.data
                    elif ex.port == _DATA_PORT and ex.size == 4:
                        res["bar_value"] = _from_bytes(ex.data, "little")
                elif kind is Hlt:
                    res["halted"] = True
                    if target:
                        raise UnexpectedExit(f"guest halted before reaching marker {target}",
                                             ex, vcpu.regs_dict())
                    return 0
                else:
                    self._rare_exit(ex, vcpu, step)
        finally:
            res["exits"] += exits
            res["io_exits"] += io_exits

    def _rare_exit(self, ex, vcpu, step):
        """Every exit but port I/O and HLT: MMIO is answered, a timeout kick is checked
        against the deadline, the rest end the boot with the vCPU's registers."""
        res = self.res
        if isinstance(ex, Mmio):
            lo = layout.DOORBELL_BASE
            hi = lo + layout.DOORBELL_STRIDE * layout.PARAM_MAX_DOORBELLS
            if ex.is_write and lo <= ex.addr < hi:
                res["doorbell_mmio_exits"] += 1
            else:
                res["other_mmio_exits"] += 1
            if not ex.is_write:
                vcpu.set_mmio_read_data(layout.UNMAPPED_READ, ex.length)
        elif isinstance(ex, Interrupted):
            if self._deadline is not None and time.monotonic() >= self._deadline:
                regs = vcpu.regs_dict()
                raise GuestTimeout(
                    f"guest did not reach {step.target} within {self.timeout:g} s; "
                    f"stopped at rip {regs['rip']:#x} (last marker "
                    f"{_last_marker(res)})", regs)
        elif isinstance(ex, Shutdown):
            regs = vcpu.regs_dict()
            raise UnexpectedExit(
                f"guest shut down (KVM_EXIT_SHUTDOWN, triple fault) at rip "
                f"{regs['rip']:#x} rsp {regs['rsp']:#x}: {_fmt_regs(regs)}", ex, regs)
        elif isinstance(ex, InternalError):
            regs = vcpu.regs_dict()
            raise UnexpectedExit(
                f"KVM_EXIT_INTERNAL_ERROR suberror {ex.suberror} ({ex.suberror_name}) "
                f"at rip {regs['rip']:#x}; data {[hex(d) for d in ex.data]}", ex, regs)
        elif isinstance(ex, (FailEntry, MemoryFault)):
            raise UnexpectedExit(f"guest stopped: {describe(ex)}", ex)
        else:
            raise UnexpectedExit(f"unexpected exit: {describe(ex)}", ex)

    # --- driver ------------------------------------------------------------------------
    def _snapshot_stats(self, step):
        """After a step, outside its timing: open the VM's and vCPU 0's stats fds and
        take the 'before' values."""
        from ..vmm.kvmstats import StatsReader
        owners = {"vm": self.vm if step.op == "vm" else None,
                  "vcpu0": self.vm.vcpus[0] if step.op == "vcpu" else None}
        for key, owner in owners.items():
            if owner is not None and key not in self._stats:
                reader = StatsReader.open(owner)
                self._stats[key] = (reader, reader.read())

    def _collect_stats(self):
        if not self._stats:
            return
        from ..vmm.kvmstats import diff
        out = {}
        for key, (reader, before) in self._stats.items():
            out[key] = diff(before, reader.read(), reader.layout)
            reader.close()
        self._stats = {}
        if out:
            self.res["stats"] = out

    def _teardown(self):
        for io in self.bells:
            self.res["doorbells_completed"] += io.count()
        self.bells = []
        if self.vm is not None:
            self.vm.close()
        self.vm = self.kvm = None          # the shared system fd stays open

    def run(self) -> dict:
        res = self.res = {
            "ok": False, "error": "", "errno": 0, "failed_step": -1, "boot_wall_ns": 0,
            "boot_cpu_ns": 0, "phases": [], "events": [], "doorbells_expected": 0,
            "doorbells_completed": 0, "doorbell_mmio_exits": 0, "other_mmio_exits": 0,
            "io_exits": 0, "exits": 0, "bar_value": 0, "halted": False, "cpu_start": -1,
            "cpu_end": -1, "pinned_cpu": -1, "samples_dropped": 0,
        }
        handlers = {"vm": self._vm, "mem": self._mem, "ioev": self._ioev,
                    "eexist": self._eexist, "deassign": self._deassign, "vcpu": self._vcpu,
                    "run": self._run, "memslot": self._memslot, "gic": self._gic}
        old_aff = None
        if self.pin_cpu is not None:
            old_aff = os.sched_getaffinity(0)
            try:
                os.sched_setaffinity(0, {self.pin_cpu})
            except OSError as e:
                raise PyvmmError(f"cannot pin to CPU {self.pin_cpu}: {e.strerror}") from None
            res["pinned_cpu"] = self.pin_cpu
        res["cpu_start"] = abi.getcpu()
        error = None
        self._kicker = None
        self._batch = None
        self._vcpu0 = None
        self._deadline = None
        if self.timeout:
            # One watchdog thread per process, armed outside the timed phases.
            install_kick_handler()
            self._deadline = time.monotonic() + self.timeout
            self._kicker = kick_after(self.timeout)
        self.kvm = shared_kvm(self.kvm_path)
        self._t0 = _mono()
        try:
            for i, step in enumerate(self.recipe.steps):
                samples: list[int] = []
                w0, c0 = _mono(), _cpu()
                end_marker = 0
                try:
                    out = handlers[step.op](step, samples)
                    if step.op == "run":
                        end_marker = out
                except Exception as e:  # recorded, then re-raised after teardown
                    error = e
                    res["failed_step"] = i
                c1, w1 = _cpu(), _mono()
                ph = {"op": step.op, "count": step.count,
                      "target": MARKER_TARGETS.get(step.target, 0) if step.op == "run" else 0,
                      "end_marker": end_marker, "wall_ns": w1 - w0, "cpu_ns": c1 - c0,
                      "samples": samples}
                if self._batch is not None:
                    ph["batch_ns"], ph["batch_ops"] = self._batch
                    self._batch = None
                res["phases"].append(ph)
                res["boot_wall_ns"] += w1 - w0
                res["boot_cpu_ns"] += c1 - c0
                if error is not None:
                    break
                if self.stats:
                    self._snapshot_stats(step)
        finally:
            if self._kicker is not None:
                self._kicker.cancel()
            self._collect_stats()
            w0, c0 = _mono(), _cpu()
            self._teardown()
            c1, w1 = _cpu(), _mono()
            res["phases"].append({"op": "teardown", "count": 1, "target": 0, "end_marker": 0,
                                  "wall_ns": w1 - w0, "cpu_ns": c1 - c0, "samples": []})
            res["cpu_end"] = abi.getcpu()
            if old_aff is not None:
                os.sched_setaffinity(0, old_aff)
        res["serial"] = self.serial.decode(errors="replace")
        if error is not None:
            res["error"] = str(error)
            res["errno"] = getattr(error, "errno", 0) or 0
            raise error
        res["ok"] = True
        return res


def _expect_eexist(err: int) -> None:
    if err != errno.EEXIST:
        raise PyvmmError(f"duplicate KVM_IOEVENTFD returned errno {err}, expected EEXIST")


def _last_marker(res) -> str:
    if not res["events"]:
        return "none"
    m = res["events"][-1][0]
    return f"{layout.MARKER_NAMES.get(m, hex(m))}"


def _fmt_regs(regs: dict) -> str:
    return " ".join(f"{k}={v:#x}" for k, v in regs.items())


def boot(recipe: Recipe, **kw) -> dict:
    return PyBoot(recipe, **kw).run()
