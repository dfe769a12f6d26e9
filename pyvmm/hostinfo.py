"""Facts about the host that change what KVM measurements mean."""

from __future__ import annotations

import gzip
import os
import platform
import re
import resource
import socket

from .errors import PyvmmError


def kernel_config() -> tuple[dict[str, str], str]:
    """The running kernel's config as {CONFIG_X: value} and where it came from."""
    sources = ["/proc/config.gz", f"/boot/config-{platform.release()}"]
    for path in sources:
        try:
            if path.endswith(".gz"):
                with gzip.open(path, "rt") as f:
                    text = f.read()
            else:
                with open(path) as f:
                    text = f.read()
        except OSError:
            continue
        cfg = {}
        for line in text.splitlines():
            m = re.match(r"(CONFIG_\w+)=(.*)", line)
            if m:
                cfg[m.group(1)] = m.group(2).strip('"')
        return cfg, path
    return {}, "none"


def config_hz(cfg: dict[str, str]) -> int | None:
    v = cfg.get("CONFIG_HZ")
    return int(v) if v and v.isdigit() else None


def preemption_model(cfg: dict[str, str]) -> str:
    """The active preemption model: from debugfs when readable, else from the config
    (with PREEMPT_DYNAMIC the boot default), and any preempt= on the command line."""
    try:
        with open("/sys/kernel/debug/sched/preempt") as f:
            m = re.search(r"\((\w+)\)", f.read())
            if m:
                return m.group(1) + " (debugfs)"
    except OSError:
        pass
    try:
        with open("/proc/cmdline") as f:
            m = re.search(r"\bpreempt=(\w+)", f.read())
            if m:
                return m.group(1) + " (cmdline)"
    except OSError:
        pass
    return preemption_from_config(cfg)


def preemption_from_config(cfg: dict[str, str]) -> str:
    """The preemption model a kernel config selects (the boot default with PREEMPT_DYNAMIC)."""
    for key, name in [("CONFIG_PREEMPT_RT", "rt"), ("CONFIG_PREEMPT_LAZY", "lazy"),
                      ("CONFIG_PREEMPT", "full"), ("CONFIG_PREEMPT_VOLUNTARY", "voluntary"),
                      ("CONFIG_PREEMPT_NONE", "none")]:
        if cfg.get(key) == "y":
            dyn = " (dynamic; config default)" if cfg.get("CONFIG_PREEMPT_DYNAMIC") == "y" else ""
            return name + dyn
    return "unknown"


def cpu_model() -> tuple[str, set[str]]:
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, flags


def kvm_backend(flags: set[str]) -> str:
    """Which KVM backend is loaded: vmx, svm or other (named), from /sys/module and flags."""
    mods = set(os.listdir("/sys/module")) if os.path.isdir("/sys/module") else set()
    if "kvm_intel" in mods:
        return "vmx (kvm_intel)"
    if "kvm_amd" in mods:
        return "svm (kvm_amd)"
    others = sorted(m for m in mods if m.startswith("kvm_"))
    if others:
        return f"other ({', '.join(others)}; cpu flags: " \
               f"{'vmx' if 'vmx' in flags else 'svm' if 'svm' in flags else 'no vmx/svm'})"
    if "vmx" in flags:
        return "vmx (cpu flag; module not seen)"
    if "svm" in flags:
        return "svm (cpu flag; module not seen)"
    return "unknown"


def collect(kvm_path: str = "/dev/kvm", with_kvm: bool = True) -> dict:
    """Everything `pyvmm info` reports, as a JSON-able dict. KVM parts are None when
    /dev/kvm cannot be opened (the reason goes in kvm_error)."""
    cfg, cfg_src = kernel_config()
    model, flags = cpu_model()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    info = {
        "hostname": socket.gethostname(),
        "kernel": platform.release(),
        "kernel_version": platform.version(),
        "machine": platform.machine(),
        "config_source": cfg_src,
        "config_hz": config_hz(cfg),
        "preemption": preemption_model(cfg),
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "backend": kvm_backend(flags),
        "rlimit_nofile": {"soft": soft, "hard": hard},
        "python": platform.python_version(),
        "kvm_api_version": None,
        "caps": None,
        "kvm_error": None,
    }
    if with_kvm:
        from .vmm.kvm import Kvm
        try:
            with Kvm(kvm_path) as kvm:
                info["kvm_api_version"] = kvm.api_version
                with kvm.create_vm() as vm:
                    info["caps"] = kvm.caps_summary(vm)
        except PyvmmError as e:
            info["kvm_error"] = str(e)
    return info


def guest_memfd_flags_text(value: int) -> str:
    names = [n for bit, n in [(1, "mmap"), (2, "init-shared")] if value & bit]
    rest = value & ~3
    if rest:
        names.append(f"{rest:#x}")
    return f"{value:#x} ({', '.join(names)})" if names else "0"


def process_facts() -> dict:
    """This process's open file descriptors, resident memory (current and peak, KiB) and
    threads, from /proc/self: what a soak run compares at its start and end."""
    out = {"open_fds": len(os.listdir("/proc/self/fd")), "rss_kib": None, "rss_peak_kib": None,
           "threads": None}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key == "VmRSS":
                out["rss_kib"] = int(val.split()[0])
            elif key == "VmHWM":
                out["rss_peak_kib"] = int(val.split()[0])
            elif key == "Threads":
                out["threads"] = int(val.split()[0])
    return out
