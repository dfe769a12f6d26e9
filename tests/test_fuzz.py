"""The parser fuzz targets (tests/fuzz_targets.py), briefly: a few dozen Hypothesis cases
each inside `make test`. `make fuzz` runs the same targets for thousands of cases, and
the C recipe parser under libFuzzer with ASan and UBSan."""

import os

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import fuzz_targets as ft

EXAMPLES = int(os.environ.get("PYVMM_FUZZ_EXAMPLES", "40"))
FAST = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


@FAST
@given(ft.run_json_mutants())
def test_run_json_is_refused_in_one_line_or_reported(data):
    ft.check_run_json(data)


@FAST
@given(ft.ko_mutants())
def test_module_reader_refuses_damaged_ko_files_cleanly(data):
    ft.check_ko(data)


@FAST
@given(ft.apt_text(), st.sampled_from(["6.1", "6.12", "7.3", "latest", "5"]),
       st.sampled_from(["6.1.192-2", "7.3.4-1~bpo13+1", "", "1:0"]))
def test_debian_metadata_parsers_never_crash(text, series, version):
    ft.check_deb_metadata(text, series, version)


@FAST
@given(ft.package_trees())
def test_kit_finder_takes_a_kernel_or_says_what_is_missing(files):
    ft.check_kit_tree(files)


@FAST
@given(ft.trace_texts(), st.integers(1, 3), st.integers(1, 3))
def test_trace_parser_takes_any_tracefs_text(text, nphases, boots):
    ft.check_trace_text(text, nphases, boots)


@FAST
@given(ft.startup_texts())
def test_the_start_up_model_takes_any_trace(text):
    ft.check_startup_text(text)


def test_the_unmutated_run_json_is_accepted_and_reported():
    with open(ft.RUN_JSON, "rb") as f:
        ft.check_run_json(f.read())


@pytest.mark.parametrize("data,message", [
    (b"", "is not valid JSON"),
    (b"[1, 2]", "holds a JSON list"),
    (b'{"schema": "pyvmm.run/1"}', "is not a valid run.json: 'status' is a required "
                                   "property"),
    (b'{"x": NaN}', "NaN is not a JSON number"),
    (b"\xff\xfe", "is not UTF-8 text"),
])
def test_load_run_names_what_is_wrong(tmp_path, data, message):
    from pyvmm.analysis.plan import load_run
    from pyvmm.errors import PyvmmError
    (tmp_path / "run.json").write_bytes(data)
    with pytest.raises(PyvmmError, match=message):
        load_run(str(tmp_path))
