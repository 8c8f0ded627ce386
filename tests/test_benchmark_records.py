"""What the benchmarks' results files rest on: the real-time ratio's duration and the run's record.

Deliberate breaks, each seen to fail: `covered_seconds` returning the clip's whole length fails the rg
case (6.0 != 5.12); summing the windows instead of their union fails the fs1000 case (20.0 != 11.0);
`run_record` without the date fails the record test.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from benchmarks.bench_extract import covered_seconds, run_record
from extractors.config import ExtractionConfig
from extractors.decode import plan_segments


def test_real_time_is_over_the_seconds_the_kept_segments_cover() -> None:
    # 6 s at 25 fps: four 32-frame segments, the last 22 frames dropped
    plan = plan_segments(150, 25.0, ExtractionConfig())
    assert plan.num_segments == 4
    assert covered_seconds(plan) == pytest.approx(4 * 32 / 25)


def test_overlapping_windows_count_once() -> None:
    # 12 s at 25 fps, 5 s windows every 2 s: [0, 5), [2, 7), [4, 9), [6, 11) cover 0-11 s
    plan = plan_segments(300, 25.0, ExtractionConfig(protocol="fs1000"))
    assert plan.num_segments == 4
    assert covered_seconds(plan) == pytest.approx(11.0)


def test_a_video_too_short_for_a_segment_covers_nothing() -> None:
    assert covered_seconds(plan_segments(20, 25.0, ExtractionConfig())) == 0.0


def test_every_results_file_gets_commit_cpu_family_and_date() -> None:
    record = run_record()
    assert re.fullmatch(r"[0-9a-f]{7,}(\+uncommitted changes)?|unknown", record["commit"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", record["date"])
    assert "family" in record["cpu"] or record["cpu"].endswith(" CPU")  # no /proc/cpuinfo: the architecture


def _blocks(signal: str, seed: int = 0) -> tuple[dict, dict]:
    """Three modality blocks of 8 features for train/val/test; only `signal` carries the score,
    linearly, and a third of the clips lack audio."""
    rng = np.random.default_rng(seed)
    blocks, scores = {}, {}
    for split, count in (("train", 120), ("val", 40), ("test", 40)):
        y = rng.uniform(0, 10, count)
        blocks[split] = {}
        for modality in ("rgb", "flow", "audio"):
            values = rng.standard_normal((count, 8))
            if modality == signal:
                values[:, 0] += y
            has = np.arange(count) % 3 != 0 if modality == "audio" else np.ones(count, bool)
            blocks[split][modality] = (np.where(has[:, None], values, 0.0), has)
        scores[split] = y
    return blocks, scores


def test_ridge_yardstick_finds_a_linear_signal_only_where_it_is() -> None:
    # Breaks seen to fail: ridge_rho using every block whatever `modalities` says (the signal-free
    # setting then reaches 0.91), and fitting against shuffled training scores (0.92 -> 0.76).
    from benchmarks.ridge_demo import ridge_rho

    blocks, scores = _blocks("flow")
    assert ridge_rho(blocks, scores, ["flow"])[0] > 0.85
    assert ridge_rho(blocks, scores, ["rgb", "flow", "audio"])[0] > 0.85
    assert abs(ridge_rho(blocks, scores, ["rgb", "audio"])[0]) < 0.4
