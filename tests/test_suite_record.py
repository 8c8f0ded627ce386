"""benchmarks/suite_record.py reads pytest's summary into the cross-machine record."""

from __future__ import annotations

import json
import sys

import pytest

from benchmarks.suite_record import append, cpu_description, folder_mib, parse_summary, record_run

OUTPUT = """\
........................F.........s..................................... [ 22%]
........F...........F................................................... [ 44%]
=========================== short test summary info ============================
FAILED tests/test_cache_format.py::test_extracting_again - AssertionError: clip audio
FAILED tests/test_run_folder.py::test_evaluate[one] - assert 0.46 == 0.43
ERROR tests/test_ray.py::test_cluster - RuntimeError: no ray
= 2 failed, 322 passed, 1 skipped, 1 error, 3 warnings in 301.52s (0:05:01) =
"""


def test_the_summary_line_gives_each_count_and_the_failed_tests():
    found = parse_summary(OUTPUT)
    assert {k: found[k] for k in ("passed", "failed", "skipped", "errors", "xfailed", "xpassed")} == {
        "passed": 322, "failed": 2, "skipped": 1, "errors": 1, "xfailed": 0, "xpassed": 0}
    assert found["failed_tests"] == ["tests/test_cache_format.py::test_extracting_again",
                                     "tests/test_run_folder.py::test_evaluate[one]", "tests/test_ray.py::test_cluster"]
    assert found["summary_line"].startswith("2 failed, 322 passed")
    quiet = parse_summary("....\n325 passed in 290.00s (0:04:50)\n")  # -q without the = frame, in any order
    assert (quiet["passed"], quiet["failed"], quiet["failed_tests"]) == (325, 0, [])


def test_output_without_a_summary_is_refused():
    with pytest.raises(ValueError, match="no pytest summary line"):
        parse_summary("ImportError while loading conftest '/x/tests/conftest.py'.\n4 passed earlier\n")


def test_runs_are_appended_to_the_record(tmp_path):
    record = tmp_path / "suite_runs.json"
    append({"commit": "a"}, record)
    append({"commit": "b", "cpu": cpu_description()}, record)
    runs = json.loads(record.read_text())
    assert [r["commit"] for r in runs] == ["a", "b"] and {"vendor", "family", "model", "name"} <= set(runs[1]["cpu"])


def test_a_run_is_timed_parsed_and_recorded(tmp_path, capsys):
    record = tmp_path / "suite_runs.json"
    fake = [sys.executable, "-c", "print('FAILED tests/a.py::b - x'); print('1 failed, 4 passed in 0.10s'); exit(1)"]
    assert record_run(fake, "fake", record) == 1
    assert "1 failed, 4 passed" in capsys.readouterr().out  # passed through
    (run,) = json.loads(record.read_text())
    assert (run["passed"], run["failed"], run["failed_tests"], run["exit_code"]) == (4, 1, ["tests/a.py::b"], 1)
    assert run["wall_seconds"] >= 0 and run["commit"] and run["cpu"]["family"]
    assert record_run([sys.executable, "-c", "print('collection error')"], "fake", record) == 1  # nothing to record
    assert len(json.loads(record.read_text())) == 1


def test_folder_size_counts_files_once(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a").write_bytes(b"x" * 3 * 2**20)
    (tmp_path / "b").write_bytes(b"x" * 2**20)
    (tmp_path / "link").symlink_to(tmp_path / "b")  # a venv's links point at files already counted
    assert folder_mib(tmp_path) == 4 and folder_mib(tmp_path / "missing") is None
