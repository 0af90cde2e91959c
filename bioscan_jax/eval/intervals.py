"""Confidence intervals of accuracies: how much a table entry would move on another draw of the
same number of records.

:func:`bootstrap_interval` is the percentile bootstrap of an accuracy (the mean of per-record
hits). Resampling ``n`` records with replacement from ``n`` of which ``k`` are hits gives a number
of hits distributed exactly as ``Binomial(n, k/n)``, so the bootstrap draws that directly: the
same interval as resampling the records, at any ``n``, without an ``[samples, n]`` index matrix.
"""

from __future__ import annotations

import numpy as np

#: Bootstrap resamples per interval and the confidence level of the tables.
SAMPLES, LEVEL = 10_000, 0.95


def bootstrap_interval(correct: np.ndarray, *, samples: int = SAMPLES, level: float = LEVEL,
                       seed: int = 0) -> tuple[float, float]:
    """The ``level`` percentile-bootstrap interval of ``mean(correct)`` (module docstring);
    ``(nan, nan)`` for no records."""
    correct = np.asarray(correct, bool).ravel()
    n = correct.size
    if n == 0:
        return float("nan"), float("nan")
    draws = np.random.default_rng(seed).binomial(n, correct.mean(), size=samples) / n
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(draws, [tail, 100 - tail])
    return float(lo), float(hi)


def accuracy_with_interval(correct: np.ndarray, *, seed: int = 0) -> dict[str, object]:
    """``{'accuracy', 'ci95': [lo, hi], 'n'}`` of per-record hits."""
    correct = np.asarray(correct, bool).ravel()
    lo, hi = bootstrap_interval(correct, seed=seed)
    return {"accuracy": float(correct.mean()) if correct.size else float("nan"), "ci95": [lo, hi],
            "n": int(correct.size)}
