"""The kernel lab: the registration sweep on any Debian kernel (6.1 ... latest), with
its stock KVM modules or with kvm.ko and kvm-amd.ko rebuilt with one of the project's
patches (a *variant*, e.g. 6.1+defer-free).

Steps: check the arguments; make sure QEMU and a static busybox are installed; resolve
and download the kernel's packages; unpack them into a kit (kernel, config, KVM
modules); rebuild the KVM modules with the patch when one is asked for; check
statically how kvm_io_bus_register_dev frees the old bus; build an initramfs with the
static helper and an interleaved plan; boot it under TCG; stream the boots into a
run.json of the same schema as `pyvmm bench` writes (environment 'qemu-tcg', host facts
of the inner kernel).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field

from .. import guests, hostinfo
from ..bench import report
from ..bench.stats import interleaved_order
from ..bench.sweep import SweepConfig, new_doc, new_run_dir, sweep_cells
from ..results import Saver, finishing
from . import initramfs, kcheck, kernels, modbuild, qemu
from .kernels import LabError
from .serial import boot_to_sample, plan_label

ENVIRONMENT = "qemu-tcg"
LAB_REPEATS = 10
LAB_WARMUP = 2
BUSYBOX_PATHS = ("/bin/busybox", "/usr/bin/busybox")
PACKAGES = {"qemu": "qemu-system-x86", "busybox": "busybox-static"}
HELPER_TIMEOUT_MS = 60000


def find_static_busybox() -> str | None:
    for p in BUSYBOX_PATHS + ((shutil.which("busybox") or ""),):
        if p and os.path.isfile(p):
            with open(p, "rb") as f:
                data = f.read()
            try:
                if not kernels.elf_is_dynamic(data):
                    return p
            except LabError:
                continue
    return None


def ensure_tools(log=print, install: bool = True) -> dict[str, str]:
    """QEMU and a static busybox, installed with apt when missing (guarded: nothing is
    reinstalled when both are present)."""
    found = {"qemu": shutil.which(qemu.QEMU), "busybox": find_static_busybox()}
    missing = [PACKAGES[k] for k, v in found.items() if not v]
    if not missing:
        return found
    what = " and ".join(missing)
    if not install:
        raise LabError(f"{what} not installed: apt-get install {' '.join(missing)}")
    if not shutil.which("apt-get"):
        raise LabError(f"{what} missing and not installable here (no apt-get): install QEMU "
                       "(qemu-system-x86_64) and a statically linked busybox by hand")
    if os.geteuid() != 0:
        raise LabError(f"{what} missing; installing needs root: "
                       f"sudo apt-get install -y {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends"] + missing
    log(f"installing {what} with apt-get")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        log("  apt-get install failed; updating the package lists and trying once more")
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, text=True, env=env)
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    found = {"qemu": shutil.which(qemu.QEMU), "busybox": find_static_busybox()}
    if p.returncode != 0 or not all(found.values()):
        tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-5:])
        raise LabError(f"could not install {what}:\n{tail}")
    return found


def make_plan(cfg: SweepConfig) -> list[str]:
    """Plan lines ('LABEL RECIPE'): warm-up boots, then every cell `repeats` times in
    seeded interleaved rounds, exactly as `pyvmm bench` orders them."""
    from .. import recipe as rmod
    lines = []
    warm_recipe = cfg.recipes[0]
    warm_n = cfg.ns[min(1, len(cfg.ns) - 1)]
    warm_text = rmod.parse(cfg.templates[warm_recipe], warm_n).text
    for _ in range(cfg.warmup):
        lines.append(f"{plan_label(None, warm_recipe, warm_n)} {warm_text}")
    order = interleaved_order(sweep_cells(cfg), cfg.repeats, cfg.seed)
    texts = {}
    for seq, (rname, n, _driver) in enumerate(order):
        if (rname, n) not in texts:
            texts[(rname, n)] = rmod.parse(cfg.templates[rname], n).text
        lines.append(f"{plan_label(seq, rname, n)} {texts[(rname, n)]}")
    return lines


def inner_host(kit: kernels.Kit, facts: dict[str, str], smp: int, outer: dict) -> dict:
    """Host facts for the kernel inside QEMU (same keys as hostinfo.collect()); `outer` is
    hostinfo.collect() of the machine running QEMU."""
    meta = kit.meta
    return {
        "hostname": ENVIRONMENT,
        "kernel": facts.get("kernel", meta["kernel_release"]),
        "kernel_version": facts.get("kernel_version", ""),
        "machine": facts.get("machine", "x86_64"),
        "config_source": meta["config_source"],
        "config_hz": meta["config_hz"],
        "preemption": meta["preemption"],
        "cpu_model": facts.get("cpu_model", "QEMU EPYC (TCG)").strip(),
        "cpus": int(facts["cpus"]) if facts.get("cpus", "").isdigit() else smp,
        "backend": "svm (kvm_amd, nested under QEMU TCG)",
        "rlimit_nofile": None, "python": None, "kvm_api_version": None, "caps": None,
        "kvm_error": None,
        "clocksource": facts.get("clocksource"),
        "modules": facts.get("modules", "").split(),
        "package": f"{meta['package']} {meta['version']}",
        "outer_host": {k: outer[k] for k in ("hostname", "kernel", "cpu_model", "cpus",
                                             "backend")},
    }


@dataclass(frozen=True)
class Variant:
    """A kernel spec and an optional KVM patch: '6.1', '6.1+defer-free', 'latest'."""
    kernel: str
    patch: str | None = None

    @property
    def label(self) -> str:
        return self.kernel + (f"+{self.patch}" if self.patch else "")


def parse_variant(text: str, patches: dict | None = None) -> Variant:
    """'KERNEL[+PATCH]', checked without touching the network (a .deb path may itself
    hold '+', so only a known patch name after the last '+' splits it)."""
    text = text.strip()
    if not text:
        raise LabError("empty variant: give KERNEL or KERNEL+PATCH, e.g. 6.1+defer-free")
    patches = modbuild.load_patches() if patches is None else patches
    kernel, patch = text, None
    if "+" in text and not text.endswith(".deb"):
        head, _, tail = text.rpartition("+")
        if tail in patches:
            kernel, patch = head, tail
        elif not (os.sep in text):
            raise LabError(f"unknown KVM patch '{tail}' in variant '{text}': the project has "
                           f"{', '.join(patches) or 'none'} (see pyvmm/lab/patches/INDEX)")
    kernels.check_spec(kernel)
    return Variant(kernel, patch)


@dataclass
class LabOptions:
    kernel: str = "6.1"
    kvm_patch: str | None = None
    # Module parameters, e.g. {"kvm_amd": "npt=0"} (shadow paging in the lab's KVM).
    kvm_args: dict = field(default_factory=dict)
    smp: int = 1
    out: str = "results"
    retries: int = 1
    total_timeout_s: float = 1800.0
    stall_timeout_s: float = 90.0
    boot_timeout_s: float = 120.0
    install: bool = True
    mem_mb: int = 1024


@dataclass
class LabRun:
    doc: dict
    out_dir: str
    timings: dict = field(default_factory=dict)


class Ui:
    """What the lab reports while it works; the CLI renders it with rich."""

    def log(self, msg: str) -> None:
        print(msg)

    def stage(self, name: str, total: int | None = None) -> None:
        pass

    def boot(self, done: int, total: int, label: str) -> None:
        pass


def check_options(opts: LabOptions) -> modbuild.Patch | None:
    """Everything about the arguments that can be checked before any tool is installed
    or anything downloaded; returns the patch asked for."""
    if opts.smp not in (1, 2):
        raise LabError(f"--smp {opts.smp}: the lab runs with 1 or 2 emulated CPUs")
    kernels.check_spec(opts.kernel)
    return modbuild.get_patch(opts.kvm_patch) if opts.kvm_patch else None


@dataclass
class Prepared:
    """A kernel ready to boot: the kit, the modules to load (rebuilt ones swapped in),
    the static check of its kvm.ko, the tools and the stage timings so far."""
    kit: kernels.Kit
    modules: dict
    kernel_check: dict
    built: modbuild.BuiltModules | None
    busybox: bytes
    helper: bytes
    timings: dict


def prepare(opts: LabOptions, ui: Ui) -> Prepared:
    """Tools, kernel packages, kit, rebuilt modules and kernel-check, each cached."""
    patch = check_options(opts)
    timings = {}
    ui.stage("tools")
    ensure_tools(ui.log, opts.install)
    busybox = find_static_busybox()
    helper = guests.helper_path()
    ui.stage("download")
    t = time.monotonic()
    deb = kernels.resolve(opts.kernel, log=ui.log)
    timings["download_s"] = time.monotonic() - t
    ui.stage("unpack")
    t = time.monotonic()
    kit = kernels.build_kit(deb, log=ui.log)
    timings["unpack_s"] = time.monotonic() - t
    built = None
    if patch is not None:
        ui.stage(f"modules ({patch.name})")
        t = time.monotonic()
        builder = modbuild.ModuleBuilder(kit, log=ui.log)
        was_cached = builder.cached(patch) is not None
        built = builder.build(patch)
        timings["modules_s"] = time.monotonic() - t
        timings["modules_cached"] = was_cached
        kc = kcheck.check(built.module("kvm"))
        kc["path"] = f"{kit.meta['package']}: kvm.ko rebuilt with patch {patch.name}"
    else:
        kc = kcheck.check(kit.kvm_ko)
        kc["path"] = f"{kit.meta['package']}: {kit.meta['kvm_module_file'].split('-', 1)[1]}"
    ui.log(f"kernel-check: {kc['summary']}")
    with open(busybox, "rb") as f:
        bb = f.read()
    with open(helper, "rb") as f:
        helper_bin = f.read()
    return Prepared(kit, modbuild.kit_modules(kit, built), kc, built, bb, helper_bin, timings)


def module_args(kit: kernels.Kit, args: dict[str, str]) -> dict[str, str]:
    """{'kvm_amd': 'npt=0'} -> {'03-kvm_amd.ko': 'npt=0'} for the initramfs."""
    names = dict(zip(kit.module_names(), kit.meta["modules"]))
    out = {}
    for mod, params in args.items():
        key = kernels.norm_module(mod)
        if key not in names:
            raise LabError(f"module parameters for {mod}: the lab loads only "
                           f"{', '.join(names)}")
        out[names[key]] = params
    return out


def run_lab(opts: LabOptions, cfg: SweepConfig, ui: Ui | None = None) -> LabRun:
    ui = ui or Ui()
    t_start = time.monotonic()
    prep = prepare(opts, ui)            # checks the options first, before any download
    kit, built, kc, timings = prep.kit, prep.built, prep.kernel_check, prep.timings
    t = time.monotonic()
    plan = make_plan(cfg)
    image = initramfs.build(prep.busybox, prep.helper, prep.modules, "\n".join(plan) + "\n",
                            timeout_ms=HELPER_TIMEOUT_MS, ioev_len=cfg.ioev_len,
                            module_args=module_args(kit, opts.kvm_args))
    timings["build_s"] = time.monotonic() - t

    outer = hostinfo.collect(with_kvm=False)
    host = inner_host(kit, {}, opts.smp, outer)
    out = new_run_dir(opts.out, host)
    work = os.path.join(out, "lab")
    os.makedirs(work)
    initrd = os.path.join(work, "initramfs.cpio.gz")
    with open(initrd, "wb") as f:
        f.write(image)
    with open(os.path.join(work, "plan.txt"), "w") as f:
        f.write("\n".join(plan) + "\n")
    doc = new_doc(cfg, host, ENVIRONMENT, None)
    doc["kernel_check"] = kc
    qcfg = qemu.QemuConfig(kernel=kit.vmlinuz, initrd=initrd, smp=opts.smp, mem_mb=opts.mem_mb,
                           boot_timeout_s=opts.boot_timeout_s,
                           stall_timeout_s=opts.stall_timeout_s,
                           total_timeout_s=opts.total_timeout_s)
    variant = Variant(opts.kernel, opts.kvm_patch)
    doc["lab"] = {"kernel_spec": opts.kernel, "variant": variant.label,
                  "kvm_args": dict(opts.kvm_args),
                  "kvm_patch": None if built is None else dict(built.meta),
                  "package": host["package"], "smp": opts.smp,
                  "qemu": qemu.qemu_version(), "command": qemu.command(qcfg, "console.log",
                                                                      "data.log"),
                  "plan_boots": len(plan), "warmup": cfg.warmup, "attempts": [],
                  "timings": timings}
    path = os.path.join(out, "run.json")
    total = len(plan) - cfg.warmup
    save = Saver(path, doc)

    save(force=True)
    attempt = 0
    with finishing(doc, lambda: save(force=True), timings, t_start):
        while True:
            attempt += 1
            doc["samples"], doc["failures"] = [], []
            done = [0]

            def on_boot(line):
                sample = boot_to_sample(line)
                done[0] += 1
                ui.boot(done[0], len(plan), line["label"])
                if sample is None:
                    return
                doc["samples"].append(sample)
                if not sample["result"]["ok"]:
                    doc["failures"].append({"recipe": sample["recipe"], "n": sample["n"],
                                            "driver": "c", "seq": sample["seq"],
                                            "error": sample["result"]["error"]})
                save()

            def on_stage(name):
                ui.stage("boot kernel" if name == "kernel" else "sweep",
                         len(plan) if name == "sweep" else None)
            t = time.monotonic()
            try:
                stream, qemu_s = qemu.run(qcfg, work, on_boot, on_stage)
            except qemu.LabHang as hang:
                first = str(hang).splitlines()[0]
                doc["lab"]["attempts"].append({"attempt": attempt, "ok": False,
                                               "error": str(hang),
                                               "boots": len(hang.stream.boots),
                                               "wall_s": time.monotonic() - t})
                if attempt <= opts.retries:
                    ui.log(f"[attempt {attempt}] {first}; retrying "
                           f"(attempt {attempt + 1} of {opts.retries + 1})")
                    save(force=True)
                    continue
                raise
            doc["lab"]["attempts"].append({"attempt": attempt, "ok": True,
                                           "boots": len(stream.boots), "wall_s": qemu_s})
            break
        timings["qemu_s"] = qemu_s
        doc["host"] = inner_host(kit, stream.facts, opts.smp, outer)
        doc["clock"] = stream.clock
        doc["lab"]["errors"] = stream.errors
        doc["lab"]["garbage_lines"] = len(stream.garbage)
        got = len(doc["samples"])
        if got != total or stream.rc not in (0, 1):
            doc["status"] = "failed"
            errs = stream.errors[-12:]
            raise LabError(f"the lab recorded {got} of {total} boots (exit status {stream.rc}); "
                           f"logs in {work}; errors:\n  " + ("\n  ".join(errs) or "none"))
        doc["status"] = "complete"
        a = report.analyze(doc)
        kc.update(kcheck.agreement(kc, a["verdict"].behaviour, a["verdict"].stall_ns))
    return LabRun(doc, out, timings)
