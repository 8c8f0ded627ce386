"""Comparing numbers computed now with numbers stored in tests/fixtures by an earlier commit.

Each fixture was written on the development machine, and there the code that replaced the writer's was
checked to reproduce it bit for bit (see the fixture's README). Another CPU (CI's, a user's) may round
the last bits of a float32 matrix product or convolution differently, so these tests allow float32
rounding and nothing more: a changed computation moves numbers far beyond it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

RTOL, ATOL = 1e-5, 1e-6


def assert_close_to_fixture(actual: Any, stored: Any, what: str = "") -> None:
    """`actual` (array, tensor or nested list of numbers) equals `stored` up to float32 rounding."""
    actual, stored = _numbers(actual), _numbers(stored)
    assert actual.shape == stored.shape, f"{what}: shape {actual.shape} != {stored.shape}"
    np.testing.assert_allclose(actual, stored, rtol=RTOL, atol=ATOL, equal_nan=True, err_msg=what)


def _numbers(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)
