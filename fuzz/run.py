"""`make fuzz`: every input parser, fuzzed, with a count of cases and findings.

1. The C recipe and plan parser (the only recipe parser: the CLI, the sweep and the
   lab's plan mode all reach it) under libFuzzer with AddressSanitizer and UBSan,
   seeded with every preset recipe at several N and a sample plan (fuzz/fuzz_recipe.c
   states the contract it checks).
2. The standalone helper built with the same sanitizers and run as the lab runs it,
   on mutated recipes and plan files with --check: exit 0, or exit 2 with one line on
   stderr, and no sanitizer report.
3. The Python parsers (tests/fuzz_targets.py) under Hypothesis: run.json through the
   report and compare code (and through the CLI as a subprocess), .ko files through the
   ELF/.modinfo reader, Debian metadata, and the kit finder.

Prints a table of targets, cases and findings; exits 1 if anything was found.
Usage: python fuzz/run.py [--c-runs N] [--cli-cases N] [--py-cases N] [--seed S]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
SAN = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-g", "-O1"]
SAN_MARKERS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer",
               "SUMMARY: UndefinedBehaviorSanitizer")
TOKENS = ["vm", "mem", "ioev:", "eexist:", "deassign:", "vcpu:", "run", "run:probe",
          "run:rung", "run:halt", "memslot", "memslot:", "teardown", "gic", "gic:", ",", ":",
          "N", "0",
          "4094", "4095", "999999999", "1000000000", "64", "65", "16", "17", " ", "\t", "#"]


def seeds() -> list[str]:
    from pyvmm import recipe
    out = []
    for tmpl in recipe.PRESETS.values():
        for n in (0, 1, 10, 4094):
            out.append(recipe.expand(tmpl, n))
    out += ["vm,mem,vcpu:1,run,memslot:3,run,teardown", "vm,mem,ioev:2,deassign:2,vcpu:64,run",
            "vm,mem,ioev:3,vcpu:16,gic,run:rung,memslot,run"]
    plan = "\n".join(f"{i}/r/{n} {t}" for i, (n, t) in enumerate(zip(range(99), out)))
    return out + [plan + "\n# comment\n\n"]


def mutate(rng: random.Random, text: str) -> str:
    s = list(text)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        pos = rng.randint(0, len(s))
        if op == 0 and s:
            del s[rng.randrange(len(s))]
        elif op == 1:
            s[pos:pos] = list(rng.choice(TOKENS))
        elif op == 2 and s:
            s[rng.randrange(len(s))] = chr(rng.randrange(1, 256))
        elif op == 3:
            s[pos:pos] = list(str(rng.choice([0, 1, 4094, 4095, 2**31, 10**12, -1])))
        elif op == 4 and s:
            del s[pos:]
        else:
            s[pos:pos] = list(rng.choice(TOKENS)) * rng.randint(1, 30)
    return "".join(s)


def build(tmp: str) -> tuple[str | None, str | None, str]:
    """(libFuzzer binary or None, sanitized helper or None, why not)."""
    csrc, guests = os.path.join(ROOT, "csrc"), os.path.join(ROOT, "guests")
    fuzzer = helper = None
    why = []
    if shutil.which("clang"):
        fuzzer = os.path.join(tmp, "fuzz_recipe")
        p = subprocess.run(["clang", "-fsanitize=fuzzer,address,undefined",
                            "-fno-sanitize-recover=undefined", "-g", "-O1", "-I", csrc,
                            "-I", guests, os.path.join(ROOT, "fuzz", "fuzz_recipe.c"),
                            os.path.join(csrc, "bootbench.c"), "-o", fuzzer],
                           capture_output=True, text=True)
        if p.returncode != 0:
            fuzzer = None
            why.append("clang could not build the libFuzzer target (apt-get install clang "
                       f"libclang-rt-14-dev): {p.stderr.strip().splitlines()[-1:]}")
    else:
        why.append("clang not installed (apt-get install clang libclang-rt-14-dev)")
    from pyvmm.vmm import guests as g
    blob_src = os.path.join(csrc, "guest_blob.S")
    helper = os.path.join(tmp, "pyvmm-bootbench-san")
    doorbell = g.image_path("doorbell")
    p = subprocess.run(["gcc", *SAN, f'-DDOORBELL_BIN="{doorbell}"', "-I", csrc, "-I", guests,
                        os.path.join(csrc, "main.c"), os.path.join(csrc, "bootbench.c"),
                        blob_src, "-o", helper], capture_output=True, text=True)
    if p.returncode != 0:
        helper = None
        why.append(f"gcc could not build the sanitized helper: {p.stderr.strip()[-300:]}")
    return fuzzer, helper, "; ".join(why)


def run_libfuzzer(fuzzer: str, runs: int, seed: int, tmp: str) -> tuple[int, int, str]:
    corpus = os.path.join(tmp, "corpus")
    os.makedirs(corpus, exist_ok=True)
    for i, s in enumerate(seeds()):
        with open(os.path.join(corpus, f"seed{i}"), "w") as f:
            f.write(s)
    dic = os.path.join(tmp, "recipe.dict")
    with open(dic, "w") as f:
        for t in TOKENS:
            f.write('"' + t.replace("\\", "\\\\").replace('"', '\\"').replace("\t", "\\x09")
                    + '"\n')
    p = subprocess.run([fuzzer, f"-runs={runs}", f"-seed={seed}", "-max_len=1200",
                        f"-dict={dic}", f"-artifact_prefix={tmp}/", corpus],
                       capture_output=True, text=True)
    m = re.findall(r"Done (\d+) runs", p.stderr)
    done = int(m[-1]) if m else 0
    findings = 0 if p.returncode == 0 else 1
    detail = "" if not findings else p.stderr.strip().splitlines()[-5:]
    return done, findings, str(detail)


def run_helper(helper: str, cases: int, seed: int, tmp: str) -> tuple[int, list[str]]:
    rng = random.Random(seed)
    base = seeds()
    found = []
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:exitcode=99",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=98")
    plan = os.path.join(tmp, "plan.txt")
    for i in range(cases):
        text = mutate(rng, rng.choice(base))
        if i % 2:
            with open(plan, "w", encoding="latin-1") as f:
                f.write(text)
            argv = [helper, "--check", "--plan", plan]
        else:
            argv = [helper, "--check", "--recipe", text.replace("\0", "")]
        p = subprocess.run(argv, capture_output=True, env=env)
        err = p.stderr.decode(errors="replace")
        lines = err.strip().splitlines()
        bad = (p.returncode not in (0, 2) or any(m in err for m in SAN_MARKERS)
               or (p.returncode == 2 and len(lines) != 1)
               or (p.returncode == 0 and err.strip()))
        if bad:
            found.append(f"case {i} ({argv[2]}, exit {p.returncode}): {text[:80]!r}: "
                         f"{' | '.join(lines[-3:])}")
    return cases, found


def run_python(cases: int, cli_cases: int, seed: int) -> list[tuple[str, int, list[str]]]:
    import fuzz_targets as ft
    from hypothesis import HealthCheck, given, settings, strategies as st
    common = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck),
                  derandomize=False)
    targets = [
        ("run.json", cases, given(ft.run_json_mutants())(ft.check_run_json)),
        ("run.json via the CLI", cli_cases,
         given(ft.run_json_mutants())(ft.check_run_json_cli)),
        (".ko ELF/.modinfo", cases, given(ft.ko_mutants())(ft.check_ko)),
        ("Debian metadata", cases,
         given(ft.apt_text(), st.sampled_from(["6.1", "6.12", "7.3", "latest", "5"]),
               st.text(max_size=12))(ft.check_deb_metadata)),
        ("kit finder", cases, given(ft.package_trees())(ft.check_kit_tree)),
        ("tracefs text", cases, given(ft.trace_texts(), st.integers(1, 3),
                                      st.integers(1, 3))(ft.check_trace_text)),
        ("start-up trace", cases, given(ft.startup_texts())(ft.check_startup_text)),
    ]
    out = []
    for name, n, fn in targets:
        before = ft.COUNTS.get(name, 0)
        findings = []
        try:
            settings(max_examples=n, **common)(fn)()
        except Exception as e:       # Hypothesis re-raises the (shrunk) failure
            findings.append(f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
        out.append((name, ft.COUNTS.get(name, 0) - before, findings))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--c-runs", type=int, default=20000)
    ap.add_argument("--helper-cases", type=int, default=400)
    ap.add_argument("--py-cases", type=int, default=1000)
    ap.add_argument("--cli-cases", type=int, default=60)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rows = []
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pyvmm-fuzz-") as tmp:
        fuzzer, helper, why = build(tmp)
        if fuzzer:
            done, n, detail = run_libfuzzer(fuzzer, args.c_runs, args.seed, tmp)
            rows.append(("C recipe/plan parser (libFuzzer, ASan+UBSan)", done,
                         [detail] if n else []))
        else:
            rows.append(("C recipe/plan parser (libFuzzer, ASan+UBSan)", 0,
                         [f"not run: {why}"]))
        if helper:
            n, found = run_helper(helper, args.helper_cases, args.seed, tmp)
            rows.append(("pyvmm-bootbench --check (ASan+UBSan)", n, found))
        rows += run_python(args.py_cases, args.cli_cases, args.seed)
    width = max(len(r[0]) for r in rows)
    print(f"{'target':<{width}}  {'cases':>7}  findings")
    total_cases = total_find = 0
    for name, n, found in rows:
        print(f"{name:<{width}}  {n:>7}  {len(found)}")
        for f in found[:5]:
            print(f"    {f}")
        total_cases += n
        total_find += len(found)
    print(f"fuzz: {total_cases} cases, {total_find} findings in {time.monotonic() - t0:.0f} s")
    return 1 if total_find else 0


if __name__ == "__main__":
    sys.exit(main())
