"""Tables that fit the terminal without ever cutting a value.

rich shrinks a table that is too wide by narrowing its widest columns, and a value
wider than its column is cut with an ellipsis: at 80 columns `1.16` became `1.1…`. A
Grid is built like a rich Table (add_column, add_row, add_section, caption) but is laid
out when it is printed, for the width it is printed at:

1. at its natural width when that fits;
2. else with columns narrowed, none below its longest word (header or value), so a value
   wraps at its spaces ("22.00 / 1.55 /" over "23.12") and no word is split;
3. else stacked: the first `keys` columns (what names a row) and as many other columns
   as fit, then the same keys with the next columns, each part a table of its own
   ("(continued)" in the title), so every value is shown, whole.
"""

from __future__ import annotations

from rich.cells import cell_len
from rich.table import Table
from rich.text import Text

SECTION = None      # a row that is a section break


def _plain(cell) -> str:
    if isinstance(cell, Text):
        return cell.plain
    return Text.from_markup(str(cell)).plain


def _natural(text: str) -> int:
    return max((cell_len(line) for line in text.splitlines()), default=0)


def _longest_word(text: str) -> int:
    return max((cell_len(w) for w in text.split()), default=0)


def _overhead(ncols: int) -> int:
    """Borders and padding of a rich Table with the default box: one space either side
    of each cell, a rule between columns and one at each edge."""
    return 3 * ncols + 1


class Grid:
    """A table laid out at print time for the width it is printed at (see the module)."""

    def __init__(self, title: str | None = None, caption: str | None = None,
                 show_header: bool = True, title_justify: str = "left", keys: int = 1,
                 continued: str | None = None, **_ignored):
        self.title = title
        self.continued = continued      # the title of a stacked part after the first
        self.caption = caption
        self.caption_justify = "left"
        self.title_justify = title_justify
        self.show_header = show_header
        self.keys = keys
        self.columns: list[tuple[str, str, str | None]] = []
        self.rows: list[list | None] = []

    def add_column(self, header: str = "", justify: str = "left", style: str | None = None,
                   **_ignored) -> None:
        self.columns.append((header, justify, style))

    def add_row(self, *cells, end_section: bool = False) -> None:
        cells = list(cells) + [""] * (len(self.columns) - len(cells))
        self.rows.append(cells)
        if end_section:
            self.rows.append(SECTION)

    def add_section(self) -> None:
        if self.rows and self.rows[-1] is not SECTION:
            self.rows.append(SECTION)

    # --- layout --------------------------------------------------------------------------
    def _measures(self) -> tuple[list[int], list[int], list[int]]:
        """(natural, soft, minimal) content width of every column: on one line; with
        the header wrapped but every value on one line; every word whole."""
        natural, soft, minimal = [], [], []
        for i, (header, _, _) in enumerate(self.columns):
            cells = [_plain(r[i]) for r in self.rows if r is not SECTION]
            head = [_plain(header)] if self.show_header else []
            natural.append(max([_natural(t) for t in cells + head] + [1]))
            soft.append(max([_natural(t) for t in cells] +
                            [_longest_word(t) for t in head] + [1]))
            minimal.append(max([_longest_word(t) for t in cells + head] + [1]))
        return natural, soft, minimal

    @staticmethod
    def _narrow(natural: list[int], minimal: list[int], room: int,
                soft: list[int] | None = None) -> list[int] | None:
        """Column widths summing to at most `room`: headers wrap first (down to `soft`),
        then values at their spaces, none under its longest word; the widest column
        gives first. None when even the minimums do not fit."""
        widths = list(natural)
        excess = sum(widths) - room
        if excess <= 0:
            return widths
        if sum(minimal) > room:
            return None
        for floor in ([max(a, b) for a, b in zip(soft, minimal)] if soft else None,
                      minimal):
            if floor is None:
                continue
            while excess > 0:
                can = [k for k in range(len(widths)) if widths[k] > floor[k]]
                if not can:
                    break
                i = max(can, key=lambda k: widths[k])
                widths[i] -= 1
                excess -= 1
        return widths

    def layout(self, width: int) -> list[tuple[list[int], list[int]]]:
        """The parts to print at `width`: (column indices, their widths) for each."""
        n = len(self.columns)
        natural, soft, minimal = self._measures()
        widths = self._narrow(natural, minimal, width - _overhead(n), soft)
        if widths is not None:
            return [(list(range(n)), widths)]
        keys = list(range(min(self.keys, n)))

        def fits(cols):
            return sum(minimal[k] for k in cols) + _overhead(len(cols)) <= width

        groups: list[list[int]] = []
        cur: list[int] = []
        for i in keys + [i for i in range(n) if i not in keys]:
            if not cur or fits(cur + [i]):
                cur.append(i)
                continue
            groups.append(cur)
            # A continued part starts with the keys that fit beside this column.
            lead = [] if i in keys else list(keys)
            while lead and not fits(lead + [i]):
                lead.pop()
            cur = lead + [i]
        groups.append(cur)
        parts = []
        for cols in groups:
            room = width - _overhead(len(cols))
            w = self._narrow([natural[k] for k in cols], [minimal[k] for k in cols], room,
                             [soft[k] for k in cols])
            # Only a lone word wider than the screen itself is ever folded.
            parts.append((cols, w if w is not None else
                          [max(1, min(minimal[k], room)) for k in cols]))
        return parts

    def tables(self, width: int) -> list[Table]:
        parts = self.layout(width)
        out = []
        for p, (cols, widths) in enumerate(parts):
            title = self.title
            if title and p:
                title = f"{self.continued or title} (continued)"
            t = Table(title=title, title_justify=self.title_justify,
                      show_header=self.show_header)
            for k, w in zip(cols, widths):
                header, justify, style = self.columns[k]
                t.add_column(header, justify=justify, style=style, width=w, overflow="fold")
            pending = False
            for r in self.rows:
                if r is SECTION:
                    pending = True
                    continue
                if pending:
                    t.add_section()
                    pending = False
                t.add_row(*[r[k] for k in cols])
            if len(parts) == 1 and self.caption:
                t.caption = self.caption
                t.caption_justify = self.caption_justify
            out.append(t)
        return out

    def __rich_console__(self, console, options):
        tables = self.tables(options.max_width)
        yield from tables
        if len(tables) > 1 and self.caption:
            # Under stacked parts the caption takes the whole width, not the last part's.
            yield Text.from_markup(self.caption, justify=self.caption_justify)
