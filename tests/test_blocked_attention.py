"""Blocked attention (models.layers.blocked_attention): the same numbers as the one-shot einsums,
forward and backward, with the same dropout mask; the block size rule; what 'auto' picks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bioscan_jax.models import layers

DIM, HEADS = 16, 2  # head_dim 8


def _inputs(batch=6, tokens=9):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, tokens, DIM)), jnp.float32)
    lengths = np.array([tokens, 3, tokens, 5, 1, tokens][:batch] + [tokens] * max(batch - 6, 0))
    mask = jnp.asarray(np.arange(tokens)[None] < lengths[:, None])[:, None, None, :]
    return x, mask


def _pair(rate=0.0):
    """Two attentions with the same weights and dropout stream, einsum and blocked."""
    out = []
    for impl in ("einsum", "blocked"):
        out.append(layers.MultiHeadAttention(DIM, HEADS, attention_dropout=rate, attention_impl=impl,
                                             rngs=nnx.Rngs(0, dropout=7)))
    return out


@nnx.jit(static_argnames="det")
def _loss_and_grads(model, x, mask, det):
    def loss(m):
        return (m(x, mask, deterministic=det) ** 2).mean()

    value, grads = nnx.value_and_grad(loss)(model)
    return value, nnx.state(grads, nnx.Param)


@pytest.mark.parametrize("records", [1, 2, 3, 6])
def test_blocked_matches_einsum_forward(records):
    x, mask = _inputs()
    einsum, blocked = _pair()
    b, t, _ = x.shape
    qkv = einsum.qkv(x)
    q = qkv[:, :, 0] / np.sqrt(DIM // HEADS)
    ref = einsum(x, mask, deterministic=True)
    got = blocked.out(layers.blocked_attention(q, qkv[:, :, 1], qkv[:, :, 2], mask, records=records))
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-6)


@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_blocked_matches_einsum_loss_and_grads(rate, monkeypatch):
    """With attention dropout active the blocked path draws the einsum path's mask element for
    element, so loss and every gradient agree; three blocks of two records (0, 3 / 1, 4 / 2, 5)."""
    monkeypatch.setattr(layers, "BLOCK_SCORE_BYTES", 2 * HEADS * 9 * 9 * 4)
    assert layers.block_records(6, HEADS, 9) == 2
    x, mask = _inputs()
    einsum, blocked = _pair(rate)
    (l1, g1), (l2, g2) = (_loss_and_grads(m, x, mask, det=False) for m in (einsum, blocked))
    np.testing.assert_allclose(float(l2), float(l1), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * np.abs(a).max())
    if rate:  # dropout really acts: a deterministic pass differs
        l3, _ = _loss_and_grads(einsum, x, mask, det=True)
        assert abs(float(l3) - float(l1)) > 0.05 * float(l1)


@pytest.mark.parametrize("n", [1, 7, 64])
def test_keep_mask_at_is_keep_mask_elementwise(n):
    key = jax.random.key(11)
    whole, p = layers.keep_mask(key, (n, 5), 0.25)
    index = jnp.arange(n * 5, dtype=jnp.uint32).reshape(n, 5)
    part, q = layers.keep_mask_at(layers.counter_seeds(key), index, 0.25)
    assert p == q
    np.testing.assert_array_equal(np.asarray(part), np.asarray(whole))


def test_block_records_rule(monkeypatch):
    monkeypatch.setattr(layers, "BLOCK_SCORE_BYTES", 4 * 2 * 10 * 10 * 3)  # 3 records of scores
    assert layers.block_records(12, 2, 10) == 3
    assert layers.block_records(10, 2, 10) == 5  # smallest divisor holding 3
    assert layers.block_records(7, 2, 10) == 7  # none: one block
    assert layers.block_records(16, 2, 10, shards=4) == 16  # 12 wanted; 16 is the first divisor, a multiple of 4
    assert layers.block_records(48, 2, 10, shards=4) == 12


def test_auto_resolution():
    assert jax.default_backend() == "cpu"
    assert layers.resolve_attention_impl("auto", head_dim=32) == "blocked"
    assert layers.resolve_attention_impl("auto", head_dim=64) == "blocked"
    assert layers.resolve_attention_impl("auto", head_dim=192) == "einsum"
    assert layers.resolve_attention_impl("einsum", head_dim=8) == "einsum"


def test_set_attention_impl():
    model = layers.MultiHeadAttention(DIM, HEADS, rngs=nnx.Rngs(0))
    layers.set_attention_impl(model, "einsum")
    assert model.attention_impl == "einsum"
    with pytest.raises(ValueError, match="attention_impl"):
        layers.set_attention_impl(model, "flash")
