"""The evaluation metrics of the AQA papers: Spearman rho, MSE on the score scale, and their averages.

Spearman rho is the Pearson correlation of average ranks (pandas' rank; scipy is only a test
dependency), NaN where it is undefined rather than a warning.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import pandas as pd

# atanh(+-1) is infinite; a perfect correlation in one setting must not swamp the Fisher-z average.
FISHER_CLIP = 1.0 - 1e-7


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of the ranks they span."""
    return pd.Series(np.asarray(values, dtype=np.float64)).rank(method="average").to_numpy(copy=True)


def spearman_rho(predicted: Iterable[float], true: Iterable[float]) -> float:
    """Spearman rank correlation; NaN when it is undefined (fewer than 2 values, or one side constant)."""
    predicted = np.asarray(list(predicted), dtype=np.float64)
    true = np.asarray(list(true), dtype=np.float64)
    if predicted.shape != true.shape:
        raise ValueError(f"spearman_rho: {predicted.shape} predictions vs {true.shape} labels")
    if len(predicted) < 2:
        return float("nan")
    a = average_ranks(predicted)
    b = average_ranks(true)
    a -= a.mean()
    b -= b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    if denominator == 0:
        return float("nan")
    return float(np.clip((a * b).sum() / denominator, -1.0, 1.0))


def mse(predicted: Iterable[float], true: Iterable[float]) -> float:
    """Mean squared error; pass scores on the original scale (the papers report it so)."""
    predicted = np.asarray(list(predicted), dtype=np.float64)
    true = np.asarray(list(true), dtype=np.float64)
    if predicted.shape != true.shape:
        raise ValueError(f"mse: {predicted.shape} predictions vs {true.shape} labels")
    if len(predicted) == 0:
        return float("nan")
    return float(np.mean((predicted - true) ** 2))


def fisher_z_mean(rhos: Iterable[float]) -> float:
    """Average correlations through Fisher's z: tanh(mean(atanh(rho))). NaN if any rho is NaN."""
    rhos = np.asarray(list(rhos), dtype=np.float64)
    if len(rhos) == 0 or np.isnan(rhos).any():
        return float("nan")
    return float(np.tanh(np.mean(np.arctanh(np.clip(rhos, -FISHER_CLIP, FISHER_CLIP)))))


def mean_mse(values: Iterable[float]) -> float:
    """Arithmetic mean of per-setting MSEs (the papers' Average column)."""
    values = np.asarray(list(values), dtype=np.float64)
    if len(values) == 0:
        return float("nan")
    return float(values.mean())
