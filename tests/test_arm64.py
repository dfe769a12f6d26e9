"""The arm64 lab: its pure parts (architecture names and variants, the gic step of the
recipe language, the /init of a virtio-console data port, QEMU's command line,
kernel-check of an Image with the lab kernel's own symbols, the vcpus table), the x86
helper and Python VMM refusing the arm64 step on a real /dev/kvm, and the lab itself
(PYVMM_LAB=1): Debian's arm64 6.1 and 7.3 under qemu-system-aarch64, each verdict
agreeing with kernel-check, and the vCPU table."""

import json
import os
import shutil
import struct
import subprocess
import sys

import pytest

from pyvmm import recipe
from pyvmm.errors import LabError, RecipeError
from pyvmm.lab.arch import ARM64, X86_64, get_arch
from pyvmm.lab.boot import initramfs, qemu
from pyvmm.lab.builds import crosshelper, kcheck
from pyvmm.lab.builds import variant
from pyvmm.lab.experiments import vcpus


# --- architecture and variants ------------------------------------------------------------

def test_arch_names_and_aliases():
    assert get_arch("arm64") is ARM64 and get_arch("aarch64") is ARM64
    assert get_arch("x86_64") is X86_64 and get_arch("amd64") is X86_64
    with pytest.raises(LabError, match="unknown architecture 'riscv64'"):
        get_arch("riscv64")


def test_variant_prefix_sets_the_architecture():
    v = variant.parse_variant("arm64:6.1")
    assert v.arch is ARM64 and v.kernel == "6.1" and v.label == "arm64:6.1"
    assert variant.parse_variant("7.3", arch=ARM64).label == "arm64:7.3"
    assert variant.parse_variant("6.1").arch is X86_64
    # a kernel spec that is a path keeps its colon-free meaning
    assert variant.split_arch("/tmp/x.deb") == ("/tmp/x.deb", X86_64)


def test_patched_arm64_variants_are_whole_kernel_builds():
    # KVM is built into every arm64 image: a patch means a cross-compiled kernel, at
    # Debian's HZ unless one is asked for
    v = variant.parse_variant("arm64:6.1+defer-free")
    assert (v.patch, v.hz, v.label) == ("defer-free", 250, "arm64:6.1+defer-free@hz250")
    assert variant.parse_variant("arm64:7.3@hz100").label == "arm64:7.3@hz100"
    o = variant.parse_variant("6.1", arch=ARM64, patch="defer-free")     # lab kernel's options
    assert o.hz == 250
    assert variant.parse_variant("6.1", patch="defer-free").hz is None   # x86


def test_arm64_kernel_build_config_and_make_arguments():
    from pyvmm.lab.builds import kernel as kbuild
    frag = kbuild.fragment("CONFIG_PREEMPT_VOLUNTARY=y\nCONFIG_HZ_250=y\n", 100, ARM64,
                           "-pyvmm-hz100")
    for want in ("CONFIG_KVM=y", "CONFIG_VIRTIO_CONSOLE=y", "CONFIG_SERIAL_AMBA_PL011=y",
                 "CONFIG_HZ=100", "CONFIG_HZ_100=y", "CONFIG_PREEMPT_VOLUNTARY=y"):
        assert want in frag.splitlines()
    assert "CONFIG_KVM_AMD=y" not in frag
    assert ARM64.make_args == ("ARCH=arm64", "CROSS_COMPILE=aarch64-linux-gnu-")
    assert X86_64.make_args == ()


def test_function_calls_reads_arm64_branches_to_symbols():
    listing = """
ffff800008123400 <kvm_io_bus_register_dev>:
ffff800008123400:	paciasp
ffff800008123404:	bl	ffff800008200000 <kmalloc_trace>
ffff800008123408:	b.ne	ffff800008123420 <kvm_io_bus_register_dev+0x20>
ffff80000812340c:	bl	ffff800008300000 <call_srcu>
ffff800008123410:	b	ffff800008123400 <kvm_io_bus_register_dev>
ffff800008123414:	b	ffff800008400000 <synchronize_srcu_expedited>

ffff800008123500 <next_fn>:
ffff800008123500:	bl	ffff800008500000 <synchronize_rcu>
"""
    assert kcheck.function_calls(listing) == ["kmalloc_trace", "call_srcu",
                                             "synchronize_srcu_expedited"]


def test_lab_run_refuses_arm64_in_one_line():
    r = subprocess.run([sys.executable, "-m", "pyvmm", "lab", "run", "stress:1",
                        "--kernel", "arm64:6.1"], capture_output=True, text=True)
    assert r.returncode != 0
    assert "Python runtime of the lab's architecture" in r.stderr
    assert "Traceback" not in r.stderr


# --- the gic step --------------------------------------------------------------------------

def test_gic_step_parses_after_vcpu_and_before_run():
    r = recipe.parse("vm,mem,ioev:3,vcpu:4,gic,run:rung,memslot,run")
    assert r.text == "vm,mem,ioev:3,vcpu:4,gic,run:rung,memslot:1,run:halt"
    assert [s.op for s in r.steps][3:5] == ["vcpu", "gic"]
    assert r.registrations == 3


@pytest.mark.parametrize("text,why", [
    ("vm,mem,gic,vcpu:1", "'gic' needs 'vcpu:K' before it"),
    ("vm,mem,vcpu:1,run,gic", "'gic' must come before the first 'run'"),
    ("vm,mem,vcpu:1,gic,gic", "'gic' appears twice"),
    ("vm,mem,vcpu:1,gic:2", "'gic' takes no argument"),
])
def test_gic_step_order_is_checked(text, why):
    with pytest.raises(RecipeError, match=why):
        recipe.parse(text)


@pytest.mark.kvm
def test_x86_helper_refuses_the_gic_step_on_real_kvm():
    from pyvmm.vmm import guests
    r = subprocess.run([guests.helper_path(), "--recipe", "vm,mem,vcpu:1,gic,run"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    boot = json.loads(r.stdout.splitlines()[-1])
    assert not boot["ok"] and boot["failed_step"] == 3
    assert "'gic' is an arm64 step" in boot["error"]
    # the steps before it ran on /dev/kvm, and the failed step is timed like the others
    assert [p["op"] for p in boot["phases"]] == ["vm", "mem", "vcpu", "gic", "teardown"]


@pytest.mark.kvm
def test_python_vmm_refuses_the_gic_step_on_real_kvm():
    r = subprocess.run([sys.executable, "-m", "pyvmm", "boot", "--recipe",
                        "vm,mem,vcpu:1,gic,run"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "'gic' is an arm64 step" in r.stderr and "Traceback" not in r.stderr


# --- /init and QEMU ------------------------------------------------------------------------

def test_init_loads_the_data_port_modules_before_opening_hvc0():
    init = initramfs.init_script(["00-virtio_mmio.ko", "01-virtio_console.ko"], 1000, 4,
                                 data_tty="/dev/hvc0")
    lines = init.splitlines()
    first_insmod = next(i for i, l in enumerate(lines) if l.startswith("insmod"))
    opened = lines.index("exec 3>/dev/hvc0")
    assert first_insmod < opened
    assert "while [ ! -c /dev/hvc0 ]" in init
    assert "/dev/ttyS1" not in init
    # x86 is unchanged: the data port is opened first, and modules are reported on it
    x86 = initramfs.init_script(["01-kvm.ko"], 1000, 4).splitlines()
    assert x86.index("exec 3>/dev/ttyS1") < next(i for i, l in enumerate(x86)
                                                 if l.startswith("insmod"))


def test_qemu_command_per_architecture():
    arm = qemu.command(qemu.QemuConfig("Image", "initrd", arch=ARM64), "c.log", "d.log")
    assert arm[0] == "qemu-system-aarch64"
    assert "virt,virtualization=on,gic-version=3" in arm
    assert "file,id=data,path=d.log" in arm and "virtconsole,chardev=data" in arm
    assert arm.count("-serial") == 1
    append = arm[arm.index("-append") + 1]
    assert "console=ttyAMA0" in append and "tsc" not in append
    x86 = qemu.command(qemu.QemuConfig("bzImage", "initrd"), "c.log", "d.log")
    assert x86.count("-serial") == 2 and "tsc=reliable" in x86[x86.index("-append") + 1]


# --- kernel-check of an Image -------------------------------------------------------------

AWK = shutil.which("awk")
OBJDUMP = f"{ARM64.cross_prefix}objdump"


def _kallsyms(base: int) -> str:
    rows = [(0x0, "T", "_stext"), (0x100, "T", "kvm_io_bus_register_dev"),
            (0x140, "t", "after_register"), (0x200, "T", "synchronize_srcu_expedited"),
            (0x240, "T", "call_srcu"), (0x300, "T", "kvm_io_bus_register_dev")]
    text = "".join(f"{base + off:016x} {t} {name}\n" for off, t, name in rows)
    return text + f"{base + 0x400:016x} t some_module_fn\t[kvm_extra]\n"


@pytest.mark.skipif(AWK is None, reason="needs awk (the lab's /init runs busybox awk)")
def test_kallsyms_awk_reports_wanted_symbols_and_function_ends(tmp_path):
    base = 0xffff800008010000
    src = tmp_path / "kallsyms"
    src.write_text(_kallsyms(base))
    out = subprocess.run([AWK, kcheck.kallsyms_awk(), str(src)], capture_output=True,
                         text=True, check=True).stdout
    facts = dict(l[len(initramfs.FACT) + 1:].split(" ", 1) for l in out.splitlines())
    syms, ends = kcheck.ksyms_from_facts(facts)
    assert syms["_stext"] == base
    assert syms["kvm_io_bus_register_dev"] == base + 0x100       # the first of the name
    assert ends["kvm_io_bus_register_dev"] == base + 0x140
    assert syms["synchronize_srcu_expedited"] == base + 0x200 and "call_srcu" in syms
    assert "some_module_fn" not in out
    assert kcheck.FACT_PREFIX == initramfs.FACT


def _image(tmp_path, calls_to: int, pe: bool) -> tuple[str, dict]:
    """A fake arm64 Image: header magic, text at 0x10000 (said by a PE header when `pe`),
    kvm_io_bus_register_dev at +0x100 calling (bl) the symbol at +calls_to."""
    text_off = 0x10000
    img = bytearray(text_off + 0x400)
    img[0x38:0x3c] = b"ARM\x64"
    if pe:
        img[0:2] = b"MZ"
        struct.pack_into("<I", img, 0x3c, 0x40)
        img[0x40:0x44] = b"PE\0\0"
        struct.pack_into("<I", img, 0x40 + 24 + 20, text_off)
    fn = text_off + 0x100
    words = [0xd503233f,                                    # paciasp
             0x94000000 | (((calls_to - 0x100) // 4 - 1) & 0x3ffffff),   # bl (at fn + 4)
             0xd65f03c0]                                    # ret
    for i, w in enumerate(words):
        struct.pack_into("<I", img, fn + 4 * i, w)
    path = tmp_path / "Image"
    path.write_bytes(bytes(img))
    base = 0xffff800008010000
    facts = {"ksym:_stext": f"{base:x}", "ksym:kvm_io_bus_register_dev": f"{base + 0x100:x}",
             "ksym-next:kvm_io_bus_register_dev": f"{base + 0x140:x}",
             "ksym:synchronize_srcu_expedited": f"{base + 0x200:x}",
             "ksym:call_srcu": f"{base + 0x240:x}"}
    return str(path), facts


def test_stext_offset_from_the_efi_header(tmp_path):
    path, _ = _image(tmp_path, 0x200, pe=True)
    assert kcheck.stext_offset(path) == 0x10000
    (tmp_path / "bad").write_bytes(b"\0" * 4096)
    with pytest.raises(LabError, match="not an arm64 Image"):
        kcheck.stext_offset(str(tmp_path / "bad"))


@pytest.mark.skipif(shutil.which(OBJDUMP) is None,
                    reason=f"needs {OBJDUMP} (binutils-aarch64-linux-gnu; the arm64 lab "
                           "installs it)")
@pytest.mark.parametrize("target,behaviour", [(0x200, "sync"), (0x240, "deferred")])
def test_check_image_reads_the_calls_with_the_kernels_addresses(tmp_path, target, behaviour):
    path, facts = _image(tmp_path, target, pe=target == 0x200)
    res = kcheck.check_image(path, facts, OBJDUMP)
    assert res["behaviour"] == behaviour
    assert res["calls"] == ["synchronize_srcu_expedited" if target == 0x200 else "call_srcu"]
    assert res["memslot_calls"] is None          # not reported: nothing predicted from it


@pytest.mark.skipif(shutil.which(OBJDUMP) is None,
                    reason=f"needs {OBJDUMP} (binutils-aarch64-linux-gnu; the arm64 lab "
                           "installs it)")
def test_check_image_without_the_function_is_one_line(tmp_path):
    path, facts = _image(tmp_path, 0x200, pe=False)
    del facts["ksym-next:kvm_io_bus_register_dev"]
    with pytest.raises(LabError, match="did not report kvm_io_bus_register_dev"):
        kcheck.check_image(path, facts, OBJDUMP)


def test_kernel_check_of_an_arm64_image_says_where_symbols_come_from(tmp_path):
    path, _ = _image(tmp_path, 0x200, pe=True)
    with pytest.raises(LabError, match="arm64 Image, which carries no symbols"):
        kcheck.check(path)


# --- the vcpus experiment (pure) ---------------------------------------------------------

def _boot(k: int, gic: bool, n: int, redist: int, memslot: int, boot: int) -> dict:
    phases = [{"op": "vm", "wall_ns": 1000, "samples": []},
              {"op": "ioev", "wall_ns": 100 * n, "samples": [100] * n},
              {"op": "vcpu", "wall_ns": 500 * k, "samples": [500] * k}]
    if gic:
        phases.append({"op": "gic", "wall_ns": redist + 300, "samples": [100, redist, 200]})
    phases += [{"op": "run", "wall_ns": 2000, "samples": []},
               {"op": "memslot", "wall_ns": memslot, "samples": [memslot]}]
    return {"ok": True, "boot_wall_ns": boot, "phases": phases}


def test_vcpus_rows_take_the_redistributors_and_the_stall_against_no_gic():
    ks, ns = (1, 4), (0, 32)
    samples = []
    for k in ks:
        for n in ns:
            for rep in range(3):
                samples.append({"recipe": f"gic-k{k}", "n": n, "result": _boot(
                    k, True, n, redist=1000 * k, memslot=4_000_000 + rep, boot=20_000_000)})
                samples.append({"recipe": f"nogic-k{k}", "n": n, "result": _boot(
                    k, False, n, redist=0, memslot=500_000, boot=10_000_000)})
    rows = vcpus.rows({"samples": samples}, ks, ns)
    assert [(r["k"], r["n"]) for r in rows] == [(1, 0), (1, 32), (4, 0), (4, 32)]
    r = rows[2]
    assert r["redist_ns"] == 4000 and r["redist_per_vcpu_ns"] == 1000
    assert r["memslot_ns"] == 4_000_001 and r["memslot_clean_ns"] == 500_000
    assert r["stall_ns"] == 3_500_001
    assert r["registration_share"] == pytest.approx(4000 / 20_000_000)
    assert r["share_with_stall"] == pytest.approx((4000 + 3_500_001) / 20_000_000)
    assert rows[3]["ioev_ns"] == 3200


def test_vcpus_counts_are_checked():
    with pytest.raises(LabError, match="from 1 to 64"):
        vcpus.check_vcpus((0, 4))
    with pytest.raises(LabError, match="twice"):
        vcpus.check_vcpus((4, 4))
    cfg = vcpus.sweep_config((8, 1), (0,), 2, 0, 1)
    assert cfg.templates["gic-k8"] == "vm,mem,ioev:N,vcpu:8,gic,run:rung,memslot,run"
    assert cfg.recipes[0] == "gic-k1"


# --- the lab itself ----------------------------------------------------------------------

def _arm64_tools_or_skip():
    """Under PYVMM_LAB=1 the lab installs qemu-system-arm and the cross compiler with apt
    (scripts/lab-tools.sh does too); where neither is present nor installable, skip."""
    missing = crosshelper.missing_tools(ARM64)
    if not shutil.which(ARM64.qemu):
        missing.append(ARM64.qemu_package)
    if missing and (os.geteuid() != 0 or not shutil.which("apt-get")):
        pytest.skip(f"the arm64 lab needs {', '.join(missing)} (not installable here)")


def lab_only(what: str):
    def mark(fn):
        fn = pytest.mark.skipif(os.environ.get("PYVMM_LAB") != "1",
                                reason=f"set PYVMM_LAB=1 to {what}")(fn)
        return pytest.mark.lab(fn)
    return mark


@lab_only("boot Debian's arm64 6.1 and 7.3 under qemu-system-aarch64 (downloads ~170 MB, "
          "installs qemu-system-arm and the arm64 cross compiler when missing)")
@pytest.mark.parametrize("kernel,behaviour", [("6.1", "sync"), ("7.3", "deferred")])
def test_arm64_lab_verdict_agrees_with_kernel_check(tmp_path, kernel, behaviour):
    _arm64_tools_or_skip()
    r = subprocess.run([sys.executable, "-m", "pyvmm", "lab", "kernel", "--arch", "arm64",
                        "--kernel", kernel, "--ns", "0,1,10", "--recipes", "during-boot",
                        "--repeats", "4", "--warmup", "1", "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd="/", timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    doc = json.loads((run_dir / "run.json").read_text())
    assert doc["status"] == "complete" and not doc["failures"]
    assert doc["host"]["machine"] == "aarch64" and doc["host"]["kernel"].startswith(kernel)
    assert doc["lab"]["variant"] == f"arm64:{kernel}"
    kc = doc["kernel_check"]
    assert kc["behaviour"] == behaviour and kc["agrees"], kc
    assert "symbols from the lab kernel" in kc["path"]
    # every boot ran the arm64 guest to its end: doorbells rung, BAR read, powered off
    sweep = [s for s in doc["samples"] if s["recipe"] != "control"]
    assert sweep
    for s in sweep:
        res = s["result"]
        assert res["halted"] and res["bar_value"] == 0xBA5EBA11
        assert res["doorbells_completed"] == res["doorbells_expected"]
    assert "kernel-check and measured verdict: agree" in r.stdout


@lab_only("cross-compile Debian's 6.1 for arm64 with the defer-free patch (about 2 minutes "
          "cold on two cores) and boot it under qemu-system-aarch64")
def test_arm64_whole_kernel_build_with_a_patch(tmp_path):
    _arm64_tools_or_skip()
    r = subprocess.run([sys.executable, "-m", "pyvmm", "lab", "kernel", "--kernel",
                        "arm64:6.1+defer-free", "--ns", "0,1", "--recipes", "during-boot",
                        "--repeats", "4", "--warmup", "1", "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd="/", timeout=2400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    doc = json.loads((run_dir / "run.json").read_text())
    assert doc["lab"]["variant"] == "arm64:6.1+defer-free@hz250"
    build = doc["lab"]["kernel_build"]
    assert build["patch"] == "defer-free" and build["hz"] == 250
    assert doc["host"]["config_hz"] == 250 and doc["host"]["machine"] == "aarch64"
    kc = doc["kernel_check"]
    assert kc["behaviour"] == "deferred" and kc["stall_expected"] and kc["agrees"], kc
    from pyvmm.analysis import findings
    v = findings.analyze(doc)["verdict"]
    assert v.behaviour == "deferred" and v.stall_ns > 1_000_000     # a jiffy is 4 ms


@lab_only("run the arm64 vCPU table on Debian's 6.1 and 7.3 under qemu-system-aarch64")
def test_arm64_vcpus_table(tmp_path):
    _arm64_tools_or_skip()
    r = subprocess.run([sys.executable, "-m", "pyvmm", "lab", "vcpus", "--vcpus", "1,8",
                        "--ns", "0", "--repeats", "5", "--warmup", "1", "--out",
                        str(tmp_path)], capture_output=True, text=True, cwd="/", timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (out,) = [p for p in tmp_path.iterdir() if p.name.startswith("vcpus-")]
    doc = json.loads((out / "vcpus.json").read_text())
    assert doc["status"] == "complete"
    by = {x["variant"]: {(r_["k"], r_["n"]): r_ for r_ in x["rows"]} for x in doc["results"]}
    old, new = by["arm64:6.1"], by["arm64:7.3"]
    # 6.1: each redistributor waits for a grace period, so 8 cost several times 1; 7.3
    # registers them without waiting and pays at the next memslot change instead
    assert old[(8, 0)]["redist_ns"] > 3 * old[(1, 0)]["redist_ns"]
    assert new[(8, 0)]["redist_ns"] < old[(8, 0)]["redist_ns"] / 3
    # 7.3's memslot change after the GIC waits for the grace period the redistributors
    # started when it is still pending; under TCG the run between them sometimes outlasts
    # it (a median of 0.3 to 0.9 ms over 3 boots was seen), so the test asks that some
    # boots wait (the p90 over 5), and that 6.1's never does (its median)
    waited = new[(1, 0)]["memslot_p90_ns"] - new[(1, 0)]["memslot_clean_ns"]
    assert waited > 1_000_000 > abs(old[(1, 0)]["stall_ns"]), (new[(1, 0)], old[(1, 0)])
    assert "share with stall" in r.stdout
