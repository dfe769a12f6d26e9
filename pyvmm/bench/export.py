"""Export a run.json for other tools: pyperf's JSON (`pyvmm report --pyperf FILE`), so
that `python -m pyperf stats`, `hist` and `compare_to` work on pyvmm's boot samples.

One pyperf benchmark per cell (recipe and N, C driver), named e.g. "during-boot N=100";
one pyperf run per boot, holding that boot's wall time in seconds. Suite metadata says
where the samples come from (kernel, HZ, environment, lab variant); pyperf collects no
metadata of its own, since the machine exporting is not the one that measured.
"""

from __future__ import annotations

from ..errors import PyvmmError
from ..analysis import findings


def cell_name(recipe: str, n: int) -> str:
    return f"{recipe} N={n}"


def to_pyperf(doc: dict, path: str) -> int:
    """Write the boots of `doc` as a pyperf BenchmarkSuite; returns how many benchmarks."""
    try:
        import pyperf
    except ImportError:
        raise PyvmmError("--pyperf needs the pyperf package: pip install pyperf") from None
    host = doc["host"]
    lab = doc.get("lab") or {}
    meta = {"pyvmm_kernel": str(host.get("kernel")),
            "pyvmm_environment": str(doc.get("environment", "host")),
            "pyvmm_backend": str(host.get("backend")),
            "pyvmm_config_hz": str(host.get("config_hz")),
            "pyvmm_seed": str(doc["config"].get("seed")),
            "pyvmm_status": str(doc.get("status"))}
    if lab.get("variant"):
        meta["pyvmm_variant"] = lab["variant"]
    benches = []
    for (recipe, n), results in sorted(findings.group(doc).items()):
        runs = [pyperf.Run([r["boot_wall_ns"] / 1e9], collect_metadata=False,
                           metadata={"name": cell_name(recipe, n), "unit": "second",
                                     **meta})
                for r in results if r["boot_wall_ns"] > 0]
        if runs:
            benches.append(pyperf.Benchmark(runs))
    if not benches:
        raise PyvmmError("the run holds no successful boot to export")
    suite = pyperf.BenchmarkSuite(benches)
    suite.dump(path, replace=True)
    return len(benches)
