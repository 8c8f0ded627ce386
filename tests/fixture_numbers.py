"""Comparing numbers computed now with numbers stored in tests/fixtures by an earlier commit.

The fixtures were written on one CPU; the suite runs on others (AMD Zen 4 and Zen 5, Intel Xeon with
AVX-512 and AMX), whose kernels round the last bits differently. Every comparison is relative to the
array's scale, |made - stored| <= tolerance * max|stored|, because an element near zero carries the
absolute rounding of its neighbours, not a relative one of its own.

The tolerances are measured by benchmarks/fixture_tolerance.py (results in
benchmarks/results/fixture_tolerance.json): each fixture made again on one machine under other SIMD
paths (ATen default/AVX2/AVX-512, oneDNN AVX2/SSE4.1, MKL AVX2, OpenCV without AVX2/AVX-512, ffmpeg
without SIMD, 1 or 2 threads), and made by deliberately broken code. Largest difference over those
runs, on an AMD Zen 4, as a fraction of the array's scale (tolerance / that = margin):

    rgb   2.5e-7 (margin 8)    flow  1.7e-6 (margin 6; ATen without SIMD)
    audio 3.1e-6 (margin 6; ffmpeg's decoding without SIMD gives 2.9e-6 of it; issue #22's Intel Xeon
          host: 6.9e-6 absolute on arrays of scale >= 2.31, so at most 3.0e-6)
    model outputs, scores, predictions 2.2e-7 (margin 4.6; 2.7 float32 steps at the scores' ~12)

Deliberate breaks, same measure: audio one sample late 1.4e-2, AST filterbank mean rounded to
-4.268 2.2e-4 and + 1e-4 8.4e-5 (caught); its std rounded to 4.57 moves audio 1.7e-5, under the
tolerance (noise-safe audio tolerance cannot see a 7e-5 relative change of that constant); ImageNet mean
red + 0.001 7.9e-3 (rgb); frames one later 7.1e-2 (rgb) and 0.21 (flow); flow bound 20 -> 20.02 1.0e-3;
every LayerNorm's eps 1e-5 -> 1e-4 1.6e-6 to 9e-5 on the model outputs; only the MCMoE decoder's
2.0e-6 to 3.4e-6 (tests/test_model_fixtures.py, tests/test_run_folder.py fail on it). An element-wise
relative comparison (rtol) cannot work: an element near zero moves by its neighbours' absolute
rounding, 4.8e-5 of itself on the Intel host.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# scale-relative tolerance per feature modality, and for model outputs, scores and predictions
TOLERANCES = {"rgb": 2e-6, "flow": 1e-5, "audio": 2e-5, "model": 1e-6}


def assert_close_to_fixture(actual: Any, stored: Any, what: str = "", tolerance: float = TOLERANCES["model"]) -> None:
    """`actual` (array, tensor or nested list of numbers) equals `stored` within `tolerance` of the
    stored array's scale (max |stored|); NaN where the stored value is NaN."""
    actual, stored = _numbers(actual), _numbers(stored)
    assert actual.shape == stored.shape, f"{what}: shape {actual.shape} != {stored.shape}"
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(stored), err_msg=f"{what}: NaN in other places")
    known = ~np.isnan(stored)
    scale = np.abs(stored[known]).max(initial=0.0)
    worst = np.abs(actual[known] - stored[known]).max(initial=0.0)
    assert worst <= tolerance * scale, (
        f"{what}: max |made - stored| = {worst:.3g} = {worst / scale if scale else float('inf'):.3g} of the "
        f"stored scale {scale:.3g}, above the tolerance {tolerance:g} (tests/fixture_numbers.py)")


def assert_features_close(made: Any, stored: Any, modality: str, what: str = "") -> None:
    """Extracted features of `modality` ("rgb", "flow", "audio") match stored ones at its measured tolerance."""
    assert_close_to_fixture(made, stored, f"{what} {modality}".strip(), TOLERANCES[modality])


def _numbers(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)
