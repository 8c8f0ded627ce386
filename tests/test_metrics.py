"""Spearman rho, MSE and the Table 1 averages against scipy and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from pipeline.metrics import average_ranks, fisher_z_mean, mean_mse, mse, spearman_rho


@pytest.mark.parametrize("seed", range(5))
def test_ranks_and_spearman_match_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    true = rng.integers(0, 6, size=40).astype(float)  # many ties
    predicted = true + rng.normal(0, 2, size=40)
    predicted[:10] = np.round(predicted[:10])  # ties on the prediction side too
    np.testing.assert_allclose(average_ranks(true), stats.rankdata(true))
    assert spearman_rho(predicted, true) == pytest.approx(stats.spearmanr(predicted, true).statistic, abs=1e-12)


@pytest.mark.parametrize("predicted, true", [
    ([2.0, 2.0, 2.0, 2.0], [1.0, 2.0, 3.0, 4.0]),  # constant predictions
    ([1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]),  # constant labels
    ([0.0, 0.0], [0.0, 0.0]),
])
def test_spearman_of_a_constant_side_is_nan_as_in_scipy(predicted, true):
    with pytest.warns(stats.ConstantInputWarning):
        assert math.isnan(stats.spearmanr(predicted, true).statistic)
    assert math.isnan(spearman_rho(predicted, true))  # and no warning of ours


def test_spearman_matches_scipy_on_all_ties_but_one_and_large_offsets():
    predicted = [1e6 + 0.5, 1e6, 1e6, 1e6, 1e6]
    true = [3.0, 1.0, 1.0, 2.0, 2.0]
    assert spearman_rho(predicted, true) == pytest.approx(stats.spearmanr(predicted, true).statistic, abs=1e-12)
    np.testing.assert_array_equal(average_ranks(predicted), stats.rankdata(predicted))


def test_spearman_hand_values_and_undefined_cases():
    assert spearman_rho([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman_rho([4, 3, 2, 1], [10, 20, 30, 40]) == pytest.approx(-1.0)
    # ranks (1, 3, 2) vs (1, 2, 3): 1 - 6 * 2 / (3 * 8) = 0.5
    assert spearman_rho([1, 3, 2], [1, 2, 3]) == pytest.approx(0.5)
    assert math.isnan(spearman_rho([1.0, 1.0, 1.0], [1, 2, 3]))  # constant predictions
    assert math.isnan(spearman_rho([1.0], [2.0]))
    with pytest.raises(ValueError):
        spearman_rho([1, 2], [1, 2, 3])


def test_mse_is_on_the_given_scale():
    assert mse([10.0, 20.0, 25.0], [12.0, 20.0, 21.0]) == pytest.approx((4 + 0 + 16) / 3)
    assert math.isnan(mse([], []))


def test_fisher_z_mean_by_hand():
    rhos = [0.5, 0.7, 0.9]
    expected = math.tanh((math.atanh(0.5) + math.atanh(0.7) + math.atanh(0.9)) / 3)
    assert fisher_z_mean(rhos) == pytest.approx(expected)
    assert fisher_z_mean(rhos) != pytest.approx(np.mean(rhos))  # not the arithmetic mean
    assert fisher_z_mean([0.3]) == pytest.approx(0.3)
    assert fisher_z_mean([0.4, -0.4]) == pytest.approx(0.0, abs=1e-12)


def test_fisher_z_mean_survives_perfect_correlations_and_reports_nan():
    value = fisher_z_mean([1.0, 0.5])
    assert math.isfinite(value) and 0.5 < value < 1.0
    assert math.isnan(fisher_z_mean([0.5, float("nan")]))
    assert math.isnan(fisher_z_mean([]))


def test_mean_mse():
    assert mean_mse([1.0, 2.0, 6.0]) == pytest.approx(3.0)
