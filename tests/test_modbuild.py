"""The lab's KVM module rebuilds: the patches the project ships, and the pure parts of
the builder (index, scope, patch failures, Debian headers metadata, the Kbuild file).
The real build runs in the lab test (PYVMM_LAB=1)."""

import shutil
import subprocess

import pytest

from pyvmm.errors import LabError
from pyvmm.lab.builds import modules as modbuild
from pyvmm.lab.builds import patch as kpatch


def test_the_shipped_patches_are_indexed_described_and_in_scope():
    patches = kpatch.load_patches()
    assert {"rebuild", "defer-free", "defer-free-expedited", "xen", "xen-lock"} <= set(patches)
    assert not patches["rebuild"].has_diff()           # the control changes nothing
    for p in patches.values():
        # every patch names a series it was written for; 6.1 unless the API it uses is
        # newer (srcu_expedite_current: 7.3)
        assert p.series and set(p.series) <= {"6.1", "7.3"} and p.summary
        assert "6.1" in p.series or "not in 6.1" in p.summary
        for s in p.series:
            q = p.for_series(s)
            if not p.whole_kernel():        # the whole-kernel ones are refused there
                kpatch.check_patch_scope(q)
            if q.has_diff():
                # A header that says what the patch does, then the diff.
                head = q.text.split("diff ", 1)[0]
                assert f"pyvmm patch: {p.name}" in head and len(head.splitlines()) > 5
                assert set(q.files()) & {"virt/kvm/kvm_main.c", "arch/x86/kvm/xen.c",
                                         "kernel/rcu/srcutree.c"}
    assert {p.name for p in patches.values() if p.whole_kernel()} == {"srcu-expedited",
                                                                      "srcu-kick"}
    assert patches["defer-free"].digest != patches["defer-free-expedited"].digest
    assert "call_srcu(&kvm->srcu" in patches["defer-free"].text
    assert "srcu_barrier(&kvm->srcu)" in patches["defer-free"].text
    exp = patches["defer-free-expedited"].text
    assert "synchronize_srcu_expedited(&bus->replaced_in->srcu)" in exp
    assert "flush_delayed_work(&kvm_io_bus_free_work)" in exp and "call_srcu(" not in exp


def test_index_and_scope_errors_name_the_problem(tmp_path):
    with pytest.raises(LabError, match="line 2: expected 'name series summary'"):
        kpatch.parse_index("# c\nonly-two 6.1\n")
    assert kpatch.parse_index("a 6.1,6.12 does x y\n") == [("a", ("6.1", "6.12"),
                                                               "does x y")]
    bad = kpatch.Patch("x", ("6.1",), "s", "--- a/mm/slab.c\n+++ b/mm/slab.c\n@@ -1 +1 @@\n")
    with pytest.raises(LabError, match="patch x changes mm/slab.c: a module rebuild takes only .*build the whole kernel"):
        kpatch.check_patch_scope(bad)
    with pytest.raises(LabError, match="unknown KVM patch 'zzz'.*rebuild"):
        kpatch.get_patch("zzz")
    (tmp_path / "INDEX").write_text("mine 6.1 a patch without a file\n")
    assert kpatch.load_patches(str(tmp_path))["mine"].text == ""


@pytest.mark.skipif(not shutil.which("patch"), reason="patch not installed")
def test_a_patch_that_does_not_apply_names_file_and_hunk(tmp_path):
    tree = tmp_path / "t" / "virt" / "kvm"
    tree.mkdir(parents=True)
    (tree / "kvm_main.c").write_text("".join(f"line {i}\n" for i in range(1, 40)))
    diff = ("--- a/virt/kvm/kvm_main.c\n+++ b/virt/kvm/kvm_main.c\n"
            "@@ -20,3 +20,3 @@\n line 20\n-not what is there\n+new\n line 22\n")
    (tmp_path / "p.patch").write_text(diff)
    p = subprocess.run(["patch", "-p1", "--forward", "--batch", "--dry-run", "-i",
                        str(tmp_path / "p.patch")], cwd=tmp_path / "t", capture_output=True,
                       text=True)
    assert p.returncode != 0
    msg = kpatch.patch_failure(p.stdout + p.stderr, "p")
    assert msg == "patch p does not apply: virt/kvm/kvm_main.c: hunk #1 (at line 20)"
    assert kpatch.patch_failure("garbage\n", "q") == "patch q does not apply: garbage"


def test_debian_headers_metadata():
    deps = ("linux-headers-6.1.0-56-common (= 6.1.192-2), linux-kbuild-6.1 (= 6.1.192-2), "
            "linux-compiler-gcc-12-x86")
    assert modbuild.header_packages(deps) == ["linux-headers-6.1.0-56-common",
                                              "linux-kbuild-6.1"]
    kv = ("override ARCH = x86\nCCACHE = ccache\n"
          "CC = $(if $(DEBIAN_KERNEL_USE_CCACHE),$(CCACHE)) $(CROSS_COMPILE)gcc-12\n")
    assert modbuild.kernel_cc(kv) == "gcc-12"
    assert modbuild.kernel_cc("CC = $(CROSS_COMPILE)gcc-14\n") == "gcc-14"
    assert modbuild.kernel_cc("nothing\n") == "gcc"


def test_kbuild_puts_our_includes_first_and_points_srctree_at_the_tree():
    mk = "ccflags-y += -I $(srctree)/arch/x86/kvm\ninclude $(srctree)/virt/kvm/Makefile.kvm\n"
    kb = modbuild.kbuild_file(mk, "/c/tree")
    assert "$(srctree)" not in kb.split("\n", 1)[1]
    assert "LINUXINCLUDE := -I/c/tree/include -I/c/tree/.pyvmm/inc $(LINUXINCLUDE)" in kb
    assert "include /c/tree/virt/kvm/Makefile.kvm" in kb


def test_config_only_and_config_plus_diff_patches():
    patches = kpatch.load_patches()
    xen, lock = patches["xen"], patches["xen-lock"]
    assert xen.config() == {"CONFIG_KVM_XEN": "y"} and not xen.has_diff()
    assert lock.config() == {"CONFIG_KVM_XEN": "y"} and lock.files() == ["arch/x86/kvm/xen.c"]
    assert "static DEFINE_MUTEX(kvm_xen_lock);" in lock.text
    assert "+\tmutex_lock(&kvm_xen_lock);" in lock.text
    kb = modbuild.kbuild_file("obj-y += x.o\n", "/t", xen.config())
    assert "ccflags-y += -DCONFIG_KVM_XEN=1" in kb
    bad = kpatch.Patch("b", ("6.1",), "s", "Config: CONFIG_X=m\n")
    with pytest.raises(LabError, match="only 'Config: CONFIG_NAME=y'"):
        bad.config()
