"""Fuzz targets for every parser that reads what a user or another machine hands pyvmm,
driven by Hypothesis: tests/test_fuzz.py runs each briefly inside `make test`, and
`make fuzz` (fuzz/run.py) runs each for thousands of cases and counts them.

Each target states its contract: the input is either accepted or refused with the
parser's own error (one line); any other exception is a finding.
  - run.json: load_run (schema), then the report (tables, verdict, CSV) and compare;
  - .ko files: the ELF section reader, .modinfo and dependencies, the static-binary test;
  - Debian metadata: apt-cache records, the kernel picker, split-package parts,
    headers dependencies, the compiler line;
  - kit finder: an unpacked kernel package tree -> kernel, config and modules in load
    order;
  - tracefs text: the per-syscall tracer's parser, splitter and profiler.
The C recipe and plan parser is fuzzed by libFuzzer (fuzz/fuzz_recipe.c).
"""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import subprocess
import tempfile

from hypothesis import strategies as st

from pyvmm.errors import LabError, PyvmmError

HERE = os.path.dirname(os.path.abspath(__file__))
RUN_JSON = os.path.join(HERE, "data", "lab-6.1-defer-free-run.json")
COUNTS: dict[str, int] = {}


def _count(name: str) -> None:
    COUNTS[name] = COUNTS.get(name, 0) + 1


def one_line(e: BaseException) -> None:
    msg = str(e)
    assert msg and "\n" not in msg.strip() and "Traceback" not in msg, repr(msg)


# --- run.json -----------------------------------------------------------------------------

with open(RUN_JSON) as f:
    BASE_DOC = json.load(f)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64) |
    st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                              max_size=4),
    max_leaves=8)


def _paths(doc, prefix=()):
    """Every path into a JSON document (samples thinned, so mutations spread out)."""
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        idx = range(len(doc)) if len(doc) <= 8 else (0, 1, len(doc) // 2, len(doc) - 1)
        for i in idx:
            yield from _paths(doc[i], prefix + (i,))


PATHS = list(_paths(BASE_DOC))


@st.composite
def run_json_mutants(draw) -> bytes:
    doc = copy.deepcopy(BASE_DOC)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS))
        if not path:
            continue
        parent = doc
        try:
            for p in path[:-1]:
                parent = parent[p]
            key = path[-1]
            parent[key]
        except (KeyError, IndexError, TypeError):
            continue
        action = draw(st.sampled_from(["replace", "delete", "replace", "number", "driver"]))
        if action == "driver":
            # Some boots from the Python VMM: the report then shows the Python-vs-C table.
            for smp in doc.get("samples", [])[:draw(st.integers(0, 30))]:
                if isinstance(smp, dict):
                    smp["driver"] = "py"
        elif action == "delete":
            del parent[key]
        elif action == "number":
            parent[key] = draw(st.sampled_from([0, -1, 1, 2**70, 0.5, -1e300, 1e300]))
        else:
            parent[key] = draw(json_values)
    text = json.dumps(doc).encode()
    how = draw(st.sampled_from(["whole", "whole", "truncate", "flip", "nan"]))
    if how == "truncate":
        text = text[:draw(st.integers(0, len(text)))]
    elif how == "flip":
        pos = draw(st.integers(0, len(text) - 1))
        text = text[:pos] + bytes([draw(st.integers(0, 255))]) + text[pos + 1:]
    elif how == "nan":
        text = text.replace(b'"wall_ns": 1', b'"wall_ns": NaN', 1)
    return text


def check_run_json(data: bytes) -> None:
    """load_run refuses the file with one line, or report and compare handle it."""
    from rich.console import Console

    from pyvmm.analysis import report
    from pyvmm.analysis.plan import load_run
    from pyvmm.bench import cli as bench_cli
    from pyvmm.bench.compare import behaviour_rows, compare_docs
    _count("run.json")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "run.json")
        with open(path, "wb") as f:
            f.write(data)
        try:
            doc = load_run(path)
        except PyvmmError as e:
            one_line(e)
            return
        con = Console(file=io.StringIO(), width=120)
        if any(s.get("driver") == "py" for s in doc["samples"]):
            saved, bench_cli.console = bench_cli.console, con
            try:
                bench_cli.python_vs_c_table(doc)
            finally:
                bench_cli.console = saved
        a = report.render(con, doc)
        report.write_csv(doc, a, os.path.join(tmp, "summary.csv"))
        compare_docs(BASE_DOC, doc)
        compare_docs(doc, doc)
        behaviour_rows(doc)


def run_cli(argv: list[str], cwd: str) -> subprocess.CompletedProcess:
    import sys
    return subprocess.run([sys.executable, "-m", "pyvmm", *argv], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


def check_run_json_cli(data: bytes) -> None:
    """`pyvmm report` and `pyvmm compare` on the file: exit 0, or exit 2 with one line,
    never a traceback (a subprocess each: slow, so fewer cases)."""
    _count("run.json via the CLI")
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "a"))
        with open(os.path.join(tmp, "a", "run.json"), "wb") as f:
            f.write(data)
        shutil.copy(RUN_JSON, os.path.join(tmp, "base.json"))
        for argv in (["report", "a"], ["compare", "base.json", "a/run.json"]):
            r = run_cli(argv, tmp)
            assert "Traceback" not in r.stderr, r.stderr[-2000:]
            assert r.returncode in (0, 2), (argv, r.returncode, r.stderr[-500:])
            if r.returncode == 2:
                assert len(r.stderr.strip().splitlines()) == 1, r.stderr


# --- ELF / .modinfo -----------------------------------------------------------------------

_KO: bytes | None = None


def sample_ko() -> bytes | None:
    """A small relocatable object with a .modinfo section, built with gcc (None
    without gcc)."""
    global _KO
    if _KO is None and shutil.which("gcc"):
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "m.c")
            with open(src, "w") as f:
                f.write('const char mi[] __attribute__((section(".modinfo"))) = '
                        '"license=GPL\\0depends=kvm,ccp\\0vermagic=6.1.0-56-amd64 SMP\\0'
                        'name=kvm_amd";\nint f(void) { return 1; }\n')
            subprocess.run(["gcc", "-O2", "-c", src, "-o", os.path.join(tmp, "m.o")],
                           check=True)
            with open(os.path.join(tmp, "m.o"), "rb") as f:
                _KO = f.read()
    return _KO


@st.composite
def ko_mutants(draw) -> bytes:
    data = bytearray(sample_ko() or b"\x7fELF\x02\x01" + bytes(58))
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["byte", "u16", "truncate", "splice"]))
        if kind == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif not data:
            break
        elif kind == "byte":
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif kind == "u16":
            # The header fields the reader trusts: offsets and counts.
            pos = draw(st.sampled_from([0x20, 0x28, 0x36, 0x38, 0x3A, 0x3C, 0x3E]))
            if pos + 2 <= len(data):
                data[pos:pos + 2] = draw(st.integers(0, 0xFFFF)).to_bytes(2, "little")
        else:
            pos = draw(st.integers(0, len(data)))
            data[pos:pos] = draw(st.binary(max_size=16))
    return bytes(data)


def check_ko(data: bytes) -> None:
    from pyvmm.lab.sources import elf
    _count(".ko ELF/.modinfo")
    for fn in (elf.modinfo, elf.module_depends, elf.elf_is_dynamic):
        try:
            fn(data)
        except LabError as e:
            one_line(e)


# --- Debian metadata ------------------------------------------------------------------------

RECORD_LINES = [
    "Package: linux-image-amd64", "Version: 6.1.192-2", "Version: 7.3.4-1~bpo13+1",
    "Version: 1:2.0~rc1-3", "Version: ", "Version: 6.1", "Version: 6..1-1",
    "Depends: linux-image-6.1.0-56-amd64 (= 6.1.192-2)",
    "Depends: linux-base-amd64 (= 7.3.4-1~bpo13+1), linux-image-7.3.4+deb13-amd64 "
    "(= 7.3.4-1~bpo13+1)",
    "Depends: dracut | initramfs-tools (>= 0.120), linux-binary-7.3.4+deb13-amd64 "
    "(= 7.3.4-1~bpo13+1), linux-modules-7.3.4+deb13-amd64 (= 7.3.4-1~bpo13+1)",
    "Description: Linux", " continued line", "\tcontinued", "", "", "no colon here",
    ": empty key", "Depends: linux-image-", "Depends: (= 1)",
]


@st.composite
def apt_text(draw) -> str:
    lines = draw(st.lists(st.sampled_from(RECORD_LINES) | st.text(max_size=40), max_size=20))
    return "\n".join(lines)


def check_deb_metadata(text: str, series: str, version: str) -> None:
    from pyvmm.lab.builds import modules as modbuild
    from pyvmm.lab.sources import debian
    _count("Debian metadata")
    recs = debian.parse_records(text)
    assert all(isinstance(r, dict) for r in recs)
    for r in recs:
        debian.split_parts(r.get("Depends", ""), version)
        modbuild.header_packages(r.get("Depends", ""))
    try:
        pkg = debian.pick_kernel(recs, series)
        assert pkg.name.startswith("linux-image-")
    except LabError as e:
        one_line(e)
    modbuild.kernel_cc(text)
    for a in (version, series):
        try:
            debian.compare_versions(version, a)
        except LabError as e:
            one_line(e)


# --- kit finder -----------------------------------------------------------------------------

@st.composite
def package_trees(draw) -> dict[str, bytes | str]:
    """An unpacked kernel package: path -> contents (bytes) or symlink target (str)."""
    release = draw(st.sampled_from(["6.1.0-56-amd64", "7.3.4+deb13-amd64", "x", ""]))
    layout = draw(st.sampled_from(["classic", "split", "none"]))
    files: dict[str, bytes | str] = {}
    if layout == "classic":
        files[f"boot/vmlinuz-{release}"] = b"kernel"
        if draw(st.booleans()):
            files[f"boot/config-{release}"] = draw(st.sampled_from(
                [b"CONFIG_HZ=250\nCONFIG_PREEMPT_VOLUNTARY=y\n", b"CONFIG_HZ=\n", b"\xff\xfe",
                 b"CONFIG_HZ=abc\n", b""]))
        mods = f"lib/modules/{release}/kernel"
    elif layout == "split":
        files[f"usr/lib/modules/{release}/vmlinuz"] = b"kernel"
        if draw(st.booleans()):
            files[f"usr/lib/modules/{release}/config"] = b"CONFIG_HZ=1000\n"
        mods = f"usr/lib/modules/{release}/kernel"
    else:
        mods = "lib/modules/x"
    ko = sample_ko() or b""
    names = draw(st.lists(st.sampled_from(["kvm", "kvm-amd", "kvm_amd", "ccp", "irqbypass",
                                           "other"]), max_size=5, unique=True))
    for n in names:
        ext = draw(st.sampled_from([".ko", ".ko.xz", ".ko.gz", ".ko"]))
        body = draw(st.sampled_from([ko, ko[:100], b"", b"\x7fELF"]))
        if ext == ".ko.xz" and draw(st.booleans()):
            import lzma
            body = lzma.compress(body)
        elif ext == ".ko.gz" and draw(st.booleans()):
            import gzip
            body = gzip.compress(body)
        files[f"{mods}/{n}{ext}"] = body
    return files


def check_kit_tree(files: dict) -> None:
    from pyvmm.lab.arch import X86_64
    from pyvmm.lab.sources import kits
    _count("kit finder")
    with tempfile.TemporaryDirectory() as tmp:
        x = os.path.join(tmp, "x")
        out = os.path.join(tmp, "out")
        os.makedirs(x)
        os.makedirs(out)
        for path, body in files.items():
            full = os.path.join(x, path)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "wb") as f:
                f.write(body)
        try:
            meta = kits._assemble_kit(x, out, "linux-image-test", "1.0-1")
        except LabError as e:
            one_line(e)
            return
        assert meta["kvm_module_file"] in meta["modules"]
        assert meta["module_names"][-1] == X86_64.kvm_vendor_module


# --- tracefs text (pyvmm bench --python-vs-c --per-ioctl) ---------------------------------

TRACE_TID = 4242
_trace_words = st.sampled_from([
    "sys_enter: NR 16 (3, ae01, 0, 0, 0, 0)", "sys_exit: NR 16 = 5", "sys_exit: NR 16 = -4",
    "sys_enter: NR 228 (3, 7ffe0000, 0, 0, 0, 0)", "sys_exit: NR 228 = 0",
    "sys_enter: NR 3 (5)", "sys_exit: NR 3 = 0", "sys_enter: NR 99999 ()",
    "page_fault_user: address=0x1000 ip=0x2 error_code=0x6",
    "tracing_mark_write: pyvmm-cal0 1000", "tracing_mark_write: pyvmm-cal1 51000000",
    "sys_enter: NR 16 (zz)", "sys_exit: NR = ", "sched_switch: prev_comm=x"])


@st.composite
def trace_texts(draw) -> str:
    """tracefs text as the kernel prints it, with some lines damaged or out of order."""
    lines, ts = [], 1000.0
    for _ in range(draw(st.integers(0, 40))):
        ts += draw(st.floats(0, 50, allow_nan=False))
        tid = draw(st.sampled_from([TRACE_TID, TRACE_TID, TRACE_TID, 7]))
        stamp = f"{ts:.6f}" if draw(st.booleans()) else str(int(ts * 1000))
        line = f"  python-{tid}   [001] ..... {stamp}: {draw(_trace_words)}"
        if draw(st.integers(0, 9)) == 0:
            line = draw(st.text(max_size=60))
        lines.append(line)
    return "\n".join(lines)


def check_trace_text(text: str, nphases: int, boots: int) -> None:
    """Parsing never fails; splitting and profiling either succeed with consistent
    numbers or refuse with one line."""
    from pyvmm.bench import syscalls
    _count("tracefs text")
    calls, marks = syscalls.parse_trace(text, TRACE_TID)
    assert len(calls) <= text.count("sys_exit")
    assert all(isinstance(c.nr, int) and all(isinstance(a, int) for a in c.args)
               for c in calls)
    try:
        prof = syscalls.profile(calls, [f"p{i}" for i in range(nphases)], boots)
    except PyvmmError as e:
        one_line(e)
        return
    assert len(prof) == nphases
    for p in prof:
        assert p["boots"] == boots and p["usual"] >= 1


# --- a start-up's trace (pyvmm trace) ---------------------------------------------------------

_STARTUP_EVENTS = st.sampled_from([
    ("sched_process_exec", "filename=/usr/bin/vmm pid=4242 old_pid=4242"),
    ("sys_enter", "NR 16 (3, ae01, 0, 0, 0, 0)"), ("sys_exit", "NR 16 = 4"),
    ("sys_enter", "NR 16 (4, ae41, 0, 0, 0, 0)"), ("sys_exit", "NR 16 = 5"),
    ("sys_enter", "NR 16 (4, 4040ae79, 1000, 0, 0, 0)"), ("sys_exit", "NR 16 = 0"),
    ("sys_exit", "NR 16 = -17"), ("sys_enter", "NR 3 (5)"), ("sys_exit", "NR 3 = 0"),
    ("kvm_ioctl", "(0x7f00) fd=4 cmd=0x4040ae79 arg=0x1000 w0=0x0 w1=0xd0000000 "
                  "w2=0x800000004 w3=0x4"),
    ("kvm_ioctl", "(0x7f00) fd=4 cmd=0x4020ae46 arg=0x1000 w0=0x1 w1=0x0 w2=0x0 w3=0x0"),
    ("kvm_ioctl", "(0x7f00) fd=zz cmd=0x"),
    ("kvm_ioctl_done", "(0x7f72) fd=4 cmd=0x4040ae79 arg=0x1000 w0=0x0 w1=0xd0000000 "
                       "w2=0x800000004 w3=0x5"),
    ("kvm_ioctl_done", "(0x7f72) fd=4 cmd=0x4020ae46 arg=0x1000"),
    ("timer_start", "timer=00000000aa function=delayed_work_timer_fn expires=1001 "
                    "[timeout=1] bucket_expiry=1002 cpu=1 idx=3 flags=I"),
    ("timer_start", "timer=00000000aa function=delayed_work_timer_fn expires=x [timeout=1]"),
    ("timer_expire_entry", "timer=00000000aa function=delayed_work_timer_fn now=1002 "
                           "baseclk=1002"),
    ("workqueue_execute_start", "work struct 00000000cc: function process_srcu"),
    ("sched_switch", "prev_comm=vmm prev_pid=4242 prev_prio=120 prev_state=R+ ==> "
                     "next_comm=kworker/0:1 next_pid=11 next_prio=120"),
    ("sched_switch", "prev_comm=vmm prev_pid=4242 prev_prio=120 prev_state=D ==> "
                     "next_comm=swapper/1 next_pid=0 next_prio=120"),
    ("sched_switch", "prev_comm=x prev_pid=0 prev_prio=120 prev_state=R ==> "
                     "next_comm=vmm next_pid=4242 next_prio=120"),
    ("sched_wakeup", "comm=vmm pid=4242 prio=120 target_cpu=001"),
    ("kvm_userspace_exit", "reason KVM_EXIT_IO (2)"),
    ("kvm_pio", "pio_write at 0x80 size 1 count 1 val 0x1"),
    ("sched_process_exit", "comm=vmm pid=4242 prio=120 group_dead=true"),
    ("tracing_mark_write", "pyvmm-cal0 1000"), ("<stack trace>", ""),
    ("sched_switch", "prev_pid="), ("sys_enter", "NR 16 ()")])
_FRAMES = st.sampled_from(["__schedule", "wait_for_completion", "__synchronize_srcu",
                           "kvm_io_bus_unregister_dev", "kvm_vm_ioctl", "mutex_lock",
                           "handle_mm_fault", "x+0x10/0x20"])


@st.composite
def startup_texts(draw) -> str:
    """A traced start-up as tracefs prints it (record-tgid), damaged at places."""
    lines, ts = [], 1000.0
    for _ in range(draw(st.integers(0, 60))):
        ts += draw(st.floats(0, 0.01, allow_nan=False))
        name, body = draw(_STARTUP_EVENTS)
        tid = draw(st.sampled_from([4242, 4242, 4243, 11]))
        line = f"  vmm-{tid}  ( 4242) [001] d..2. {ts:.6f}: {name}: {body}"
        if name == "<stack trace>":
            line = f"  vmm-{tid}  ( 4242) [001] d..2. {ts:.6f}: <stack trace>"
            lines.append(line)
            lines += [f" => {draw(_FRAMES)}" for _ in range(draw(st.integers(0, 6)))]
            continue
        if draw(st.integers(0, 9)) == 0:
            line = draw(st.text(max_size=60))
        lines.append(line)
    return "\n".join(lines)


def check_startup_text(text: str) -> None:
    """The start-up model and its summary take any trace: no exception, durations never
    negative, the verdict one of four."""
    from pyvmm import tracefs
    from pyvmm.trace import attribute, model
    _count("start-up trace")
    s = model.build(tracefs.parse_events(text), 1e9, None, port=0x80)
    for c in s.ioctls:
        assert c.ns >= 0 and all(sl.ns >= 0 for sl in c.sleeps)
    summ = attribute.summary(s, 250, tracefs.parse_events(text))
    assert summ["behaviour"] in ("sync", "deferred", "none", "unknown")
    for w in summ["waits"]:
        if w.get("why"):
            assert w["why"]["fired_after_jiffies"] > 0 and attribute.why_text(w)
    assert summ["startup_ms"] >= 0 and summ["srcu_wait_ms"] >= 0
    cost = summ["cost"]
    assert (cost is not None) == (summ["behaviour"] in ("sync", "deferred"))
    if cost:
        assert 0 <= cost["longest_ms"] <= cost["wait_ms"] + 1e-9 and cost["waits"] >= 1
