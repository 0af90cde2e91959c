"""Contrastive (InfoNCE) losses that align the CLIBD towers: image, DNA and taxonomy text.

For features ``a`` and ``b`` of one batch (``[B, D]``, L2-normalised by the towers) and a logit
scale ``s = exp(log_scale)``, the logits are ``s * a @ b.T``. Every *ordered* pair of enabled
modalities contributes one cross-entropy term, rows against their targets; the ``(a, b)`` and
``(b, a)`` terms are the row- and column-wise cross-entropies of the same logit matrix. The loss
is the mean over all terms, so with image, DNA and text there are six terms.

Targets:

* default: the identity (record ``i`` of one modality matches record ``i`` of the other);
* label-positive (``labels=``, e.g. species or BIN indices): the target row of ``i`` is uniform
  over ``P_i = {j : label_j == label_i}``; a negative label (:data:`MISSING_INDEX`) means
  "only itself". The cross-entropy of row ``i`` is
  ``-(1/|P_i|) sum_{j in P_i} logit_ij + logsumexp_j logit_ij``.

Negatives are the whole *global* batch: the functions are pure ``jnp`` on global arrays, so under
``jax.jit`` with the batch sharded over the ``('data', 'fsdp')`` mesh axes the partitioner
gathers what each device needs (the all-gather-with-gradients of the PyTorch references comes
for free).

``chunk_size`` selects a blockwise implementation that never builds the ``B x B`` matrix: it
scans over column blocks of ``b`` with an online logsumexp for the rows (column statistics are
complete within each block), and a custom VJP recomputes the blocks in the backward pass, so
activation memory is ``O(B * chunk_size + B * D)`` forward and backward. It returns the same
value and gradient as the dense form.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from bioscan_jax.data.schema import MISSING_INDEX

Array = jax.Array

#: CLIP's initial logit scale, log(1 / 0.07).
INIT_LOG_SCALE: float = math.log(1 / 0.07)


def positive_groups(labels: Array | None, batch_size: int) -> Array:
    """Integer group id per record; records with equal ids are positives of each other.

    Without labels every record is its own group (identity targets). Records whose label is
    negative (:data:`MISSING_INDEX`) get a unique negative id, so their only positive is
    themselves.
    """
    index = jnp.arange(batch_size, dtype=jnp.int32)
    if labels is None:
        return index
    labels = jnp.asarray(labels)
    if labels.shape != (batch_size,):
        raise ValueError(f"labels must have shape ({batch_size},), got {labels.shape}")
    labels = labels.astype(jnp.int32)
    return jnp.where(labels < 0, MISSING_INDEX - index, labels)


def _acc_dtype(*xs: Array) -> jnp.dtype:
    """Accumulation dtype: at least float32 (inputs may be bfloat16)."""
    return jnp.result_type(jnp.float32, *xs)


def _logits(a: Array, b: Array, scale: Array) -> Array:
    """``scale * a @ b.T``, accumulated in at least float32."""
    dtype = _acc_dtype(a, b, scale)
    return scale.astype(dtype) * jnp.einsum("id,jd->ij", a, b, preferred_element_type=dtype)


# ----------------------------------------------------------------------------- dense


def _pair_terms_dense(a: Array, b: Array, log_scale: Array, groups: Array) -> tuple[Array, ...]:
    """(row loss, column loss, row top-1 acc, column top-1 acc) of one modality pair."""
    logits = _logits(a, b, jnp.exp(log_scale))
    pos = groups[:, None] == groups[None, :]
    row_t = pos / jnp.sum(pos, axis=1, keepdims=True)
    col_t = pos / jnp.sum(pos, axis=0, keepdims=True)
    row_loss = -jnp.mean(jnp.sum(row_t * jax.nn.log_softmax(logits, axis=1), axis=1))
    col_loss = -jnp.mean(jnp.sum(col_t * jax.nn.log_softmax(logits, axis=0), axis=0))
    pos_logits = jnp.where(pos, logits, -jnp.inf)
    row_acc = jnp.mean(jnp.max(pos_logits, axis=1) >= jnp.max(logits, axis=1))
    col_acc = jnp.mean(jnp.max(pos_logits, axis=0) >= jnp.max(logits, axis=0))
    return row_loss, col_loss, row_acc, col_acc


# ----------------------------------------------------------------------------- chunked


def _column_blocks(b: Array, groups: Array, chunk: int) -> tuple[Array, Array, Array]:
    """``b`` and its groups padded to a multiple of ``chunk`` and split into blocks."""
    n = b.shape[0]
    blocks = -(-n // chunk)
    pad = blocks * chunk - n
    b_blocks = jnp.pad(b, ((0, pad), (0, 0))).reshape(blocks, chunk, b.shape[1])
    g_blocks = jnp.pad(groups, (0, pad)).reshape(blocks, chunk)
    valid = (jnp.arange(blocks * chunk) < n).reshape(blocks, chunk)
    return b_blocks, g_blocks, valid


def _chunked_forward(a, b, log_scale, groups, chunk):
    n = a.shape[0]
    scale = jnp.exp(log_scale)
    b_blocks, g_blocks, valid = _column_blocks(b, groups, chunk)

    def body(carry, xs):
        row_max, row_sumexp, row_pos_sum, row_pos_cnt, row_pos_max = carry
        b_c, g_c, v_c = xs
        logits = _logits(a, b_c, scale)  # [n, chunk]
        pos = (groups[:, None] == g_c[None, :]) & v_c[None, :]
        masked = jnp.where(v_c[None, :], logits, -jnp.inf)
        # Rows: online logsumexp over column blocks.
        new_max = jnp.maximum(row_max, jnp.max(masked, axis=1))
        row_sumexp = row_sumexp * jnp.exp(row_max - new_max) + jnp.sum(
            jnp.exp(masked - new_max[:, None]), axis=1
        )
        pos_logits = jnp.where(pos, logits, 0.0)
        pos_max = jnp.where(pos, logits, -jnp.inf)
        carry = (
            new_max,
            row_sumexp,
            row_pos_sum + jnp.sum(pos_logits, axis=1),
            row_pos_cnt + jnp.sum(pos, axis=1, dtype=jnp.int32),
            jnp.maximum(row_pos_max, jnp.max(pos_max, axis=1)),
        )
        # Columns: every row is present, so their statistics are complete in this block.
        cols = (
            jax.nn.logsumexp(logits, axis=0),
            jnp.sum(pos_logits, axis=0),
            jnp.sum(pos, axis=0, dtype=jnp.int32),
            jnp.max(logits, axis=0),
            jnp.max(pos_max, axis=0),
        )
        return carry, cols

    dtype = _acc_dtype(a, b, log_scale)
    neg_inf = jnp.full((n,), -jnp.inf, dtype)
    zeros = jnp.zeros((n,), dtype)
    init = (neg_inf, zeros, zeros, jnp.zeros((n,), jnp.int32), neg_inf)
    (row_max, row_sumexp, row_pos_sum, row_pos_cnt, row_pos_max), cols = jax.lax.scan(
        body, init, (b_blocks, g_blocks, valid)
    )
    col_lse, col_pos_sum, col_pos_cnt, col_max, col_pos_max = (c.reshape(-1)[:n] for c in cols)
    row_lse = row_max + jnp.log(row_sumexp)
    row_loss = jnp.mean(row_lse - row_pos_sum / row_pos_cnt)
    col_loss = jnp.mean(col_lse - col_pos_sum / col_pos_cnt)
    row_acc = jnp.mean(row_pos_max >= row_max)
    col_acc = jnp.mean(col_pos_max >= col_max)
    residuals = (a, b, log_scale, groups, row_lse, col_lse, row_pos_cnt, col_pos_cnt)
    return (row_loss, col_loss, row_acc, col_acc), residuals


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _pair_terms_chunked(a, b, log_scale, groups, chunk):
    """Blockwise twin of :func:`_pair_terms_dense` (same outputs), memory linear in the batch."""
    return _chunked_forward(a, b, log_scale, groups, chunk)[0]


def _pair_terms_chunked_fwd(a, b, log_scale, groups, chunk):
    return _chunked_forward(a, b, log_scale, groups, chunk)


def _pair_terms_chunked_bwd(chunk, residuals, cotangents):
    a, b, log_scale, groups, row_lse, col_lse, row_cnt, col_cnt = residuals
    ct_row, ct_col = cotangents[0], cotangents[1]  # accuracies are piecewise constant
    n = a.shape[0]
    dtype = _acc_dtype(a, b, log_scale)
    scale = jnp.exp(log_scale)
    b_blocks, g_blocks, valid = _column_blocks(b, groups, chunk)
    pad = b_blocks.shape[0] * chunk - n
    col_lse_blocks = jnp.pad(col_lse, (0, pad)).reshape(-1, chunk)
    col_cnt_blocks = jnp.pad(col_cnt, (0, pad), constant_values=1).reshape(-1, chunk)
    w_row, w_col = ct_row / n, ct_col / n

    def body(carry, xs):
        grad_a, grad_log_scale = carry
        b_c, g_c, v_c, lse_c, cnt_c = xs
        logits = _logits(a, b_c, scale)
        pos = ((groups[:, None] == g_c[None, :]) & v_c[None, :]).astype(dtype)
        # d(loss)/d(logits) for this block: softmax minus soft target, rows and columns.
        g = w_row * (jnp.exp(logits - row_lse[:, None]) - pos / row_cnt[:, None])
        g = g + w_col * (jnp.exp(logits - lse_c[None, :]) - pos / cnt_c[None, :])
        g = jnp.where(v_c[None, :], g, 0.0)
        grad_a = grad_a + scale * jnp.einsum("ij,jd->id", g, b_c.astype(dtype))
        grad_b_c = scale * jnp.einsum("ij,id->jd", g, a.astype(dtype))
        grad_log_scale = grad_log_scale + jnp.sum(g * logits)
        return (grad_a, grad_log_scale), grad_b_c

    init = (jnp.zeros(a.shape, dtype), jnp.zeros((), dtype))
    (grad_a, grad_log_scale), grad_b = jax.lax.scan(
        body, init, (b_blocks, g_blocks, valid, col_lse_blocks, col_cnt_blocks)
    )
    grad_b = grad_b.reshape(-1, b.shape[1])[:n]
    return (
        grad_a.astype(a.dtype),
        grad_b.astype(b.dtype),
        grad_log_scale.reshape(jnp.shape(log_scale)).astype(log_scale.dtype),
        None,
    )


_pair_terms_chunked.defvjp(_pair_terms_chunked_fwd, _pair_terms_chunked_bwd)


# ----------------------------------------------------------------------------- public


def contrastive_loss(
    features: Mapping[str, Array | None],
    log_scale: Array | float,
    *,
    labels: Array | None = None,
    chunk_size: int | None = None,
    trainable_scale: bool = True,
    max_scale: float | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Symmetric multi-modal InfoNCE over every ordered pair of enabled modalities.

    Args:
      features: modality name (``image``, ``dna``, ``text``, ...) -> ``[B, D]`` L2-normalised
        features of the global batch; ``None`` entries are disabled modalities. At least two.
      log_scale: scalar log of the logit scale (learnable; CLIBD initialises it to
        :data:`INIT_LOG_SCALE` and does not clamp it).
      labels: optional ``[B]`` int labels (species or BIN index) for label-positive targets;
        negative = missing (only itself is positive). ``None``: identity targets.
      chunk_size: if set, the blockwise implementation with column blocks of this size.
      trainable_scale: ``False`` stops the gradient to ``log_scale`` (a fixed temperature).
      max_scale: optional clamp of the logit scale (CLIP uses 100); ``None`` = no clamp.

    Returns:
      ``(loss, metrics)``: the mean of all ordered-pair terms, and a dict with ``loss``,
      ``logit_scale``, and per ordered pair ``loss/{q}_to_{k}`` and ``acc/{q}_to_{k}`` (top-1:
      the fraction of rows whose highest logit is a positive; ties count as correct).
    """
    names = [m for m, f in features.items() if f is not None]
    if len(names) < 2:
        raise ValueError(f"contrastive_loss needs at least two modalities, got {names}")
    shapes = {m: tuple(features[m].shape) for m in names}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
        raise ValueError(f"features must all be [B, D] arrays of one shape, got {shapes}")
    batch_size = shapes[names[0]][0]
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")

    log_scale = jnp.asarray(log_scale)
    if not jnp.issubdtype(log_scale.dtype, jnp.floating) or log_scale.dtype.itemsize < 4:
        log_scale = log_scale.astype(jnp.float32)
    if not trainable_scale:
        log_scale = jax.lax.stop_gradient(log_scale)
    if max_scale is not None:
        log_scale = jnp.minimum(log_scale, math.log(max_scale))
    groups = positive_groups(labels, batch_size)

    if chunk_size is None:
        pair_terms = _pair_terms_dense
    else:
        chunk = min(chunk_size, batch_size)

        def pair_terms(a, b, log_scale, groups):
            return _pair_terms_chunked(a, b, log_scale, groups, chunk)

    terms, metrics = [], {}
    for x, y in itertools.combinations(names, 2):
        row_loss, col_loss, row_acc, col_acc = pair_terms(features[x], features[y], log_scale, groups)
        metrics[f"loss/{x}_to_{y}"], metrics[f"loss/{y}_to_{x}"] = row_loss, col_loss
        metrics[f"acc/{x}_to_{y}"], metrics[f"acc/{y}_to_{x}"] = row_acc, col_acc
        terms += [row_loss, col_loss]
    loss = jnp.mean(jnp.stack(terms))
    metrics["loss"] = loss
    metrics["logit_scale"] = jnp.exp(log_scale)
    return loss, metrics
