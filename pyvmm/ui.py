"""What every command's output shares: the one rich console (and its stderr twin), the
progress bars, duration formatting and the parsers of list arguments. Commands import
these public names from here instead of from each other.

The consoles are created on first use, so importing this module (and therefore any
command module) does not import rich.
"""

from __future__ import annotations

import os
import sys

from .errors import PyvmmError


# `pyvmm bench ptwrite ...` is routed by cli.main to this command (its own parser).
BENCH_PTWRITE = "bench-ptwrite"


class _LazyConsole:
    """A rich Console made on first use. On a terminal, tables and lines fit its width;
    written to a file or a pipe they fit $COLUMNS, or 80 columns without it."""

    def __init__(self, stderr: bool = False):
        self._stderr = stderr
        self._console = None

    def _get(self):
        if self._console is None:
            from rich.console import Console
            stream = sys.stderr if self._stderr else sys.stdout
            wide = None if stream.isatty() or os.environ.get("COLUMNS") else 80
            self._console = Console(stderr=self._stderr, width=wide)
        return self._console

    def __getattr__(self, name):
        return getattr(self._get(), name)


console = _LazyConsole()
err_console = _LazyConsole(stderr=True)


def real_console(c):
    """The rich Console behind `c` (rich's own classes want the real object)."""
    return c._get() if isinstance(c, _LazyConsole) else c


def progress(*columns: str, con=None, transient: bool = True):
    """A rich Progress with the named columns: 'spinner', 'text', 'bar', 'count',
    'elapsed', 'remaining' (text shows the task's description)."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn,
                               TextColumn, TimeElapsedColumn, TimeRemainingColumn)
    make = {"spinner": SpinnerColumn, "text": lambda: TextColumn("{task.description}"),
            "bar": BarColumn, "count": MofNCompleteColumn, "elapsed": TimeElapsedColumn,
            "remaining": TimeRemainingColumn}
    return Progress(*(make[c]() for c in columns), console=real_console(con or console),
                    transient=transient)


def say(con, line: str, markup: bool = False) -> None:
    """One line of prose, wrapped at the console's width with its continuation lines
    indented two spaces past the line's own indent (never cut, never flush left)."""
    import textwrap
    body = line.lstrip(" ")
    indent = " " * (len(line) - len(body))
    width = max(40, real_console(con).width)
    text = textwrap.fill(body, width=width, initial_indent=indent,
                         subsequent_indent=indent + "  ", break_long_words=False,
                         break_on_hyphens=False)
    con.print(text, highlight=False, markup=markup, soft_wrap=True)


def fmt_ns(ns: float | None, digits: int = 2) -> str:
    """A duration in ns as 'x.xx ms' from a millisecond up, else 'x.x us'; '-' for None."""
    if ns is None:
        return "-"
    return f"{ns / 1e6:.{digits}f} ms" if ns >= 1e6 else f"{ns / 1e3:.1f} us"


def int_list(text: str) -> tuple[int, ...]:
    """'0,1,10' -> (0, 1, 10), with a clear error for anything else."""
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise PyvmmError(f"'{text}' is not a comma-separated list of whole numbers") from None
    if not vals:
        raise PyvmmError("the list of N values is empty")
    return vals


def recipes_arg(text: str) -> tuple[str, ...]:
    """Preset names separated by ',' or recipe templates separated by ';'."""
    from . import recipe as rmod
    if ";" in text:
        parts = [p.strip() for p in text.split(";") if p.strip()]
    elif all(p.strip() in rmod.PRESETS for p in text.split(",")):
        parts = [p.strip() for p in text.split(",")]
    else:
        parts = [text.strip()]
    return tuple(parts)
