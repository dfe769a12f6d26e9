"""The house as docs/architecture.md draws it: every module of pyvmm sits in a room the
document places on a floor, and no import (at the top of a module or inside a function)
runs from a room to one the document places above it, or sideways to another room of
the same floor. Pure: reads the source, runs nothing of it."""

from __future__ import annotations

import ast
import os
import re
import shutil

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DOC = os.path.join(ROOT, "docs", "architecture.md")
# built into the package by `make`, not written by hand: they sit on the ground floor
GENERATED = {"pyvmm._native", "pyvmm._build", "pyvmm.vmm._abi", "pyvmm.vmm._sys",
             "pyvmm.vmm._ioctl_numbers"}


def floors(doc_text: str) -> list[list[str]]:
    """The fenced ```floors block: one floor a line, top first, rooms as paths below
    pyvmm/ (a folder ends with '/')."""
    m = re.search(r"```floors\n(.*?)```", doc_text, re.S)
    assert m, "docs/architecture.md has no ```floors block"
    out = []
    for line in m.group(1).splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line.split())
    return out


def room_of(module: str, rooms: dict[str, int]) -> str | None:
    """The longest room path that holds `module` (dotted name)."""
    path = module.split(".")[1:]
    best = None
    for r in rooms:
        parts = r.rstrip("/").removesuffix(".py").split("/")
        if r.endswith("/"):
            ok = path[:len(parts)] == parts
        else:
            ok = path == parts or (parts[-1] == "__init__" and path == parts[:-1])
        if ok and (best is None or len(parts) > len(best.rstrip("/").split("/"))):
            best = r
    return best


def modules(tree: str) -> dict[str, str]:
    """Dotted module name -> file, for every .py under tree/pyvmm."""
    out = {}
    for dp, _, fn in os.walk(os.path.join(tree, "pyvmm")):
        for f in fn:
            if f.endswith(".py"):
                p = os.path.join(dp, f)
                rel = os.path.relpath(p, tree)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = p
    return out


def imports(mods: dict[str, str]):
    """(importer, imported module) for every import of a pyvmm module."""
    known = set(mods) | GENERATED
    for name, path in mods.items():
        is_pkg = path.endswith("__init__.py")
        pkg = name if is_pkg else name.rpartition(".")[0]
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not target.startswith("pyvmm"):
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    yield name, sub if sub in known else target
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("pyvmm"):
                        yield name, a.name


def violations(tree: str, doc_text: str) -> list[str]:
    fl = floors(doc_text)
    rooms = {r: i for i, line in enumerate(fl) for r in line}
    mods = modules(tree)
    out = []
    for name in sorted(mods):
        if room_of(name, rooms) is None:
            out.append(f"{name}: in no room of the ```floors block")
    for a, b in sorted(set(imports(mods))):
        if b in GENERATED:
            continue
        ra, rb = room_of(a, rooms), room_of(b, rooms)
        if ra is None or rb is None or ra == rb:
            continue
        if rooms[rb] < rooms[ra]:
            out.append(f"{a} imports {b}: room {ra} (floor {rooms[ra]}) reaches up to "
                       f"{rb} (floor {rooms[rb]})")
        elif rooms[rb] == rooms[ra]:
            out.append(f"{a} imports {b}: rooms {ra} and {rb} are peers on one floor")
    return out


def test_every_import_runs_down_the_floors_the_document_draws():
    with open(DOC) as f:
        text = f.read()
    bad = violations(ROOT, text)
    assert not bad, "docs/architecture.md and the imports disagree:\n" + "\n".join(bad)


def test_every_room_of_the_document_exists():
    with open(DOC) as f:
        fl = floors(f.read())
    for line in fl:
        for r in line:
            path = os.path.join(ROOT, "pyvmm", r)
            assert os.path.exists(path) or f"pyvmm.{r}" in GENERATED, \
                f"the document places {r}, which is not in pyvmm/"


@pytest.mark.parametrize("victim, planted", [
    ("vmm/kvm.py", "from ..cli import entry\n"),                 # the VMM reaching the CLI
    ("analysis/stats.py", "    from ..bench import sweep\n"),    # inside a function
    ("bench/sweep.py", "from ..trace import model\n"),           # a peer on the same floor
])
def test_a_planted_upward_import_is_caught(tmp_path, victim, planted):
    """The check is not vacuous: the same tree with one import that runs up fails."""
    shutil.copytree(os.path.join(ROOT, "pyvmm"), tmp_path / "pyvmm",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "bin", "guests"))
    path = tmp_path / "pyvmm" / victim
    text = path.read_text()
    if planted.startswith("    "):
        text += "\n\ndef _planted():\n" + planted
    else:
        text += "\n" + planted
    path.write_text(text)
    with open(DOC) as f:
        bad = violations(str(tmp_path), f.read())
    assert bad and any(victim.replace("/", ".")[:-3] in b for b in bad), bad


# The sizes the house keeps (issue 27): a file a reader can hold, a function a reader can
# follow. drivers/floor.py's make() is flat on purpose (the floor; boot() is nested in it).
MAX_FILE_LINES, MAX_FUNCTION_LINES = 500, 120
LONG_ON_PURPOSE = {"pyvmm/drivers/floor.py:make", "pyvmm/drivers/floor.py:boot"}


def sizes(root: str) -> tuple[list[str], list[str]]:
    files, funcs = [], []
    pkg = os.path.join(root, "pyvmm")
    for dirpath, _, names in os.walk(pkg):
        for name in names:
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            with open(path) as f:
                src = f.read()
            if src.count("\n") > MAX_FILE_LINES:
                files.append(f"{rel}: {src.count(chr(10))} lines")
            for node in ast.walk(ast.parse(src)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_FUNCTION_LINES and f"{rel}:{node.name}" not in LONG_ON_PURPOSE:
                        funcs.append(f"{rel}:{node.name}: {n} lines")
    return files, funcs


def test_no_file_or_function_outgrows_the_house():
    files, funcs = sizes(ROOT)
    assert not files, f"files over {MAX_FILE_LINES} lines (split them by what they hold): " \
        + ", ".join(files)
    assert not funcs, f"functions over {MAX_FUNCTION_LINES} lines (name their steps): " \
        + ", ".join(funcs)


def test_the_size_check_is_not_vacuous(tmp_path):
    shutil.copytree(os.path.join(ROOT, "pyvmm"), tmp_path / "pyvmm",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "bin", "guests"))
    path = tmp_path / "pyvmm" / "ui.py"
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES + 1))
    path.write_text(path.read_text() + "\n\ndef _planted():\n" + body)
    files, funcs = sizes(str(tmp_path))
    assert any("pyvmm/ui.py:_planted" in f for f in funcs), funcs
    (tmp_path / "pyvmm" / "planted.py").write_text("x = 0\n" * (MAX_FILE_LINES + 1))
    files, _ = sizes(str(tmp_path))
    assert any(f.startswith("pyvmm/planted.py") for f in files), files
