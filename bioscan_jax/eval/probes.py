"""Probes of frozen embeddings: cosine 1-NN and a linear (softmax regression) classifier.

Two recipes for the linear probe (:data:`LINEAR_RECIPES`):

* ``'reference'`` — BarcodeBERT's ``baselines/linear_probing.py::run`` (BIOSCAN-5M branch):
  features standardised with *one scalar* mean and std over the whole training matrix
  (``X.mean()``, ``X.std()``, ddof 0), applied to the test features too; ``torch.nn.Linear`` over
  the classes present in the training labels (``sorted(set(y_train))``), torch's default init;
  ``SGD(lr=0.01, momentum=0.9, weight_decay=1e-5)``, constant lr, cross-entropy,
  ``DataLoader(batch_size=64, shuffle=True)`` (the last, partial batch included), 200 epochs.
* ``'adamw'`` — ours: per-feature standardisation, AdamW with cosine decay, zero init, full
  batches only; converges in fewer epochs on small data.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import jax
import jax.numpy as jnp
import optax

from bioscan_jax.data.schema import MISSING_INDEX
from bioscan_jax.eval.intervals import accuracy_with_interval
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
        **accuracy_with_interval(correct),
        "n_queries": int(queries_ok.sum()),
        "n_queries_excluded": int((~queries_ok).sum()),
        "n_keys": int(keys_ok.sum()),
        "n_keys_excluded": int((~keys_ok).sum()),
    }


#: Logits :meth:`LinearHead.predict` holds at once (64 Mi float32: 256 MB).
PREDICT_MAX_LOGITS = 1 << 26


@dataclasses.dataclass(frozen=True)
class LinearHead:
    """A softmax-regression head on raw features: ``logits = x @ kernel + bias``."""

    kernel: np.ndarray  # [D, C]
    bias: np.ndarray  # [C]

    def predict(self, x: np.ndarray, *, max_logits: int = PREDICT_MAX_LOGITS) -> np.ndarray:
        """The argmax class of every row, a block of rows at a time: at most ``max_logits``
        logits (float32) are held at once, whatever the number of rows (the whole matrix of
        BIOSCAN-5M's ~140k deduplicated train rows x 22,622 species would be 12.6 GB, twice
        with the bias added)."""
        x = np.asarray(x, np.float32)
        rows = max(1, max_logits // max(self.kernel.shape[1], 1))
        out = np.empty(x.shape[0], np.int64)
        for start in range(0, x.shape[0], rows):
            logits = x[start:start + rows] @ self.kernel
            logits += self.bias
            out[start:start + rows] = np.argmax(logits, axis=-1)
        return out


LINEAR_RECIPES = ("reference", "adamw")
#: Bias of a class the reference probe does not model (absent from the training labels): finite,
#: so the head can seed a fine-tuning classifier, and far below any fitted logit.
ABSENT_CLASS_BIAS = -1e9


def torch_linear_init(d: int, c: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """torch ``nn.Linear(d, c)``'s default init (``kaiming_uniform_(a=sqrt(5))`` on the weight,
    ``U(-1/sqrt(d), 1/sqrt(d))`` on the bias: both ``U(-1/sqrt(d), 1/sqrt(d))``), as a [d, c]
    kernel and a [c] bias drawn from a seeded numpy generator."""
    bound = 1.0 / np.sqrt(d)
    rng = np.random.default_rng(seed)
    return (rng.uniform(-bound, bound, size=(c, d)).astype(np.float32).T.copy(),
            rng.uniform(-bound, bound, size=(c,)).astype(np.float32))


def epoch_batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of a shuffling ``DataLoader`` without ``drop_last``: a permutation of ``range(n)``
    cut into batches of ``batch_size``, the last one shorter."""
    perm = rng.permutation(n)
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


def fit_linear_reference(
    x: np.ndarray,
    y: np.ndarray,
    *,
    num_classes: int,
    epochs: int = 200,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 1e-5,
    batch_size: int = 64,
    seed: int = 0,
    init: tuple[np.ndarray, np.ndarray] | None = None,
    return_trajectory: bool = False,
) -> LinearHead | tuple[LinearHead, list[np.ndarray]]:
    """The reference linear probe (module docstring, ``'reference'``). Rows must be labelled and
    finite. The classifier covers the classes present in ``y``; the returned head has all
    ``num_classes`` columns, the absent ones never predicted (bias :data:`ABSENT_CLASS_BIAS`), and the scalar
    standardisation folded in. ``init``: the [d, c_present] kernel and bias to start from
    (default :func:`torch_linear_init`); the epoch batches are :func:`epoch_batches` of
    ``np.random.default_rng(seed)``. ``return_trajectory`` also returns the kernel after each
    optimiser step of the first epoch (for parity tests)."""
    x, y = np.asarray(x, np.float32), np.asarray(y).astype(np.int64)
    mean, std = float(x.mean()), float(x.std())
    std = std if std > 0 else 1.0
    x = (x - mean) / std
    present = np.unique(y)
    y_local = np.searchsorted(present, y).astype(np.int32)
    n, d = x.shape
    c = present.size
    w0, b0 = init if init is not None else torch_linear_init(d, c, seed)
    params = {"w": jnp.asarray(w0, jnp.float32), "b": jnp.asarray(b0, jnp.float32)}
    tx = optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(lr, momentum=momentum))
    opt_state = tx.init(params)
    batch_size = min(batch_size, n)
    x_dev, y_dev = jnp.asarray(x), jnp.asarray(y_local)

    def loss_fn(p, idx, valid):
        logits = x_dev[idx] @ p["w"] + p["b"]
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y_dev[idx])
        return jnp.sum(losses * valid) / jnp.sum(valid)

    @jax.jit
    def epoch(carry, idx, valid):
        def step(cr, batch):
            p, st = cr
            g = jax.grad(loss_fn)(p, *batch)
            upd, st = tx.update(g, st, p)
            p = optax.apply_updates(p, upd)
            # the kernel after every step only when asked for: stacked over an epoch it is
            # steps x d x classes floats (79 GB for BIOSCAN-5M's 2,182 steps x 768 x 11,846)
            return (p, st), (p["w"] if return_trajectory else None)

        return jax.lax.scan(step, carry, (idx, valid))

    rng = np.random.default_rng(seed)
    steps = -(-n // batch_size)
    carry = (params, opt_state)
    trajectory: list[np.ndarray] = []
    for e in range(epochs):
        batches = epoch_batches(n, batch_size, rng)
        idx = np.zeros((steps, batch_size), np.int32)
        valid = np.zeros((steps, batch_size), np.float32)
        for i, b in enumerate(batches):
            idx[i, :len(b)], valid[i, :len(b)] = b, 1.0
        carry, ws = epoch(carry, jnp.asarray(idx), jnp.asarray(valid))
        if return_trajectory and e == 0:
            trajectory = [np.asarray(w) for w in ws]
    w = np.asarray(carry[0]["w"], np.float64) / std
    b = np.asarray(carry[0]["b"], np.float64) - mean * w.sum(axis=0)
    kernel = np.zeros((d, num_classes), np.float32)
    bias = np.full((num_classes,), ABSENT_CLASS_BIAS, np.float32)
    kernel[:, present], bias[present] = w, b
    head = LinearHead(kernel=kernel, bias=bias)
    return (head, trajectory) if return_trajectory else head


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


def fit_head(x: np.ndarray, y: np.ndarray, *, num_classes: int, recipe: str = "adamw", **options: Any) -> LinearHead:
    """:func:`fit_linear_reference` (``recipe='reference'``) or :func:`fit_linear` (``'adamw'``)."""
    if recipe not in LINEAR_RECIPES:
        raise ValueError(f"unknown linear probe recipe {recipe!r}; valid: {', '.join(LINEAR_RECIPES)}")
    fit = fit_linear_reference if recipe == "reference" else fit_linear
    return fit(x, y, num_classes=num_classes, **options)


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    num_classes: int,
    return_head: bool = False,
    recipe: str = "adamw",
    **fit_options: Any,
) -> dict[str, Any]:
    """Test accuracy of a linear probe on frozen features: ``recipe`` (:data:`LINEAR_RECIPES`)
    ``'reference'`` fits with :func:`fit_linear_reference`, ``'adamw'`` with :func:`fit_linear`
    (``fit_options``: their epochs, lr, batch_size, weight_decay, seed...); ``head``: the fitted
    :class:`LinearHead`, when ``return_head``. Unlabelled or non-finite rows are left out and
    counted."""
    train_x, test_x = np.asarray(train_x, np.float32), np.asarray(test_x, np.float32)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    tr, te = _finite_labelled(train_x, train_y), _finite_labelled(test_x, test_y)
    if not tr.any() or not te.any():
        raise ValueError("linear_probe: the train or test set has no labelled, finite row")
    head = fit_head(train_x[tr], train_y[tr], num_classes=num_classes, recipe=recipe, **fit_options)
    out: dict[str, Any] = {
        **accuracy_with_interval(head.predict(test_x[te]) == test_y[te]),
        "train_accuracy": float((head.predict(train_x[tr]) == train_y[tr]).mean()),
        "n_train": int(tr.sum()),
        "n_test": int(te.sum()),
        "n_excluded": int((~tr).sum() + (~te).sum()),
        "recipe": recipe,
    }
    if return_head:
        out["head"] = head
    return out
