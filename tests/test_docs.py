"""The documents and the command line agree: every `pyvmm ...` command the README and the
docs name parses (its --help), every option of every command says what it does, the
README's figures name the run they come from, and at 80 columns no line of bench, boot,
trace or --help is wider than 80, with wrapped prose keeping its indent."""

from __future__ import annotations

import argparse
import glob
import io
import os
import re
import subprocess
import sys
from contextlib import redirect_stdout

import pytest

from pyvmm.cli import build_parser

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs",
                                                                         "*.md")))
NEUTRAL = "/"


def code_texts(path: str) -> list[str]:
    """Inline code spans and fenced blocks of a Markdown file."""
    with open(path) as f:
        text = f.read()
    blocks = re.findall(r"```[^\n]*\n(.*?)```", text, re.S)
    rest = re.sub(r"```[^\n]*\n.*?```", "", text, flags=re.S)
    return blocks + re.findall(r"`([^`\n]+)`", rest)


def named_commands() -> set[tuple[str, ...]]:
    """Every command path the documents name: `pyvmm lab kernel|matrix --arch arm64`
    gives ('lab', 'kernel') and ('lab', 'matrix')."""
    out = set()
    for path in DOCS:
        for code in code_texts(path):
            for m in re.finditer(r"(?:^|[\s/$(])pyvmm((?: +[a-z][a-z0-9|-]*)+)", code, re.M):
                words = m.group(1).split()
                paths = [[]]
                for w in words:
                    if w.startswith("-"):
                        break
                    alts = w.split("|")
                    paths = [p + [a] for p in paths for a in alts if a]
                for p in paths:
                    out.add(tuple(p))
    return out


def parse_help(words: tuple[str, ...]) -> str:
    argv = list(words)
    buf = io.StringIO()
    with redirect_stdout(buf), pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv + ["--help"])
    assert e.value.code == 0, f"pyvmm {' '.join(words)} --help exited {e.value.code}"
    return buf.getvalue()


def command_path(words: tuple[str, ...]) -> tuple[str, ...] | None:
    """The words that name (sub)commands, following the parser; None when a word names
    no subcommand where one is expected. The rest are a command's positionals."""
    alias = {("bench", "ptwrite"): "bench-ptwrite"}
    p, path = build_parser(), []
    for w in words:
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            break
        name = alias.get((path[-1] if path else None, w), w)
        if name == "bench-ptwrite" and path == ["bench"]:
            path = []
        if name not in subs[0].choices:
            return None
        p = subs[0].choices[name]
        path.append(name)
    return tuple(path)


def test_every_command_the_documents_name_parses():
    cmds = named_commands()
    assert ("bench",) in cmds and ("lab", "matrix") in cmds and ("trace",) in cmds
    bad = []
    for words in sorted(cmds):
        path = command_path(words)
        if path is None:
            bad.append(" ".join(words))
            continue
        parse_help(path)
    assert not bad, f"the documents name commands that do not exist: {bad}"


def _parsers(p: argparse.ArgumentParser, prefix=()):
    yield prefix, p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                yield from _parsers(sp, prefix + (name,))


def test_every_option_says_what_it_does():
    missing = []
    for prefix, p in _parsers(build_parser()):
        for a in p._actions:
            if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not a.help or a.help == argparse.SUPPRESS:
                missing.append(f"pyvmm {' '.join(prefix)} {'/'.join(a.option_strings) or a.dest}")
    assert not missing, "options without help text:\n" + "\n".join(missing)


def test_the_readmes_figures_name_the_run_they_come_from():
    """Every fenced block of output in the README is introduced by a '(run: ...)' note
    naming the machine or build and the date it was measured on."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    unnamed = []
    for m in re.finditer(r"```[^\n]*\n(.*?)```", text, re.S):
        body = m.group(1).strip()
        first = body.splitlines()[0] if body else ""
        if re.match(r"(make|pyvmm|sudo|\.venv|sh |ulimit|python|#|[\w.-]+(\.py|/)\s)", first) \
                or not re.search(r"\d", body):
            continue        # commands or a layout, not figures
        before = text[max(0, m.start() - 900):m.start()]
        if not re.search(r"\(run: [^)]*\d{4}-\d{2}-\d{2}[^)]*\)", before):
            unnamed.append(first[:60])
    assert not unnamed, f"README figure blocks without a '(run: ..., DATE)' note: {unnamed}"


# --- 80 columns -------------------------------------------------------------------------

def run80(*args, timeout=180):
    env = dict(os.environ, COLUMNS="80")
    return subprocess.run([sys.executable, "-m", "pyvmm", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=NEUTRAL, env=env)


def assert_fits(text: str, what: str) -> None:
    # a single word longer than the width (a results path) cannot be wrapped uncut
    wide = [ln for ln in text.splitlines() if len(ln) > 80 and " " in ln.strip()]
    assert not wide, f"{what}: lines over 80 columns:\n" + "\n".join(wide)


def test_help_fits_80_columns():
    for prefix, p in _parsers(build_parser()):
        p.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=78)
        assert_fits(p.format_help(), f"pyvmm {' '.join(prefix)} --help")
    r = run80("--help")
    assert r.returncode == 0
    assert_fits(r.stdout, "pyvmm --help")


@pytest.mark.kvm
def test_boot_and_bench_fit_80_columns_and_wrapped_prose_keeps_its_indent(tmp_path):
    r = run80("boot", "--ioeventfds", "4")
    assert r.returncode == 0, r.stderr
    assert_fits(r.stdout, "pyvmm boot --ioeventfds 4")
    r = run80("bench", "--ns", "0,1", "--repeats", "3", "--no-plot", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert_fits(r.stdout, "pyvmm bench")
    lines = r.stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("verdict:"))
    block = []
    for ln in lines[start + 1:]:
        if ln.startswith("sweep wall time"):
            break
        block.append(ln)
    assert block and all(ln.startswith("  ") for ln in block), block


@pytest.mark.kvm
@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/sys/kernel/tracing"),
                    reason="pyvmm trace needs root and tracefs")
def test_trace_fits_80_columns(tmp_path):
    r = run80("trace", "--vmm", "pyvmm-boot:1", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert_fits(r.stdout, "pyvmm trace --vmm pyvmm-boot:1")
