"""The ptwrite result as a table (pyvmm bench ptwrite, pyvmm lab run ptwrite:N)."""

from __future__ import annotations

from ..tables import Grid


def ptwrite_table(res: dict, title: str) -> Grid:
    """The ptwrite summary (pyvmm.ptwrite.run's) as a table: per phase and
    configuration, the cost per write and the KVM stats that moved."""
    from . import PHASES
    t = Grid(title=title, title_justify="left", keys=2, continued="ptwrite")
    for col in ("vCPUs", "phase", "per write", "KVM stats deltas of the phase (vCPU 0 + VM)",
                "second vCPU's deltas"):
        t.add_column(col, justify="right" if col == "per write" else "left")
    for key, phases in res["summary"].items():
        for phase in PHASES:
            p = phases[phase]
            moved = ", ".join(f"{k} {v:g}" for k, v in p["stats"].items() if v)
            tmoved = ", ".join(f"{k} {v:g}" for k, v in p.get("toucher_stats", {}).items()
                               if v) or "-"
            t.add_row(key, phase, f"{p['per_write_ns'] / 1e3:.2f} us", moved or "-", tmoved)
    return t
