"""Tests of the frozen-embedding probes."""

import numpy as np
import pytest

from bioscan_jax.eval import probes


def test_knn_probe_on_a_hand_made_example():
    keys = np.array([[1, 0], [0, 1], [-1, 0], [0.9, 0.1]], np.float32)
    key_labels = np.array([0, 1, 2, -1])
    queries = np.array([[0.95, 0.0], [0.1, 1.0], [-1.0, 0.2], [0.0, -1.0]], np.float32)
    query_labels = np.array([0, 1, 1, -1])
    out = probes.knn_probe(keys, key_labels, queries, query_labels)
    assert out["accuracy"] == pytest.approx(2 / 3)
    assert out["n_queries"] == 3 and out["n_queries_excluded"] == 1
    assert out["n_keys"] == 3 and out["n_keys_excluded"] == 1


def test_knn_probe_rejects_empty_sets():
    with pytest.raises(ValueError, match="no labelled query"):
        probes.knn_probe(np.eye(2), np.array([0, 1]), np.eye(2), np.array([-1, -1]))


def test_linear_probe_separates_separable_classes_and_not_noise():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 16)) * 4
    y = rng.integers(0, 5, size=600)
    x = centers[y] + rng.normal(size=(600, 16))
    good = probes.linear_probe(x[:400], y[:400], x[400:], y[400:], num_classes=5, epochs=20, lr=0.05)
    assert good["accuracy"] > 0.95
    noise = probes.linear_probe(rng.normal(size=(400, 16)), y[:400], rng.normal(size=(200, 16)), y[400:],
                                num_classes=5, epochs=20, lr=0.05)
    assert noise["accuracy"] < 0.45


def test_fit_linear_folds_the_standardisation_into_a_head_on_raw_features():
    # Pooled transformer features look like this: a large shared offset, tiny per-class differences.
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(4, 8))
    y = rng.integers(0, 4, size=400)
    raw = 50.0 + 0.01 * (centers[y] + 0.1 * rng.normal(size=(400, 8)))
    head = probes.fit_linear(raw, y, num_classes=4, epochs=30, lr=0.05)
    assert head.kernel.shape == (8, 4) and head.bias.shape == (4,)
    assert (head.predict(raw) == y).mean() > 0.97
