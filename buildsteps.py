"""Build steps run by setup.py: assemble guests/*.S into flat binaries and link the
standalone static pyvmm-bootbench helper. Both land in the package as data."""

import json
import os
import shutil
import subprocess
import sys
import tempfile

from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
GUESTS = os.path.join(ROOT, "guests")
CSRC = os.path.join(ROOT, "csrc")
CODE_GPA = 0x10000

TOOLS = {  # tool -> Debian package that provides it
    "gcc": "gcc",
    "ld": "binutils",
    "objcopy": "binutils",
}


def need_tools():
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pkgs = sorted({TOOLS[t] for t in missing})
        raise SystemExit(f"pyvmm build: missing {', '.join(missing)}: install them with "
                         f"'apt-get install {' '.join(pkgs)}'")


def run(cmd):
    subprocess.run(cmd, check=True)


def assemble_guest(src, out_bin, tmp):
    """.S -> flat binary. Real-mode guests (.code16) link at 0 (CS holds the base);
    64-bit guests link at CODE_GPA, where the VMM loads them."""
    with open(src) as f:
        real_mode = ".code16" in f.read()
    base = 0 if real_mode else CODE_GPA
    name = os.path.splitext(os.path.basename(src))[0]
    obj = os.path.join(tmp, name + ".o")
    elf = os.path.join(tmp, name + ".elf")
    run(["gcc", "-c", "-x", "assembler-with-cpp", "-I", GUESTS, "-o", obj, src])
    run(["ld", "-m", "elf_x86_64", f"-Ttext={base:#x}", "-e", "_start", "-o", elf, obj])
    run(["objcopy", "-O", "binary", elf, out_bin])


def build_helper(doorbell_bin, out, tmp):
    """The standalone static helper, with the doorbell guest embedded."""
    blob = os.path.join(tmp, "guest_blob.o")
    run(["gcc", "-c", f'-DDOORBELL_BIN="{doorbell_bin}"', "-o", blob,
         os.path.join(CSRC, "guest_blob.S")])
    cmd = ["gcc", "-O2", "-Wall", "-I", CSRC, "-I", GUESTS, "-o", out,
           os.path.join(CSRC, "main.c"), os.path.join(CSRC, "bootbench.c"), blob]
    try:
        run(cmd[:1] + ["-static"] + cmd[1:])
    except subprocess.CalledProcessError:
        raise SystemExit("pyvmm build: linking the static pyvmm-bootbench failed: the static C "
                         "library is missing; install it with 'apt-get install libc6-dev'")


def build_all(dest_pkg_dir, tmp):
    need_tools()
    gdir = os.path.join(dest_pkg_dir, "guests")
    bdir = os.path.join(dest_pkg_dir, "bin")
    os.makedirs(gdir, exist_ok=True)
    os.makedirs(bdir, exist_ok=True)
    os.makedirs(tmp, exist_ok=True)
    for name in sorted(os.listdir(GUESTS)):
        if name.endswith(".S"):
            assemble_guest(os.path.join(GUESTS, name),
                           os.path.join(gdir, name[:-2] + ".bin"), tmp)
    build_helper(os.path.join(gdir, "doorbell.bin"), os.path.join(bdir, "pyvmm-bootbench"), tmp)


def write_build_info(dest_pkg_dir):
    """pyvmm/_build.py: the git commit the package was built from (None outside git), so
    every results document can say which code wrote it."""
    commit = None
    try:
        p = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                           text=True)
        if p.returncode == 0:
            commit = p.stdout.strip()
            dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain",
                                    "--untracked-files=no"], capture_output=True, text=True)
            if dirty.returncode == 0 and dirty.stdout.strip():
                commit += "-dirty"
    except OSError:
        pass
    with open(os.path.join(dest_pkg_dir, "_build.py"), "w") as f:
        f.write(f'"""Written by the build (buildsteps.py)."""\nCOMMIT = {commit!r}\n')


def write_ioctl_numbers(dest_pkg_dir):
    """pyvmm/vmm/_ioctl_numbers.py: the ioctl numbers, computed here by ioctl-opt (from the
    source tree's pyvmm.vmm.abi) so that importing pyvmm need not import ioctl-opt and ctypes."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); "
            "from pyvmm.vmm.abi import computed_numbers; print(json.dumps(computed_numbers()))")
    p = subprocess.run([sys.executable, "-c", code, ROOT], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"pyvmm build: computing the ioctl numbers failed:\n{p.stderr}")
    numbers = json.loads(p.stdout)
    with open(os.path.join(dest_pkg_dir, "vmm", "_ioctl_numbers.py"), "w") as f:
        f.write('"""Written by the build (buildsteps.write_ioctl_numbers) from ioctl-opt."""\n'
                "NUMBERS = {\n" + "".join(f"    {k!r}: {v:#x},\n" for k, v in numbers.items())
                + "}\n")


class BuildPyWithGuests(build_py):
    """build_py, then the generated files. An editable install (what `make install`
    does) writes them into the checkout's own pyvmm/ (ignored by git), so the checkout is
    the install: `python -m pyvmm` works from the repository root and from anywhere."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            dest = os.path.join(ROOT, "pyvmm")
        else:
            dest = os.path.join(self.build_lib, "pyvmm")
        write_build_info(dest)
        write_ioctl_numbers(dest)
        with tempfile.TemporaryDirectory(prefix="pyvmm-build-") as tmp:
            build_all(dest, tmp)
