"""CLI: `pyvmm lab kernel` (alias `lab oldkernel`), `lab matrix`, `lab vcpus`, `lab
remedies`, `lab run`, `lab hosts`, `lab qemu` and `pyvmm kernel-check`. The arguments the
experiments share, and how they become options, are in experiments/arguments.py."""

from __future__ import annotations

import json
import os
import time

from ..analysis import report
from ..analysis.stats import fails_on
from ..errors import EXIT_FAILED, EXIT_FOUND, LabError, PyvmmError
from ..ui import console, err_console, int_list, progress, say
from .arch import get_arch
from .builds import kcheck
from .builds.patch import load_patches
from .builds.variant import parse_variant, parse_variants
from .experiments import hosts as hosts_mod
from .experiments import arguments, kernel_lab, matrix, options, remedies, remedies_report, vcpus
from .experiments.ready import check_available
from .sources.debian import KERNEL_SPEC_FORMS


def add_parsers(sub) -> None:
    lab = sub.add_parser("lab", help="labs that need more than this host (another kernel, "
                                     "rebuilt KVM modules)")
    labs = lab.add_subparsers(dest="lab", required=True)
    for add in (_kernel_parsers, _matrix_parser, _vcpus_parser, _hosts_parser, _run_parser,
                _remedies_parser, _qemu_parser, add_kernel_check_parser):
        add(labs)


def _kernel_parsers(labs) -> None:
    for name in ("kernel", "oldkernel"):
        o = labs.add_parser(
            name, help="run the registration sweep on a Debian kernel (6.1 ... latest) under "
                       "QEMU (TCG, emulated SVM), optionally with rebuilt KVM modules, and "
                       "show the same table and verdict" + (" (old name of 'lab kernel')"
                                                            if name == "oldkernel" else ""))
        o.add_argument("--kernel", default="6.1",
                       help=f"{KERNEL_SPEC_FORMS} (default %(default)s){arguments.BUILD_HELP}")
        o.add_argument("--kvm-patch", default=None, metavar="NAME",
                       help="rebuild kvm.ko and kvm-amd.ko from the kernel's Debian source "
                            "with this patch of the project's (pyvmm/lab/builds/patches/INDEX: "
                            f"{', '.join(load_patches())})")
        arguments.sweep_args(o, kernel_lab.LAB_REPEATS)
        o.set_defaults(func=cmd_kernel)


def _matrix_parser(labs) -> None:
    m = labs.add_parser("matrix", help="the same seeded sweep on several kernels and patched "
                                       "KVM builds, one table with a row per variant")
    m.add_argument("--variants", default=",".join(matrix.DEFAULT_VARIANTS),
                   help="comma-separated KERNEL[+PATCH][@hzN] (default %(default)s)"
                        + arguments.BUILD_HELP)
    m.add_argument("--json", action="store_true",
                   help="print the table as one JSON object on stdout (progress on stderr)")
    m.add_argument("--workload", default=None, metavar="WORKLOAD",
                   help="instead of the sweep, trace this VMM's start-up in each variant "
                        "(pyvmm trace in the lab kernel): qemu-microvm[:K] (QEMU to its "
                        "firmware with K virtio devices) or linux-microvm[:BxQ] (QEMU booting "
                        "a Linux guest to its /init); a row per variant with start-up (or "
                        "time to init), KVM ioctl time, SRCU waits and who paid them")
    m.add_argument("--trace-repeats", type=int, default=3, metavar="R",
                   help="with --workload: start-ups traced per variant (default 3)")
    arguments.qemu_arg(m)
    arguments.sweep_args(m, kernel_lab.LAB_REPEATS)
    m.set_defaults(func=cmd_matrix)


def _vcpus_parser(labs) -> None:
    vc = labs.add_parser("vcpus", help="arm64: the registration share of a tiny boot against "
                                       "its vCPU count (one GICv3 redistributor per vCPU on the "
                                       "KVM MMIO bus), and the memslot stall after it, one "
                                       "table for several kernels")
    vc.add_argument("--variants", default=",".join(vcpus.DEFAULT_VARIANTS),
                    help="comma-separated kernels, arm64 by default (default %(default)s)")
    vc.add_argument("--vcpus", default=",".join(map(str, vcpus.DEFAULT_VCPUS)),
                    help="vCPU counts (default %(default)s)")
    arguments.sweep_args(vc, kernel_lab.LAB_REPEATS)
    vc.set_defaults(func=cmd_vcpus, ns=",".join(map(str, vcpus.DEFAULT_NS)), arch="arm64")


def _hosts_parser(labs) -> None:
    h = labs.add_parser("hosts", help="boot lab variants under QEMU as SSH hosts and write an "
                                      "Ansible inventory of them, for pyvmm fleet run "
                                      "(--stop ends them)")
    h.add_argument("--variants", default=",".join(hosts_mod.DEFAULT_VARIANTS),
                   help="comma-separated KERNEL[+PATCH][@hzN], x86_64 (default %(default)s)"
                        + arguments.BUILD_HELP)
    h.add_argument("--stop", nargs="?", const="", default=None, metavar="DIR",
                   help="stop the hosts of the last lab hosts run (or of DIR)")
    h.add_argument("--smp", type=int, default=1, choices=[1, 2],
                   help="emulated CPUs per host (default 1)")
    h.add_argument("--mem", type=int, default=hosts_mod.HOST_MEM_MB, metavar="MB",
                   help="memory per host (default %(default)s)")
    h.add_argument("--timeout", type=float, default=900.0, metavar="S",
                   help="longest to wait for every host to answer SSH (default %(default)g)")
    h.add_argument("--out", default="results",
                   help="parent directory of results/lab-hosts-<time>/ (default %(default)s)")
    h.add_argument("--no-install", action="store_true",
                   help="fail instead of installing QEMU / busybox-static when missing")
    arguments.cmdline_arg(h)
    h.set_defaults(func=cmd_hosts)


def _run_parser(labs) -> None:
    r = labs.add_parser("run", help="run pyvmm's Python workloads (ptwrite, checks, stress, "
                                    "the Xen seed) inside a lab kernel, with a Python "
                                    "runtime in the initramfs")
    r.add_argument("jobs", nargs="+", metavar="JOB",
                   help="ptwrite:COUNT[:REPEATS], check:NAME[:ITERATIONS], "
                        "stress:SECONDS[:SEED], xen:SECONDS[:SEEDS[:BOUND]] (the Xen "
                        "event-channel seed, with --kvm-patch xen or xen-lock), "
                        "trace:qemu-microvm[:K[:R]] (the host's QEMU with K virtio devices, "
                        "traced R times), trace:linux-microvm[:BxQ[:R]] (that QEMU booting "
                        "the lab's Linux guest to /init with B virtio-blk devices of Q "
                        "queues), gpwork:N[:R] (N ioeventfds registered R times, traced: "
                        "where SRCU's grace-period work ran)")
    r.add_argument("--kernel", default="6.1", help=f"{KERNEL_SPEC_FORMS}{arguments.BUILD_HELP}")
    r.add_argument("--kvm-patch", default=None, metavar="NAME",
                   help="rebuild KVM with this patch of the project's (as lab kernel)")
    r.add_argument("--kvm-arg", action="append", default=[], metavar="MODULE:NAME=VALUE",
                   help="module parameter, e.g. kvm_amd:npt=0 (shadow paging); repeatable")
    r.add_argument("--smp", type=int, default=2, choices=[1, 2],
                   help="emulated CPUs (default 2: the jobs run several vCPU threads)")
    r.add_argument("--mttcg", action="store_true",
                   help="multi-threaded TCG: a host thread per emulated CPU (with "
                        "--emulator debian:trixie or sid)")
    arguments.emulator_arg(r)
    r.add_argument("--out", default="results",
                   help="parent directory for results (default %(default)s)")
    r.add_argument("--timeout", type=float, default=1800.0, metavar="S",
                   help="kill QEMU after this many seconds in all (default %(default)g)")
    r.add_argument("--no-install", action="store_true",
                   help="fail instead of installing QEMU / busybox-static when missing")
    r.add_argument("--json", action="store_true", help="print results.json on stdout")
    arguments.qemu_arg(r)
    arguments.cmdline_arg(r)
    r.set_defaults(func=cmd_run)


def _remedies_parser(labs) -> None:
    rm = labs.add_parser("remedies", help="every remedy for the fix's follow-up on 7.3 "
                                          "beside 6.1, at each HZ and CPU count, several lab "
                                          "boots each: one table (remedies.md)")
    rm.add_argument("--hz", default=",".join(map(str, remedies.DEFAULT_HZ)),
                    help="HZ of the whole-kernel builds (default %(default)s)")
    rm.add_argument("--smp", default=",".join(map(str, remedies.DEFAULT_SMP)),
                    help="emulated CPU counts; more than one runs multi-threaded TCG "
                         "(default %(default)s)")
    rm.add_argument("--lab-boots", type=int, default=3, metavar="K",
                    help="lab boots per figure, seeds SEED+1..SEED+K; the report shows "
                         "their spread (default %(default)s)")
    rm.add_argument("--trace-repeats", type=int, default=3, metavar="R",
                    help="QEMU start-ups traced per variant and lab boot (0: no trace; "
                         "default %(default)s)")
    rm.add_argument("--linux-guest", type=int, default=0, metavar="R",
                    help="also boot the lab's Linux guest to /init R times in each trace's "
                         "lab boot (QEMU microvm, 2 virtio-blk; about 8 s each under TCG; "
                         "default 0)")
    rm.add_argument("--resume", default=None, metavar="DIR",
                    help="a remedies run directory: reuse its finished cells, run the rest")
    rm.add_argument("--build-only", action="store_true",
                    help="build (or find cached) every variant's kernel and stop")
    rm.add_argument("--doc", default=None, metavar="PATH",
                    help="also write the report into this Markdown file, between its "
                         "markers (e.g. docs/remedies.md)")
    arguments.emulator_arg(rm, remedies.DEFAULT_EMULATOR)
    arguments.sweep_args(rm, 10, cpus=False)
    rm.set_defaults(func=cmd_remedies, ns=",".join(map(str, remedies.DEFAULT_NS)))


def _qemu_parser(labs) -> None:
    q = labs.add_parser("qemu", help="fetch another Debian suite's QEMU with its libraries "
                                     "(run with its own loader) and print its launcher "
                                     "directory, for pyvmm trace --qemu")
    q.add_argument("suite", metavar="debian:SUITE",
                   help="debian:trixie (QEMU 10.0), debian:sid (11.x) or debian:bookworm")
    q.set_defaults(func=cmd_qemu)


def add_kernel_check_parser(sub) -> None:
    """`kernel-check`: registered under `pyvmm lab` and, by pyvmm.cli, at the top level."""
    k = sub.add_parser("kernel-check",
                       help="how does kvm_io_bus_register_dev in this kvm.ko free the old bus, "
                            "and does a memslot change synchronize? (objdump)")
    k.add_argument("module", help="path of kvm.ko (or kvm.ko.xz) or a vmlinux with symbols")
    k.add_argument("--json", action="store_true", help="print the result as JSON")
    k.set_defaults(func=cmd_kernel_check)


def cmd_kernel(args) -> int:
    # --kernel is a whole variant name ([arm64:]KERNEL[+PATCH][@hzN]); --kvm-patch gives
    # the patch too (both at once must agree)
    v = parse_variant(args.kernel, arch=get_arch(args.arch), patch=args.kvm_patch)
    opts = arguments.lab_options(args, v)
    options.check_options(opts)      # bad arguments fail before any tool or download
    cfg = arguments.sweep_config(args)
    check_available([v], options.ConsoleUi(console))
    boots = len(kernel_lab.make_plan(cfg)) - cfg.warmup
    variant = opts.variant.label
    console.print(f"pyvmm lab kernel: {variant}, {boots} boots "
                  f"({boots // cfg.repeats} cells x {cfg.repeats} repeats, interleaved, seed "
                  f"{cfg.seed}, {cfg.warmup} warm-up boots discarded), QEMU TCG -smp {args.smp}",
                  highlight=False)
    t0 = time.monotonic()
    with _progress(console) as prog:
        run = kernel_lab.run_lab(opts, cfg, options.RichUi(prog))
    doc, out = run.doc, run.out_dir
    report.write_all(console, doc, out)
    t = run.timings
    mods = (f", modules {t['modules_s']:.1f} s" + (" (cached)" if t.get("modules_cached") else "")
            if "modules_s" in t else "")
    if "kernel_build_s" in t:
        mods += (f", kernel build {t['kernel_build_s']:.1f} s"
                 + (" (cached)" if t.get("kernel_cached") else ""))
    console.print(f"lab wall time {time.monotonic() - t0:.1f} s (download {t['download_s']:.1f} "
                  f"s{mods}, unpack+initramfs {t['build_s'] + t.get('unpack_s', 0):.1f} s, "
                  f"QEMU {t['qemu_s']:.1f} s); "
                  f"{len(doc['samples'])} boots in {os.path.join(out, 'run.json')}",
                  highlight=False)
    retries = [a for a in doc["lab"]["attempts"] if not a["ok"]]
    if retries:
        console.print(f"[yellow]{len(retries)} attempt(s) hung and were retried[/]")
    kc = doc["kernel_check"]
    if not (kc.get("agrees", True) and not doc["failures"]):
        return EXIT_FAILED
    found = (doc.get("analysis") or {}).get("regressions") or []
    if fails_on(args.fail_on, found):
        say(console, f"--fail-on {args.fail_on}: found {', '.join(found)} (exit {EXIT_FOUND})")
        return EXIT_FOUND
    return 0


def _progress(con):
    return progress("spinner", "text", "bar", "count", "elapsed", con=con)


def cmd_matrix(args) -> int:
    variants = parse_variants(args.variants, get_arch(args.arch))
    base = arguments.lab_options(args, variants[0], qemu=args.qemu)
    cfg = arguments.sweep_config(args)
    out_con = console
    if args.json:                       # stdout carries only the JSON object
        out_con = err_console
    workload = None
    if args.workload:
        from .experiments import inside
        if args.trace_repeats < 1:
            raise LabError(f"--trace-repeats {args.trace_repeats}: give at least 1")
        workload = args.workload if ":" in args.workload else \
            f"{args.workload}:{'1x1' if args.workload == 'linux-microvm' else '0'}"
        try:
            inside.parse_job(f"trace:{workload}:{args.trace_repeats}")
        except PyvmmError:
            raise LabError(f"--workload {args.workload}: the lab traces qemu-microvm[:K] "
                           "(K virtio-mmio devices) or linux-microvm[:BxQ] (a Linux guest "
                           "with B virtio-blk devices of Q queues)") from None
        what = f"{workload} traced {args.trace_repeats} time(s)"
    else:
        what = f"{len(kernel_lab.make_plan(cfg)) - cfg.warmup} boots, seed {cfg.seed}"
    out_con.print(f"pyvmm lab matrix: {len(variants)} variants "
                  f"({', '.join(v.label for v in variants)}), {what} each", highlight=False)
    t0 = time.monotonic()
    with _progress(out_con) as prog:
        run = matrix.run_matrix(variants, cfg, base, options.RichUi(prog), workload=workload,
                                repeats=args.trace_repeats)
    doc = run.doc
    paths = matrix.plot(doc, run.out_dir) if doc["rows"] else []
    out_con.print(matrix.table(doc))
    for f in doc["failed"]:
        out_con.print(f"[red]variant {f['variant']} failed:[/] {f['error']}", highlight=False)
    out_con.print(f"matrix wall time {time.monotonic() - t0:.1f} s; "
                  f"{os.path.join(run.out_dir, 'matrix.json')}"
                  + (f", plot {paths[0]}" if paths else ""), highlight=False)
    if args.json:
        print(json.dumps(matrix.json_rows(doc), indent=1))
    ok = not doc["failed"] and all(r["agrees"] is not False for r in doc["rows"])
    if not ok:
        return EXIT_FAILED
    hits = [r["variant"] for r in doc["rows"] if fails_on(args.fail_on, _found(r))]
    if hits:
        say(out_con, f"--fail-on {args.fail_on}: found in {', '.join(hits)} (exit {EXIT_FOUND})")
        return EXIT_FOUND
    return 0


def cmd_remedies(args) -> int:
    hzs, smps = int_list(args.hz), int_list(args.smp)
    arch = get_arch(args.arch)
    if arch.cross_prefix:
        # arm64: this host's qemu-system-aarch64 (multi-threaded TCG is its default for an
        # aarch64 guest); a Debian suite's QEMU is fetched for x86 only
        if args.emulator not in (None, remedies.DEFAULT_EMULATOR):
            raise LabError(f"--emulator {args.emulator}: the arm64 lab runs this host's "
                           "qemu-system-aarch64; leave --emulator out")
        args.emulator = None
    base = arguments.lab_options(args, parse_variant("7.3", arch=arch), smp=1)
    cfg = arguments.sweep_config(args)
    remedies.check(hzs, smps, args.lab_boots, args.trace_repeats, args.linux_guest, arch)
    n = len(remedies.cells(hzs, smps, args.lab_boots))
    console.print(f"pyvmm lab remedies: {len(remedies.REMEDIES)} variants x HZ "
                  f"{args.hz} x CPUs {args.smp} x {args.lab_boots} lab boots ({n} cells, "
                  f"each a sweep{' and a trace' if args.trace_repeats else ''}"
                  f"{' with the Linux guest' if args.linux_guest else ''} of every "
                  f"variant), emulator {args.emulator or arch.qemu}", highlight=False)
    t0 = time.monotonic()
    with _progress(console) as prog:
        doc, out = remedies.run_remedies(hzs, smps, args.lab_boots, cfg, base, options.RichUi(prog),
                                         out_dir=args.resume,
                                         trace_repeats=args.trace_repeats,
                                         build_only=args.build_only,
                                         linux_guest=args.linux_guest)
    if args.build_only:
        built = [b for b in doc["builds"] if not b["cached"]]
        console.print(f"{len(doc['builds'])} kernels ready ({len(built)} built) in "
                      f"{time.monotonic() - t0:.1f} s", highlight=False)
        return 0
    paths = remedies_report.write_report(doc, out, args.doc)
    for g in remedies_report.grids(doc):
        console.print(g)
    for a in remedies_report.answers(doc):
        say(console, a)
    console.print(f"remedies wall time {time.monotonic() - t0:.1f} s; "
                  f"{os.path.join(out, 'remedies.json')}, {', '.join(paths)}",
                  highlight=False)
    return 0 if doc["status"] == "complete" and all(r["agrees"] for r in doc["rows"]) \
        else EXIT_FAILED


def _found(row: dict) -> list[str]:
    """A matrix row's regressions (sweep rows carry them; trace rows say their behaviour)."""
    if "regressions" in row:
        return row["regressions"] or []
    return {"sync": ["sync-on-register"], "deferred": ["stall"]}.get(row.get("behaviour"), [])


def cmd_vcpus(args) -> int:
    variants = vcpus.parse_variants(args.variants)
    ks = vcpus.check_vcpus(int_list(args.vcpus))
    cfg = vcpus.sweep_config(ks, int_list(args.ns), args.repeats, args.warmup, args.seed,
                             args.control_n)
    base = arguments.lab_options(args, variants[0])
    boots = len(kernel_lab.make_plan(cfg)) - cfg.warmup
    console.print(f"pyvmm lab vcpus: {', '.join(v.label for v in variants)}; vCPUs "
                  f"{','.join(map(str, ks))}, N {','.join(map(str, cfg.ns))}; {boots} boots "
                  f"each (seed {cfg.seed})", highlight=False)
    t0 = time.monotonic()
    with _progress(console) as prog:
        run = vcpus.run_vcpus(variants, ks, cfg, base, options.RichUi(prog))
    doc = run.doc
    console.print(vcpus.table(doc))
    for line in vcpus.notes(doc):
        console.print(line, highlight=False)
    for f in doc["failed"]:
        console.print(f"[red]variant {f['variant']} failed:[/] {f['error']}", highlight=False)
    console.print(f"vcpus wall time {time.monotonic() - t0:.1f} s; "
                  f"{os.path.join(run.out_dir, 'vcpus.json')}", highlight=False)
    return 0 if not doc["failed"] else 1


def cmd_run(args) -> int:
    from .experiments import inside, jobs
    for j in args.jobs:
        inside.parse_job(j)
    v = parse_variant(args.kernel, patch=args.kvm_patch)
    if v.arch.cross_prefix:
        raise LabError(f"pyvmm lab run: the jobs need a Python runtime of the lab's "
                       f"architecture, which the {v.arch.debian} lab does not have; it runs "
                       "the sweep (pyvmm lab kernel --arch arm64, lab matrix --arch arm64)")
    opts = options.LabOptions(variant=v, kvm_args=options.parse_kvm_args(args.kvm_arg),
                              smp=args.smp, out=args.out, total_timeout_s=args.timeout,
                              install=not args.no_install, cmdline=args.cmdline,
                              qemu=args.qemu, emulator=args.emulator, mttcg=args.mttcg)
    options.check_options(opts)
    con = console
    if args.json:
        con = err_console
    check_available([v], options.ConsoleUi(con))
    variant = opts.variant.label
    extra = " ".join(f"{m}:{p}" for m, p in opts.kvm_args.items())
    con.print(f"pyvmm lab run: {variant}{' ' + extra if extra else ''}, jobs "
              f"{' '.join(args.jobs)}, QEMU TCG -smp {args.smp}"
              f"{' multi-threaded' if args.mttcg else ''}", highlight=False)
    with _progress(con) as prog:
        run = jobs.run_jobs(opts, args.jobs, options.RichUi(prog))
    doc = run.doc
    from ..ptwrite.table import ptwrite_table
    for r in doc["results"]:
        if not r["ok"]:
            con.print(f"[red]job {r['job']} failed:[/] {r['error']}", highlight=False)
        elif r["job"].startswith("ptwrite") and r["data"]:
            d = r["data"]
            con.print(ptwrite_table(d, f"ptwrite in the lab: {doc['host']['kernel']} "
                                       f"{extra or ''}, {d['count']} writes per phase, median "
                                       f"of {d['repeats']} boots"))
        elif r["job"].startswith("gpwork") and r["data"]:
            from ..trace.gpwork import table as gpwork_table
            con.print(gpwork_table(r["data"], f"gpwork in the lab: {doc['host']['kernel']}, "
                                              f"{variant}"))
        elif r["job"].startswith("xen") and r["data"]:
            hangs = [x["hang_after_s"] for x in r["data"]["runs"] if x["hang"]]
            if hangs:
                from ..latency import median
                con.print(f"xen: deadlock in {len(hangs)} of {len(r['data']['runs'])} seeds, "
                          f"median {median(hangs):.3f} s after the start (min {min(hangs):.3f}"
                          f", max {max(hangs):.3f})", highlight=False)
            for x in r["data"]["runs"]:
                seed = x["config"]["seed"]
                if x["skipped"]:
                    con.print(f"xen seed {seed}: skipped: {x['skipped']}", highlight=False)
                elif x["hang"]:
                    con.print(f"xen seed {seed}: [bold red]DEADLOCK[/] after about "
                              f"{x['hang_after_s']:.2f} s ({x['sends']} sends, "
                              f"{x['invalidations']} invalidations, {x['filter_calls']} "
                              "filter calls before it)", highlight=False)
                    for st in x["hang"]["stuck"]:
                        k = st["kernel"]
                        con.print(f"  {st['thread']}: {st['operation']}; state "
                                  f"{k.get('state', '?')}, wchan {k.get('wchan')}",
                                  highlight=False)
                        con.print("    " + k.get("stack", "").replace("\n", "\n    "),
                                  highlight=False)
                else:
                    con.print(f"xen seed {seed}: no hang in {x['elapsed_s']:.1f} s "
                              f"({x['sends']} sends, {x['invalidations']} invalidations, "
                              f"{x['filter_calls']} filter calls)", highlight=False)
        else:
            con.print(f"job {r['job']}: ok in {r['wall_s']:.1f} s", highlight=False)
    lab, t = doc["lab"], run.timings
    con.print(f"initramfs {lab['initramfs_bytes'] / 2**20:.1f} MiB (Python runtime "
              f"{lab['runtime_bytes'] / 2**20:.1f} MiB, {lab['runtime_files']} files"
              f"{', cached' if lab['runtime_cached'] else ''}); QEMU start to /init "
              f"{t.get('to_init_s') or 0:.1f} s, to the first result "
              f"{t.get('to_first_result_s') or 0:.1f} s; total {t['total_s']:.1f} s; "
              f"{os.path.join(run.out_dir, 'results.json')}", highlight=False)
    if args.json:
        print(json.dumps(doc, indent=1))
    return 0 if doc["status"] == "complete" else 1


def cmd_hosts(args) -> int:
    if args.stop is not None:
        stopped = hosts_mod.stop(args.stop or None, options.ConsoleUi(console))
        say(console, f"{len(stopped)} lab host(s) stopped")
        return 0
    variants = parse_variants(args.variants)
    if args.mem < 1024:
        raise LabError(f"--mem {args.mem}: a lab host needs at least 1024 MB (its Python and "
                       "pyvmm's bundle live in RAM)")
    base = options.LabOptions(variant=variants[0], smp=args.smp, out=args.out,
                              install=not args.no_install, cmdline=args.cmdline,
                              total_timeout_s=args.timeout)
    t0 = time.monotonic()
    with _progress(console) as prog:
        doc, out = hosts_mod.start(variants, base, options.RichUi(prog), args.mem, args.timeout)
    for h in doc["hosts"]:
        say(console, f"{h['name']}: {h['variant']}, kernel {h['kernel']}, ssh root@127.0.0.1 "
            f"-p {h['port']}; kernel-check: {h['kernel_check']['summary']}")
    say(console, f"{len(doc['hosts'])} lab host(s) up in {time.monotonic() - t0:.1f} s; "
        f"inventory {doc['inventory']}")
    say(console, f"next: pyvmm fleet run -i {doc['inventory']} bench; then pyvmm lab hosts "
        "--stop")
    return 0


def cmd_qemu(args) -> int:
    from .sources import qemus
    qemus.check_spec(args.suite)
    launcher = qemus.fetch(args.suite, lambda m: err_console.print(m, highlight=False))
    err_console.print(qemus.version_of(launcher), highlight=False)
    print(launcher)
    return 0


def cmd_kernel_check(args) -> int:
    res = kcheck.check(args.module)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        console.print(f"{res['path']}: {res['summary']}", highlight=False)
        console.print(f"  {kcheck.FUNCTION} calls: {', '.join(res['calls']) or 'nothing'}",
                      highlight=False)
        if res.get("memslot_calls") is not None:
            console.print(f"  {kcheck.MEMSLOT_FUNCTION} calls: "
                          f"{', '.join(res['memslot_calls']) or 'nothing'}", highlight=False)
    return 0
