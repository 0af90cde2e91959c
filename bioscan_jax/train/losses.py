"""Task losses with the signature the generic train step expects.

``loss_fn(model, batch, *, train) -> (scalar loss, metrics)``; see :mod:`bioscan_jax.train.step`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from bioscan_jax.data.dna import IGNORE_INDEX


def masked_cross_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean cross-entropy and accuracy over entries whose target is not ``IGNORE_INDEX``.

    Returns ``(loss, accuracy, count)``; an all-ignored batch gives loss 0, not NaN.
    """
    keep = targets != IGNORE_INDEX
    safe = jnp.where(keep, targets, 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
    count = keep.sum()
    denom = jnp.maximum(count, 1)
    loss = jnp.where(keep, ce, 0.0).sum() / denom
    correct = (jnp.argmax(logits, axis=-1) == safe) & keep
    return loss, correct.sum() / denom, count


def mlm_loss(model, batch, *, train: bool):
    """BarcodeBERT's masked-token loss: cross-entropy over the 4**k k-mer classes at every
    position whose ``targets`` is set (all k-mer positions by default; masked only if the
    pipeline was asked for ``masked_only``)."""
    del train
    logits, _ = model(batch["ids"], batch["attention_mask"])
    loss, acc, count = masked_cross_entropy(logits, batch["targets"])
    masked = batch["mlm_mask"] & (batch["targets"] != IGNORE_INDEX)
    masked_correct = ((jnp.argmax(logits, -1) == batch["targets"]) & masked).sum()
    return loss, {
        "accuracy": acc,
        "masked_accuracy": masked_correct / jnp.maximum(masked.sum(), 1),
        "num_tokens": batch["attention_mask"].sum(),
        "num_targets": count,
    }


def classification_loss(model, batch, *, train: bool):
    """Cross-entropy of ``model(ids, mask)`` logits against ``label`` (-1 rows are ignored)."""
    del train
    logits, _ = model(batch["ids"], batch["attention_mask"])
    loss, acc, count = masked_cross_entropy(logits, batch["label"])
    return loss, {"accuracy": acc, "num_labelled": count, "num_tokens": batch["attention_mask"].sum()}
