"""The tables' 95% intervals: the percentile bootstrap of an accuracy."""

from __future__ import annotations

import numpy as np
import pytest

from bioscan_jax.eval.intervals import accuracy_with_interval, bootstrap_interval


def test_binomial_draws_equal_resampling_the_records():
    """Hits of n records resampled with replacement are Binomial(n, k/n): the shortcut gives the
    interval of the explicit resampling."""
    correct = np.zeros(62, bool)
    correct[:48] = True  # 77.42%, the size of the old main job's 1-NN table
    rng = np.random.default_rng(1)
    explicit = correct[rng.integers(0, correct.size, size=(20_000, correct.size))].mean(axis=1)
    want = np.percentile(explicit, [2.5, 97.5])
    got = bootstrap_interval(correct, samples=20_000, seed=2)
    assert got == pytest.approx(tuple(want), abs=0.02)
    assert got[0] < 0.7742 < got[1] and got[1] - got[0] > 0.15  # 62 queries: a wide interval


def test_interval_shrinks_with_n_and_degenerate_cases():
    small = accuracy_with_interval(np.arange(100) % 4 != 0)
    large = accuracy_with_interval(np.arange(10_000) % 4 != 0)
    assert small["accuracy"] == large["accuracy"] == 0.75 and (small["n"], large["n"]) == (100, 10_000)
    assert large["ci95"][1] - large["ci95"][0] < (small["ci95"][1] - small["ci95"][0]) / 5
    assert accuracy_with_interval(np.ones(5, bool))["ci95"] == [1.0, 1.0]
    assert np.isnan(bootstrap_interval(np.zeros(0, bool))).all()
