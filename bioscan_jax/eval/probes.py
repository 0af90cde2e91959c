"""Probes of frozen embeddings: cosine 1-NN and a linear (softmax regression) classifier."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import jax
import jax.numpy as jnp
import optax

from bioscan_jax.data.schema import MISSING_INDEX
from bioscan_jax.eval.knn import nearest_keys


def _finite_labelled(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.isfinite(x).all(axis=1) & (y != MISSING_INDEX)


def knn_probe(
    key_emb: np.ndarray, key_labels: np.ndarray, query_emb: np.ndarray, query_labels: np.ndarray, *, k: int = 1
) -> dict[str, float]:
    """Accuracy of predicting a query's label by majority of its ``k`` cosine-nearest keys
    (``k=1``: the nearest key's label). Unlabelled (-1) or non-finite rows are left out of both
    sides and counted."""
    key_emb, query_emb = np.asarray(key_emb), np.asarray(query_emb)
    key_labels, query_labels = np.asarray(key_labels), np.asarray(query_labels)
    keys_ok = _finite_labelled(key_emb, key_labels)
    queries_ok = _finite_labelled(query_emb, query_labels)
    if not keys_ok.any():
        raise ValueError("knn_probe: no labelled key with a finite embedding")
    if not queries_ok.any():
        raise ValueError("knn_probe: no labelled query with a finite embedding")
    idx, _ = nearest_keys(query_emb[queries_ok], key_emb[keys_ok], k=k)
    neighbour_labels = key_labels[keys_ok][np.asarray(idx)]
    if k == 1:
        pred = neighbour_labels[:, 0]
    else:  # majority vote, ties to the nearer neighbour
        pred = np.array([max(row, key=lambda v: (np.sum(row == v), -np.argmax(row == v))) for row in neighbour_labels])
    correct = pred == query_labels[queries_ok]
    return {
        "accuracy": float(correct.mean()),
        "n_queries": int(queries_ok.sum()),
        "n_queries_excluded": int((~queries_ok).sum()),
        "n_keys": int(keys_ok.sum()),
        "n_keys_excluded": int((~keys_ok).sum()),
    }


@dataclasses.dataclass(frozen=True)
class LinearHead:
    """A softmax-regression head on raw features: ``logits = x @ kernel + bias``."""

    kernel: np.ndarray  # [D, C]
    bias: np.ndarray  # [C]

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.argmax(np.asarray(x, np.float32) @ self.kernel + self.bias, axis=-1)


def fit_linear(
    x: np.ndarray,
    y: np.ndarray,
    *,
    num_classes: int,
    epochs: int = 100,
    lr: float = 1e-2,
    batch_size: int = 256,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> LinearHead:
    """Softmax regression on standardised features (AdamW, cosine decay), full-batch epochs as one
    jitted scan each. Rows must be labelled and finite. The standardisation is folded into the
    returned head, so it applies to raw features (and can initialise a fine-tuning head)."""
    x, y = np.asarray(x, np.float32), np.asarray(y).astype(np.int32)
    mean, std = x.mean(0), x.std(0) + 1e-6
    x = (x - mean) / std
    n, d = x.shape
    batch_size = min(batch_size, n)
    steps_per_epoch = n // batch_size
    total = max(1, epochs * steps_per_epoch)
    tx = optax.adamw(optax.cosine_decay_schedule(lr, total), weight_decay=weight_decay)
    params = {"w": jnp.zeros((d, num_classes), jnp.float32), "b": jnp.zeros((num_classes,), jnp.float32)}
    opt_state = tx.init(params)

    def loss_fn(p, xb, yb):
        logits = xb @ p["w"] + p["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    @jax.jit
    def epoch(carry, perm):
        def step(c, idx):
            p, s = c
            g = jax.grad(loss_fn)(p, x_dev[idx], y_dev[idx])
            upd, s = tx.update(g, s, p)
            return (optax.apply_updates(p, upd), s), None

        batches = perm[: steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size)
        carry, _ = jax.lax.scan(step, carry, batches)
        return carry

    x_dev, y_dev = jnp.asarray(x), jnp.asarray(y)
    rng = np.random.default_rng(seed)
    carry = (params, opt_state)
    for _ in range(epochs):
        carry = epoch(carry, jnp.asarray(rng.permutation(n)))
    w, b = (np.asarray(carry[0][k], np.float64) for k in ("w", "b"))
    kernel = w / std[:, None]
    return LinearHead(kernel=kernel.astype(np.float32), bias=(b - mean @ kernel).astype(np.float32))


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    num_classes: int,
    return_head: bool = False,
    **fit_options: Any,
) -> dict[str, Any]:
    """Test accuracy of :func:`fit_linear` (``fit_options``: its epochs, lr, batch_size,
    weight_decay, seed) on frozen features; ``head``: the fitted :class:`LinearHead`, when
    ``return_head``. Unlabelled or non-finite rows are left out and counted."""
    train_x, test_x = np.asarray(train_x, np.float32), np.asarray(test_x, np.float32)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    tr, te = _finite_labelled(train_x, train_y), _finite_labelled(test_x, test_y)
    if not tr.any() or not te.any():
        raise ValueError("linear_probe: the train or test set has no labelled, finite row")
    head = fit_linear(train_x[tr], train_y[tr], num_classes=num_classes, **fit_options)
    out: dict[str, Any] = {
        "accuracy": float((head.predict(test_x[te]) == test_y[te]).mean()),
        "train_accuracy": float((head.predict(train_x[tr]) == train_y[tr]).mean()),
        "n_train": int(tr.sum()),
        "n_test": int(te.sum()),
        "n_excluded": int((~tr).sum() + (~te).sum()),
    }
    if return_head:
        out["head"] = head
    return out
