"""Paired bootstrap statistics for evaluation tables (plain NumPy).

Zero-shot comparisons are paired: every setup predicts the same examples, so
a difference is judged by resampling examples once and scoring every setup
(and every seed) on that same resample.
"""

from __future__ import annotations

import numpy as np

__all__ = ["bootstrap_ci", "confusion", "paired_delta"]


def bootstrap_ci(correct: np.ndarray, n_resamples: int, rng: np.random.Generator) -> tuple[float, float, float]:
    """Mean accuracy and a percentile 95 % CI; ``correct`` is (seeds, examples) of 0/1.

    Examples are resampled once per draw and shared by every seed (paired over seeds).
    """
    idx = rng.integers(0, correct.shape[1], size=(n_resamples, correct.shape[1]))
    means = correct[:, idx].mean(axis=(0, 2))
    return float(correct.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_delta(a: np.ndarray, b: np.ndarray, n_resamples: int, seed: int = 0) -> dict[str, float]:
    """Δ = mean(a) − mean(b) with a paired bootstrap 95 % CI (same example draws for both)."""
    mean, lo, hi = bootstrap_ci(a.astype(float) - b.astype(float), n_resamples, np.random.default_rng(seed))
    return {"delta": mean, "lo": lo, "hi": hi}


def confusion(gold: np.ndarray, pred: np.ndarray, n: int) -> list[list[int]]:
    out = np.zeros((n, n), dtype=int)
    np.add.at(out, (gold, pred), 1)
    return out.tolist()
