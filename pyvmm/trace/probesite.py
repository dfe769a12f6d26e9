"""Where the uprobe on ioctl() goes: the ELF file that will run (a script's interpreter
followed), the C library it loads (or the file itself when static), the function's file
offset, and, where its code is the plain shape this needs, the conditional branch right
after its `syscall` (one emulated trap per hit instead of a trap and a single-step), with
the stack slot that holds the third argument there. Needs ldd, nm, readelf and objdump;
a lab kernel without them is told the site in its environment (ProbeSite.text/parse)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import NamedTuple

from . import model


class ProbeSite(NamedTuple):
    """Where the uprobe goes and where the third argument is when it fires: `arg` is
    '%dx' at the function's entry, or a slot of the stack ('+48(%sp)') after the syscall
    (`after`), where the function saved it; fd and request stay in %di and %si."""
    path: str
    offset: int
    arg: str = "%dx"
    after: bool = False

    @property
    def fetch(self) -> str:
        a = self.arg
        return (f"fd=%di:s32 cmd=%si:x64 arg={a}:x64 w0=+0({a}):x64 w1=+8({a}):x64 "
                f"w2=+16({a}):x64 w3=+24({a}):x64")

    @property
    def event(self) -> str:
        return model.UPROBE_AFTER if self.after else model.UPROBE_EVENT

    def text(self) -> str:
        """One line for a lab job's environment (parse() reads it back)."""
        return f"{self.path}:{self.offset:#x}:{self.arg}"

    @classmethod
    def parse(cls, text: str) -> "ProbeSite":
        path, off, arg = text.rsplit(":", 2)
        return cls(path, int(off, 0), arg, arg != "%dx")


def executable(argv0: str) -> str | None:
    """The ELF file that will run: the command itself, or a script's interpreter."""
    path = argv0 if os.sep in argv0 else shutil.which(argv0)
    if not path or not os.path.isfile(path):
        return None
    path = os.path.realpath(path)
    with open(path, "rb") as f:
        head = f.read(256)
    if head.startswith(b"#!"):
        words = head[2:].split(b"\n", 1)[0].split()
        if not words:
            return None
        interp = words[0].decode(errors="replace")
        if os.path.basename(interp) == "env" and len(words) > 1:
            return executable(words[1].decode(errors="replace"))
        return executable(interp)
    return path if head.startswith(b"\x7fELF") else None


def ioctl_site(exe: str, libc: str | None = None) -> ProbeSite | tuple[None, str]:
    """Where to probe the ioctl() the executable calls: its C library's (`libc` when the
    command brings its own, as another suite's QEMU run by its own loader does), or its
    own when it is linked statically; (None, why) when it cannot be found."""
    if libc is None:
        p = subprocess.run(["ldd", exe], capture_output=True, text=True)
        for line in p.stdout.splitlines():
            m = re.match(r"\s*libc\.so\.\d+ => (\S+)", line)
            if m:
                libc = m.group(1)   # the path the loader uses (a lab initramfs has only it)
    target = libc or exe
    vaddr = symbol_address(target, "ioctl")
    if vaddr is None:
        return None, f"no ioctl symbol in {target}"
    after = branch_after_syscall(target, vaddr)
    if after is not None:
        at, slot = after
        return ProbeSite(target, _file_offset(target, at), f"+{slot}(%sp)", True)
    return ProbeSite(target, _file_offset(target, vaddr))


_REGS = {r: {f"%r{r}", f"%e{r}", f"%{r}", f"%{r}l"} for r in ("di", "si", "dx", "sp")}
_INSN = re.compile(r"^\s*([0-9a-f]+):\s+(?:(?:ds|cs|fs|gs|notrack|bnd)\s+)*(\S+)\s*(.*?)\s*(?:#.*)?$")


def _dest(ops: str) -> str:
    """The operand an AT&T instruction writes (its last), '' for none."""
    depth, last = 0, 0
    for i, ch in enumerate(ops):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            last = i + 1
    return ops[last:].strip()


def branch_after_syscall(path: str, vaddr: int) -> tuple[int, int] | None:
    """(address of the conditional branch right after the function's syscall, stack
    slot where the function saved its third argument), or None when the code is not the
    plain shape this needs: straight-line code that saves %rdx to the stack below one
    frame adjustment, the syscall, and then a conditional branch, with %rdi, %rsi and
    %rsp untouched until it. Anything else keeps the probe at the entry."""
    if not shutil.which("objdump"):
        return None
    p = subprocess.run(["objdump", "-d", "--no-show-raw-insn", f"--start-address={vaddr:#x}",
                        f"--stop-address={vaddr + 192:#x}", path],
                       capture_output=True, text=True)
    return branch_in(p.stdout)


def branch_in(disassembly: str) -> tuple[int, int] | None:
    """branch_after_syscall on objdump's text (pure)."""
    slot, framed, called = None, False, False
    for line in disassembly.splitlines():
        m = _INSN.match(line)
        if not m:
            continue
        addr, mn, ops = int(m.group(1), 16), m.group(2), m.group(3)
        dest = _dest(ops)
        branch = mn.startswith(("j", "call", "ret", "loop")) or mn in ("syscall", "int3",
                                                                       "push", "pop")
        if called:
            if mn.startswith("j") and not mn.startswith("jmp"):
                return addr, slot
            if branch or dest in _REGS["di"] | _REGS["si"] | _REGS["sp"]:
                return None
            continue
        if mn == "syscall":
            if slot is None:
                return None
            called = True
            continue
        if branch or dest in _REGS["di"] | _REGS["si"]:
            return None
        if dest in _REGS["sp"]:
            if framed or slot is not None or not re.fullmatch(r"\$0x[0-9a-f]+,%rsp", ops) \
                    or mn != "sub":
                return None
            framed = True
            continue
        if dest in _REGS["dx"] and slot is None:
            return None             # the argument changed before it was saved
        save = re.fullmatch(r"%rdx,(0x[0-9a-f]+)?\(%rsp\)", ops)
        if mn == "mov" and save and slot is None:
            slot = int(save.group(1) or "0", 16)
    return None


def symbol_offset(path: str, name: str) -> int | None:
    """The file offset of a defined function symbol (dynamic or static), for a uprobe."""
    vaddr = symbol_address(path, name)
    return None if vaddr is None else _file_offset(path, vaddr)


def symbol_address(path: str, name: str) -> int | None:
    """The virtual address of a defined function symbol (dynamic or static)."""
    for args in (["nm", "-D", "--defined-only", path], ["nm", "--defined-only", path]):
        if not shutil.which("nm"):
            return None
        p = subprocess.run(args, capture_output=True, text=True)
        for line in p.stdout.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[2].split("@", 1)[0] == name and parts[1] in "TtWwiI":
                return int(parts[0], 16)
    return None


def _file_offset(path: str, vaddr: int) -> int:
    """A virtual address of an ELF file as an offset in it (through its PT_LOAD)."""
    p = subprocess.run(["readelf", "-lW", path], capture_output=True, text=True)
    for line in p.stdout.splitlines():
        parts = line.split()
        if parts and parts[0] == "LOAD" and len(parts) >= 6:
            off, va, filesz = int(parts[1], 16), int(parts[2], 16), int(parts[4], 16)
            if va <= vaddr < va + filesz:
                return vaddr - va + off
    return vaddr
