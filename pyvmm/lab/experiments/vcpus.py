"""`pyvmm lab vcpus`: the registration share of a tiny boot against its vCPU count, on
arm64, where every vCPU's GICv3 redistributor is a device on the KVM MMIO bus.

A VMM on arm64 makes its vCPUs, then the GIC (QEMU and Firecracker alike): setting the
redistributor region registers one redistributor per vCPU (kvm_io_bus_register_dev), so
K vCPUs are K registrations after KVM_CREATE_VCPU, and before Linux 6.18 each waits for
an SRCU grace period. From 6.18 they do not wait, but the grace period the last one
starts is still running when the VMM next changes a memslot, which waits for it.

Each variant runs one seeded, interleaved plan (kernel_lab.run_lab) of two recipes per
vCPU count K, at every N (ioeventfds registered before the vCPUs):

  gic-kK    vm,mem,ioev:N,vcpu:K,gic,run:rung,memslot,run   (a VM as a VMM makes it)
  nogic-kK  vm,mem,ioev:N,vcpu:K,run:rung,memslot,run       (the same without the GIC)

plus the control recipe of the verdict. Per (K, N), from the gic recipe: the boot, the
redistributor-region ioctl (the K registrations), the ioeventfd phase, their share of
the boot, and the memslot change after the first run; its stall is that memslot change
less the one of nogic-kK at N=0 (nothing registered, nothing pending). The
distributor's own registration (at the first KVM_RUN) is in the run phase, not counted.
"""

from __future__ import annotations

import os

from ...analysis import stats
from ...analysis.plan import SweepConfig
from ...errors import LabError
from ..arch import ARM64
from ..builds.variant import Variant, parse_variants as variants_of
from . import kernel_lab
from .labrun import Finished
from .multi import MultiRun, run_each
from .options import LabOptions, Ui

SCHEMA = "pyvmm-lab-vcpus/1"
DEFAULT_VARIANTS = ("arm64:6.1", "arm64:7.3")
DEFAULT_VCPUS = (1, 2, 4, 8, 16)
DEFAULT_NS = (0, 32)
MAX_VCPUS = 64          # BB_MAX_VCPUS; the redistributor region holds that many
STALL_NONE_NS = 100_000     # a memslot change this close to the clean one did not wait


def recipes(ks: tuple[int, ...]) -> dict[str, str]:
    out = {}
    for k in ks:
        out[f"gic-k{k}"] = f"vm,mem,ioev:N,vcpu:{k},gic,run:rung,memslot,run"
        out[f"nogic-k{k}"] = f"vm,mem,ioev:N,vcpu:{k},run:rung,memslot,run"
    return out


def check_vcpus(ks: tuple[int, ...]) -> tuple[int, ...]:
    if not ks:
        raise LabError("--vcpus is empty: give vCPU counts, e.g. 1,2,4,8,16")
    bad = [k for k in ks if not 1 <= k <= MAX_VCPUS]
    if bad:
        raise LabError(f"--vcpus {bad[0]}: give counts from 1 to {MAX_VCPUS}")
    if len(set(ks)) != len(ks):
        raise LabError("--vcpus lists a count twice")
    return tuple(sorted(ks))


def sweep_config(ks: tuple[int, ...], ns: tuple[int, ...], repeats: int, warmup: int,
                 seed: int | None, control_n: int = 32) -> SweepConfig:
    tmpl = recipes(check_vcpus(ks))
    return SweepConfig(ns=ns, recipes=tuple(tmpl), repeats=repeats, warmup=warmup, seed=seed,
                       control_n=control_n, templates=dict(tmpl))


def parse_variants(text: str) -> list[Variant]:
    """The matrix's variants, arm64 unless a name says otherwise."""
    return variants_of(text, ARM64)


def _phase(res: dict, op: str) -> dict | None:
    return next((p for p in res["phases"] if p["op"] == op), None)


def cell(results: list[dict], k: int) -> dict:
    """What a (gic recipe, K, N) cell's boots say (medians in ns)."""
    boot, redist, ioev, share, memslot, vcpu = [], [], [], [], [], []
    for r in results:
        if not r["ok"]:
            continue
        g, io, ms, vc = (_phase(r, op) for op in ("gic", "ioev", "memslot", "vcpu"))
        # gic samples: distributor address, redistributor region (K registrations), init
        reg = g["samples"][1] if g and len(g["samples"]) >= 2 else None
        if reg is None:
            continue
        boot.append(r["boot_wall_ns"])
        redist.append(reg)
        ioev.append(io["wall_ns"] if io else 0)
        share.append((reg + (io["wall_ns"] if io else 0)) / r["boot_wall_ns"])
        vcpu.append(vc["wall_ns"] if vc else 0)
        if ms and ms["samples"]:
            memslot.append(ms["samples"][0])
    med = lambda xs: stats.median(xs) if xs else None     # noqa: E731
    return {"boots": len(boot), "boot_ns": med(boot), "redist_ns": med(redist),
            "redist_per_vcpu_ns": med(redist) / k if redist else None,
            "ioev_ns": med(ioev), "registration_share": med(share),
            "vcpu_ns": med(vcpu), "memslot_ns": med(memslot),
            "memslot_p90_ns": stats.percentile(memslot, 90) if memslot else None}


def rows(doc: dict, ks: tuple[int, ...], ns: tuple[int, ...]) -> list[dict]:
    """A row per (K, N) from one variant's run.json."""
    by: dict[tuple[str, int], list[dict]] = {}
    for s in doc["samples"]:
        by.setdefault((s["recipe"], s["n"]), []).append(s["result"])
    out = []
    for k in ks:
        clean = [r["phases"] for r in by.get((f"nogic-k{k}", 0), []) if r["ok"]]
        clean_ms = [p["samples"][0] for ph in clean for p in ph
                    if p["op"] == "memslot" and p["samples"]]
        base = stats.median(clean_ms) if clean_ms else None
        for n in ns:
            c = cell(by.get((f"gic-k{k}", n), []), k)
            c.update(k=k, n=n, memslot_clean_ns=base,
                     stall_ns=(c["memslot_ns"] - base) if c["memslot_ns"] is not None
                     and base is not None else None)
            # what registering cost the boot in all: the registrations, and the wait they
            # left for the memslot change (the fix's regression)
            c["share_with_stall"] = None if c["boot_ns"] is None or c["stall_ns"] is None \
                else (c["redist_ns"] + c["ioev_ns"] + max(0.0, c["stall_ns"])) / c["boot_ns"]
            nog = [p["samples"][0] for r in by.get((f"nogic-k{k}", n), []) if r["ok"]
                   for p in r["phases"] if p["op"] == "memslot" and p["samples"]]
            c["stall_nogic_ns"] = (stats.median(nog) - base) if nog and base is not None \
                else None
            out.append(c)
    return out


def run_vcpus(variants: list[Variant], ks: tuple[int, ...], cfg: SweepConfig,
              base: LabOptions, ui: Ui | None = None) -> MultiRun:
    ui = ui or Ui()

    def row_of(v: Variant, run: Finished) -> dict:
        kc = run.doc.get("kernel_check") or {}
        return {"variant": v.label, "kernel": run.doc["host"]["kernel"],
                "hz": run.doc["host"].get("config_hz"),
                "kernel_check": kc.get("summary"), "behaviour": kc.get("behaviour"),
                "run": os.path.join(run.out_dir, "run.json"),
                "rows": rows(run.doc, ks, cfg.ns)}

    return run_each(variants, base, ui, "vcpus", SCHEMA,
                    lambda opts: kernel_lab.run_lab(opts, cfg, ui), row_of,
                    rows_key="results", vcpus=list(ks), ns=list(cfg.ns), config=cfg.to_dict())


def _ms(ns, digits=2) -> str:
    return "-" if ns is None else f"{ns / 1e6:.{digits}f}"


def table(doc: dict):
    """One table, a row per (variant, K, N): the boot, the registrations (the
    redistributor region and the ioeventfds) with their share of the boot, the memslot
    change after the first run with its stall, and the share of the boot registering cost
    in all (registrations and stall)."""
    from ...tables import Grid
    t = Grid(title=f"registration share of a tiny boot against vCPU count "
                   f"({', '.join(r['variant'] for r in doc['results'])}; medians in ms, QEMU "
                   "TCG)", title_justify="left", keys=3)
    for c, left in (("variant", True), ("vCPUs", False), ("N", False), ("boot", False),
                    ("GIC redist. (K regs)", False), ("per vCPU", False),
                    ("ioeventfds", False), ("reg. share", False), ("memslot after", False),
                    ("stall", False), ("share with stall", False)):
        t.add_column(c, justify="left" if left else "right")
    for i, r in enumerate(doc["results"]):
        for x in r["rows"]:
            share = x["registration_share"]
            t.add_row(r["variant"], str(x["k"]), str(x["n"]), _ms(x["boot_ns"]),
                      _ms(x["redist_ns"], 3), _ms(x["redist_per_vcpu_ns"], 3),
                      _ms(x["ioev_ns"], 3), "-" if share is None else f"{share:.1%}",
                      _ms(x["memslot_ns"], 3), _ms(x["stall_ns"], 3),
                      "-" if x.get("share_with_stall") is None
                      else f"{x['share_with_stall']:.1%}")
        if i + 1 < len(doc["results"]):
            t.add_section()
    return t


def notes(doc: dict) -> list[str]:
    """A line per variant: what kernel-check says, and the stall's size against HZ."""
    out = []
    for r in doc["results"]:
        line = f"{r['variant']} ({r['kernel']}): {r['kernel_check'] or 'no kernel-check'}"
        stalls = [x["stall_ns"] for x in r["rows"] if x["stall_ns"] is not None
                  and x["n"] == 0]
        if stalls and r.get("hz"):
            jiffy = 1e9 / r["hz"]
            m = stats.median(stalls)
            if abs(m) < STALL_NONE_NS:
                line += (f"; the memslot change after the GIC alone (N=0) does not wait for "
                         f"its registrations (within {STALL_NONE_NS / 1e6:.1f} ms of one "
                         "with nothing registered)")
            else:
                line += (f"; the memslot change after the GIC alone (N=0) waits "
                         f"{m / 1e6:.2f} ms more than with nothing registered "
                         f"({m / jiffy:.2f} jiffies at HZ={r['hz']}; median over the vCPU "
                         "counts)")
        out.append(line)
    return out
