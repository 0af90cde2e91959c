"""Shared transformer pieces (Flax NNX): dense, layer norm, embeddings, attention, MLP, blocks.

One transformer block serves both families used in the project:

* post-LN (BERT / BarcodeBERT): ``x = LN(x + Drop(Attn(x)))``; ``x = LN(x + Drop(MLP(x)))``;
* pre-LN (ViT): ``x = x + DropPath(Drop(Attn(LN(x))))``; ``x = x + DropPath(Drop(MLP(LN(x))))``.

Logical axis names
------------------
Every parameter carries logical axis names (``nnx.with_partitioning`` metadata, readable with
``nnx.get_partition_spec``); the training code maps them to mesh axes with a rules table.

========== ============================================ =====================================
name       meaning                                      used by
========== ============================================ =====================================
``embed``  model width (hidden size)                    every kernel's model-width dim,
                                                        embedding tables, output biases
``mlp``    feed-forward width                           MLP ``fc1`` (embed, mlp), ``fc2``
                                                        (mlp, embed), ``fc1`` bias
``heads``  attention heads                              ``qkv`` (embed, None, heads, kv),
                                                        ``out`` (heads, kv, embed)
``kv``     per-head feature width                       as above
``vocab``  token vocabulary / MLM classes (4^k)         word embeddings (vocab, embed),
                                                        MLM head (embed, vocab)
``classes`` classifier outputs                          classification heads (embed, classes)
``layers`` the stacked-blocks axis                      every block parameter of a scanned
                                                        encoder (``scan=True``), first dim
``None``   replicated                                   LayerNorm scale/bias, position and
                                                        token-type tables (None, embed), the
                                                        stacked q/k/v dim, ViT patch kernel
                                                        (None, None, None, embed), ViT cls and
                                                        position embeddings (None, None, embed)
========== ============================================ =====================================

The one rules table that maps them to mesh axes is :data:`bioscan_jax.sharding.DEFAULT_SHARDING_RULES`
(MaxText style).

Eager sharding: with flax's eager sharding on, *and* a mesh set (``jax.set_mesh``) *and* logical
axis rules in context (``flax.core.spmd.logical_axis_rules`` / ``nn.logical_axis_rules``), the
parameters are sharded as they are created. Otherwise the names are metadata only (no mesh is
needed to build a model in tests and on one device); shard with ``nnx.get_partition_spec`` under
the rules and ``jax.jit(..., out_shardings=...)``.

Dropout follows NNX conventions (:class:`Dropout` has the ``nnx.Dropout`` interface): every module
with randomness holds its own RNG stream (from the ``dropout`` collection of the ``nnx.Rngs``
passed at construction); ``model.train()`` / ``model.eval()`` toggle it, and a
``deterministic=`` call argument overrides that. Masks are drawn 16 bits per element, two per
word of a hashed counter seeded from the key (:func:`counter_bits`): on CPU, threefry's random
words (``jax.random.bernoulli``) cost a fifth of the tiny BarcodeBERT step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import spmd as core_spmd

from bioscan_jax.sharding import BATCH_AXES, constrain

Array = jax.Array
Dtype = Any

LOGICAL_AXIS_NAMES = ("embed", "mlp", "heads", "kv", "vocab", "classes", "layers")

#: HF BERT initialiser: normal(std=0.02) kernels, zero biases.
default_kernel_init = nnx.initializers.normal(0.02)
zeros_init = nnx.initializers.zeros_init()
ones_init = nnx.initializers.ones_init()


def torch_linear_inits(fan_in: int) -> tuple[Callable[..., Array], Callable[..., Array]]:
    """``(kernel_init, bias_init)`` of torch's ``nn.Linear`` default (``reset_parameters``:
    ``kaiming_uniform_(a=sqrt(5))`` for the weight, ``U(±1/sqrt(fan_in))`` for the bias), i.e.
    both ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``: the init of every layer the references create
    with ``nn.Linear`` after their pretrained weights are loaded."""
    bound = 1.0 / float(fan_in) ** 0.5

    def uniform(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return uniform, uniform


def _eager_sharding_possible() -> bool:
    """Shard parameters at creation only when a mesh and logical rules are both in context."""
    try:
        if not nnx.using_eager_sharding():
            return False
    except AttributeError:  # older flax: no eager sharding at all
        return False
    mesh = jax.sharding.get_abstract_mesh()
    return (not mesh.empty) and bool(core_spmd.get_logical_axis_rules())


def partitioned(init: Callable[..., Array], names: Sequence[str | None]) -> Callable[..., Array]:
    """Wrap an initializer so the created ``nnx.Param`` carries logical axis ``names``."""
    return nnx.with_partitioning(init, tuple(names), eager_sharding=_eager_sharding_possible())


def _cast(x: Array, dtype: Dtype | None) -> Array:
    return x if dtype is None else x.astype(dtype)


# ---------------------------------------------------------------------------------------------
# Basic layers
# ---------------------------------------------------------------------------------------------


class DenseGeneral(nnx.Module):
    """``y = einsum(x, kernel) + bias`` contracting the last ``len(in_shape)`` dims of ``x``.

    ``kernel`` has shape ``in_shape + out_shape``; ``bias`` has shape ``out_shape``. The
    contraction is a single ``dot_general`` (one GEMM), whatever the number of output dims.
    """

    def __init__(
        self,
        in_shape: int | Sequence[int],
        out_shape: int | Sequence[int],
        *,
        kernel_axes: Sequence[str | None],
        bias_axes: Sequence[str | None] | None = None,
        use_bias: bool = True,
        kernel_init: Callable[..., Array] = default_kernel_init,
        bias_init: Callable[..., Array] = zeros_init,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        precision: Any = None,
        rngs: nnx.Rngs,
    ):
        self.in_shape = (in_shape,) if isinstance(in_shape, int) else tuple(in_shape)
        self.out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
        kshape = self.in_shape + self.out_shape
        if len(kernel_axes) != len(kshape):
            raise ValueError(f"kernel_axes {kernel_axes} do not match kernel shape {kshape}")
        self.kernel = nnx.Param(partitioned(kernel_init, kernel_axes)(rngs.params(), kshape, param_dtype))
        if use_bias:
            if bias_axes is None:
                bias_axes = tuple(kernel_axes[len(self.in_shape):])
            self.bias = nnx.Param(partitioned(bias_init, bias_axes)(rngs.params(), self.out_shape, param_dtype))
        else:
            self.bias = nnx.data(None)
        self.dtype = dtype
        self.precision = precision

    def __call__(self, x: Array) -> Array:
        kernel = self.kernel[...]
        dtype = self.dtype or jnp.promote_types(x.dtype, kernel.dtype)
        x, kernel = x.astype(dtype), kernel.astype(dtype)
        n_in = len(self.in_shape)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        y = jax.lax.dot_general(x, kernel, (contract, ((), ())), precision=self.precision)
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


class LayerNorm(nnx.Module):
    """Layer normalisation over the last axis, statistics in float32 (two-pass variance)."""

    def __init__(
        self,
        dim: int,
        *,
        eps: float = 1e-12,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.scale = nnx.Param(partitioned(ones_init, (None,))(rngs.params(), (dim,), param_dtype))
        self.bias = nnx.Param(partitioned(zeros_init, (None,))(rngs.params(), (dim,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        out_dtype = self.dtype or x.dtype
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        xc = xf - mean
        var = jnp.mean(jnp.square(xc), axis=-1, keepdims=True)
        y = xc * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(out_dtype)


class Embed(nnx.Module):
    """Embedding table ``[num, dim]`` with optional HF-style ``padding_idx``.

    As in ``torch.nn.Embedding(padding_idx=p)``: row ``p`` is zero at init and receives no
    gradient, while the forward pass still reads the row's value (so a loaded non-zero row is
    used as is).
    """

    def __init__(
        self,
        num: int,
        dim: int,
        *,
        axes: Sequence[str | None] = ("vocab", "embed"),
        padding_idx: int | None = None,
        embedding_init: Callable[..., Array] = default_kernel_init,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if padding_idx is not None and not 0 <= padding_idx < num:
            raise ValueError(f"padding_idx {padding_idx} outside [0, {num})")

        def init(key, shape, dtype):
            table = embedding_init(key, shape, dtype)
            return table if padding_idx is None else table.at[padding_idx].set(0)

        self.embedding = nnx.Param(partitioned(init, axes)(rngs.params(), (num, dim), param_dtype))
        self.padding_idx = padding_idx
        self.num = num
        self.dtype = dtype

    def __call__(self, ids: Array) -> Array:
        x = jnp.take(self.embedding[...], ids, axis=0)
        if self.padding_idx is not None:
            x = jnp.where((ids == self.padding_idx)[..., None], jax.lax.stop_gradient(x), x)
        return _cast(x, self.dtype)


def _mix32(x: Array) -> Array:
    """A bijective 32-bit integer hash with low avalanche bias ("lowbias32", C. Wellons'
    hash-prospector): xorshift-multiply rounds, a few vector integer ops per word."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x21F0AAAD)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x735A2D97)
    return x ^ (x >> 15)


def counter_bits(key: Array, n: int) -> Array:
    """``n`` pseudo-random uint32 words from ``key``: two seed words drawn with ``jax.random``
    from the key, then a counter hashed twice (``mix(mix(i ^ s0) + s1)``).

    For dropout masks, not for cryptography or statistics: the words pass the mask tests
    (drop frequency, independence of neighbours, a fresh mask per key), and cost a fraction of
    ``jax.random.bits`` (threefry, about 20 rounds per word) on CPU.
    """
    if n >= 2**32:
        raise ValueError(f"counter_bits draws at most 2**32 - 1 words, asked for {n}")
    return _hashed_words(counter_seeds(key), jax.lax.iota(jnp.uint32, n))


def counter_seeds(key: Array) -> Array:
    """The two uint32 seed words :func:`counter_bits` draws from ``key``."""
    return jax.random.bits(key, (2,), jnp.uint32)


def _hashed_words(seeds: Array, counters: Array) -> Array:
    return _mix32(_mix32(counters ^ seeds[0]) + seeds[1])


def keep_mask_at(seeds: Array, index: Array, rate: float) -> tuple[Array, float]:
    """The elements at flat positions ``index`` (uint32, any shape) of the mask that
    :func:`keep_mask` draws for the key of ``seeds`` (:func:`counter_seeds`): element ``e`` is
    16-bit half ``e % 2`` (low half first) of word ``e // 2``. Lets a blocked computation draw
    its block of a large mask without materialising the whole mask."""
    words = _hashed_words(seeds, index >> 1)
    halves = jnp.where((index & 1) == 0, words & jnp.uint32(0xFFFF), words >> 16)
    threshold = _drop_threshold(rate)
    return halves >= jnp.uint32(threshold), (65536 - threshold) / 65536


def _drop_threshold(rate: float) -> int:
    """The 16-bit draw below which an element is dropped (``rate`` quantised to 1/65536)."""
    return min(max(int(round(rate * 65536)), 0), 65535)


def keep_mask(key: Array, shape: Sequence[int], rate: float) -> tuple[Array, float]:
    """Boolean keep mask with ``P(drop) = rate`` (to 1/65536) and the exact keep probability.

    Draws 16 bits per element, two per 32-bit word of :func:`counter_bits` (a hashed counter
    seeded from ``key``): the keep probability is exact to the 1/65536 rate quantum, and the
    random-number cost is a small part of the step on CPU, where threefry's is not (it was a
    fifth of the tiny BarcodeBERT step; docs/performance.md).
    """
    n = math.prod(shape)
    words = counter_bits(key, (n + 1) // 2)
    halves = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[:n].reshape(shape)
    threshold = _drop_threshold(rate)
    return halves >= jnp.uint16(threshold), (65536 - threshold) / 65536


class Dropout(nnx.Module):
    """Inverted dropout with the ``nnx.Dropout`` interface (``deterministic``, ``rngs``, ``rate``).

    ``model.train()``/``model.eval()`` toggle ``deterministic``; the call argument overrides it.
    Keys come from the module's own fork of the ``dropout`` RNG stream. The mask uses
    :func:`keep_mask` (16-bit draws; the scale is the exact inverse keep probability).
    """

    def __init__(
        self,
        rate: float,
        *,
        deterministic: bool = False,
        rng_collection: str = "dropout",
        rngs: nnx.Rngs | nnx.RngStream | None = None,
    ):
        self.rate = float(rate)
        self.deterministic = deterministic
        if isinstance(rngs, nnx.Rngs):
            self.rngs = rngs[rng_collection].fork()
        elif isinstance(rngs, nnx.RngStream):
            self.rngs = rngs.fork()
        else:
            self.rngs = nnx.data(None)

    def __call__(self, x: Array, *, deterministic: bool | None = None, rngs: Any = None) -> Array:
        deterministic = self.deterministic if deterministic is None else deterministic
        if deterministic or self.rate == 0.0:
            return x
        if self.rate >= 1.0:
            return jnp.zeros_like(x)
        keep, p = keep_mask(self.key(rngs), x.shape, self.rate)
        return jnp.where(keep, x * jnp.asarray(1.0 / p, x.dtype), jnp.zeros((), x.dtype))

    def key(self, rngs: Any = None) -> Array:
        """The next key of this dropout's stream (or of ``rngs``), as a call would draw it."""
        stream = rngs if rngs is not None else self.rngs
        if stream is None:
            raise ValueError("Dropout is not deterministic but has no rngs: build it with rngs=nnx.Rngs(...)")
        return stream() if callable(stream) else stream


class DropPath(nnx.Module):
    """Stochastic depth: drop the whole residual branch per example with probability ``rate``."""

    def __init__(self, rate: float = 0.0, *, deterministic: bool = False, rngs: nnx.Rngs | None = None):
        self.rate = float(rate)
        self.deterministic = deterministic
        self.rngs = rngs["dropout"].fork() if (rngs is not None and rate > 0) else nnx.data(None)

    def __call__(self, x: Array, *, deterministic: bool | None = None) -> Array:
        deterministic = self.deterministic if deterministic is None else deterministic
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.rngs(), keep, shape)
        return jnp.where(mask, x / keep, 0).astype(x.dtype)


def _activation(name: str) -> Callable[[Array], Array]:
    if name in ("gelu", "gelu_erf"):
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name in ("gelu_tanh", "gelu_new", "gelu_pytorch_tanh"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "relu":
        return jax.nn.relu
    raise ValueError(f"unknown activation {name!r}; use 'gelu' (erf), 'gelu_tanh' or 'relu'")


ATTENTION_IMPLS = ("auto", "einsum", "blocked", "xla", "cudnn")
# Scores per block of blocked attention, per batch shard: small enough to stay in a CPU's L2/L3
# (docs/performance.md, "Blocked attention").
BLOCK_SCORE_BYTES = 2 * 2**20


def resolve_attention_impl(impl: str, *, head_dim: int) -> str:
    """``'auto'`` is ``'blocked'`` on the CPU backend for heads of at most 64 dims and
    ``'einsum'`` otherwise. XLA:CPU runs many small batched dots several times slower than a few
    cache-sized ones; with 192-dim heads (BarcodeBERT 8-4-4) the dots are large enough already
    and blocking measured slower (docs/performance.md, "Blocked attention")."""
    if impl != "auto":
        return impl
    return "blocked" if jax.default_backend() == "cpu" and head_dim <= 64 else "einsum"


def set_attention_impl(model: nnx.Module, impl: str) -> None:
    """Sets ``attention_impl`` of every :class:`MultiHeadAttention` in ``model`` (e.g. a loaded
    model, to compare implementations on the same weights)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    for _, module in nnx.iter_modules(model):
        if isinstance(module, MultiHeadAttention):
            module.attention_impl = impl


def _batch_shards() -> int:
    """How many ways the batch is split in the enclosing mesh context (1 outside one)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    return math.prod(sizes.get(a, 1) for a in BATCH_AXES)


def block_records(batch: int, heads: int, tokens: int, shards: int = 1) -> int:
    """Records per block of :func:`blocked_attention`: the smallest divisor of ``batch`` that
    holds :data:`BLOCK_SCORE_BYTES` of float32 scores per shard and splits evenly over
    ``shards`` (``batch`` itself, one block, when none does)."""
    per_shard = max(1, BLOCK_SCORE_BYTES // (heads * tokens * tokens * 4))
    want = per_shard * shards
    for r in range(want, batch):
        if batch % r == 0 and r % shards == 0:
            return r
    return batch


def blocked_attention(q: Array, k: Array, v: Array, mask: Array | None, *, dropout: tuple[Array, float] | None = None,
                      records: int | None = None) -> Array:
    """Softmax attention computed a block of records at a time (``jax.lax.map``), the same
    numbers as the one-shot einsums of :class:`MultiHeadAttention`, forward and backward.

    ``q`` (already scaled), ``k``, ``v`` [B, T, H, Dh]; ``mask`` boolean broadcastable to
    [B, 1, 1, T] or None; ``dropout`` ``(seeds, rate)`` draws exactly the mask
    :class:`Dropout` would draw over the whole [B, H, T, T] probabilities (:func:`keep_mask_at`).
    Block ``i`` holds records ``i, i + n, i + 2n, ...`` (``n`` blocks): the batch's major factor,
    the one a mesh shards, stays whole inside each block. Each block's scores stay in cache,
    which on XLA:CPU makes the attention several times faster at BarcodeBERT's shapes. The
    backward pass (a custom VJP) recomputes each block's probabilities from q, k and the
    per-row log-sum-exp instead of storing the [B, H, T, T] probabilities.
    """
    b, t, h, _ = q.shape
    r = records or block_records(b, h, t, _batch_shards())
    mask = jnp.broadcast_to(jnp.ones((b, 1, 1, t), bool) if mask is None else mask, (b, 1, 1, t))
    seeds, rate = dropout if dropout is not None else (jnp.zeros((2,), jnp.uint32), 0.0)
    return _blocked(q, k, v, mask, seeds, float(rate), int(r))


def _split_blocks(x: Array, r: int) -> Array:
    """[B, ...] -> [B // r, r, ...]: block i holds records i, i + n, ... (n = B // r)."""
    return jnp.moveaxis(x.reshape(r, x.shape[0] // r, *x.shape[1:]), 1, 0)


def _join_blocks(x: Array) -> Array:
    """Inverse of :func:`_split_blocks`."""
    return jnp.moveaxis(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _over_blocks(fn: Callable, r: int, *arrays: Array):
    """``fn(i, *blocks)`` for every block ``i`` (sequentially), outputs joined back to [B, ...]."""
    n = arrays[0].shape[0] // r
    if n == 1:
        return fn(jnp.zeros((), jnp.int32), *arrays)
    out = jax.lax.map(lambda a: fn(*a), (jnp.arange(n, dtype=jnp.int32), *(_split_blocks(x, r) for x in arrays)))
    return jax.tree.map(_join_blocks, out)


def _block_probs(i, qb, kb, mb, seeds, rate: float, n: int):
    """A block's softmax probabilities (float32), its per-row log-sum-exp, and the dropout
    factor (``keep / p``, or None without dropout)."""
    r, t, h, _ = qb.shape
    scores = jnp.einsum("bqhd,bkhd->bhqk", qb, kb, preferred_element_type=jnp.float32)
    scores = jnp.where(mb, scores, jnp.finfo(jnp.float32).min)
    top = jax.lax.stop_gradient(scores.max(-1, keepdims=True))
    e = jnp.exp(scores - top)
    total = e.sum(-1, keepdims=True)
    probs = e / total
    return probs, top + jnp.log(total), _block_dropout(i, r, h, t, seeds, rate, n)


def _block_dropout(i, r: int, h: int, t: int, seeds, rate: float, n: int):
    """Block ``i``'s dropout factor over its [r, h, t, t] probabilities (``keep / p``; None
    without dropout): the elements of the whole batch's mask at the block's records."""
    if rate == 0.0:
        return None
    rec = (jnp.arange(r, dtype=jnp.uint32) * jnp.uint32(n) + i.astype(jnp.uint32))[:, None, None, None]
    iota = functools.partial(jax.lax.broadcasted_iota, jnp.uint32, (1, h, t, t))
    keep, p = keep_mask_at(seeds, ((rec * h + iota(1)) * t + iota(2)) * t + iota(3), rate)
    return jnp.where(keep, jnp.float32(1.0 / p), jnp.float32(0.0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _blocked(q, k, v, mask, seeds, rate: float, r: int):
    return _blocked_fwd(q, k, v, mask, seeds, rate, r)[0]


def _blocked_fwd(q, k, v, mask, seeds, rate: float, r: int):
    n = q.shape[0] // r

    def block(i, qb, kb, vb, mb):
        probs, lse, drop = _block_probs(i, qb, kb, mb, seeds, rate, n)
        if drop is not None:
            probs = probs * drop
        return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(vb.dtype), vb), lse

    out, lse = _over_blocks(block, r, q, k, v, mask)
    return out, (q, k, v, mask, seeds, lse)


def _blocked_bwd(rate: float, r: int, res, g):
    q, k, v, mask, seeds, lse = res
    n = q.shape[0] // r

    def block(i, qb, kb, vb, mb, lb, gb):
        scores = jnp.einsum("bqhd,bkhd->bhqk", qb, kb, preferred_element_type=jnp.float32)
        probs = jnp.exp(jnp.where(mb, scores, jnp.finfo(jnp.float32).min) - lb)
        dprobs = jnp.einsum("bqhd,bkhd->bhqk", gb, vb, preferred_element_type=jnp.float32)
        used = probs
        drop = _block_dropout(i, qb.shape[0], qb.shape[2], qb.shape[1], seeds, rate, n)
        if drop is not None:
            used, dprobs = probs * drop, dprobs * drop
        dv = jnp.einsum("bhqk,bqhd->bkhd", used.astype(gb.dtype), gb)
        dscores = probs * (dprobs - (dprobs * probs).sum(-1, keepdims=True))
        dscores = jnp.where(mb, dscores, 0.0).astype(qb.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", dscores, kb), jnp.einsum("bhqk,bqhd->bkhd", dscores, qb), dv

    dq, dk, dv = _over_blocks(block, r, q, k, v, mask, lse, g)
    return dq, dk, dv, None, None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


class MultiHeadAttention(nnx.Module):
    """Self-attention with one fused q/k/v projection.

    Parameters: ``qkv.kernel`` [embed, 3, heads, kv], ``qkv.bias`` [3, heads, kv],
    ``out.kernel`` [heads, kv, embed], ``out.bias`` [embed]. (HF stores q, k and v as three
    ``Linear`` layers; the converters split and join them.) Softmax runs in float32.

    ``attention_impl``: ``'einsum'`` (explicit scores in one shot), ``'blocked'``
    (:func:`blocked_attention`: the same numbers a cache-sized block of records at a time),
    ``'auto'`` (default: blocked on CPU for heads of up to 64 dims, einsum otherwise;
    :func:`resolve_attention_impl`),
    or ``'xla'`` / ``'cudnn'`` for ``jax.nn.dot_product_attention`` with that implementation
    (cuDNN flash attention on NVIDIA GPUs: bf16/fp16 only, and jax 0.11 rejects sequence lengths
    it has no kernel for, e.g. ViT-B/16's 197 tokens), used whenever attention dropout is
    inactive (eval, or rate 0); with attention dropout active the einsum path runs.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qkv_bias: bool = True,
        attention_dropout: float = 0.0,
        attention_impl: str = "auto",
        kernel_init: Callable[..., Array] = default_kernel_init,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not a multiple of the number of heads {num_heads}")
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        kw = dict(kernel_init=kernel_init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv = DenseGeneral(
            dim, (3, num_heads, self.head_dim), kernel_axes=("embed", None, "heads", "kv"),
            use_bias=qkv_bias, **kw)
        self.out = DenseGeneral(
            (num_heads, self.head_dim), dim, kernel_axes=("heads", "kv", "embed"), **kw)
        self.attn_dropout = Dropout(attention_dropout, rngs=rngs)
        self.attention_impl = attention_impl
        self.dtype = dtype

    def __call__(self, x: Array, mask: Array | None = None, *, deterministic: bool | None = None) -> Array:
        """``x`` [B, T, D]; ``mask`` boolean, broadcastable to [B, heads, T, T] (True = attend)."""
        qkv = self.qkv(x)  # [B, T, 3, H, Dh]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        scale = 1.0 / math.sqrt(self.head_dim)
        det = self.attn_dropout.deterministic if deterministic is None else deterministic
        impl = resolve_attention_impl(self.attention_impl, head_dim=self.head_dim)
        no_dropout = det or self.attn_dropout.rate == 0.0
        if impl in ("xla", "cudnn") and no_dropout:
            ctx = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=impl)
            return self.out(ctx)
        q = q * jnp.asarray(scale, q.dtype)
        if impl == "blocked":
            drop = None if no_dropout else (counter_seeds(self.attn_dropout.key()), self.attn_dropout.rate)
            return self.out(blocked_attention(q, k, v, mask, dropout=drop))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        if mask is not None:  # same as HF's additive finfo.min mask
            scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        probs = self.attn_dropout(probs, deterministic=deterministic)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return self.out(ctx)


class Mlp(nnx.Module):
    """``fc2(act(fc1(x)))``: fc1 [embed, mlp], fc2 [mlp, embed]."""

    def __init__(
        self,
        dim: int,
        mlp_dim: int,
        *,
        activation: str = "gelu",
        kernel_init: Callable[..., Array] = default_kernel_init,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(kernel_init=kernel_init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = DenseGeneral(dim, mlp_dim, kernel_axes=("embed", "mlp"), **kw)
        self.fc2 = DenseGeneral(mlp_dim, dim, kernel_axes=("mlp", "embed"), **kw)
        self.activation = activation

    def __call__(self, x: Array) -> Array:
        return self.fc2(_activation(self.activation)(self.fc1(x)))


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """Shape and regularisation of one transformer block."""

    dim: int
    num_heads: int
    mlp_dim: int
    pre_norm: bool = False
    layer_norm_eps: float = 1e-12
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation: str = "gelu"
    qkv_bias: bool = True
    attention_impl: str = "auto"
    initializer_range: float = 0.02
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32


class TransformerBlock(nnx.Module):
    """Post-LN (BERT) or pre-LN (ViT) transformer block.

    Submodules: ``attn`` (MultiHeadAttention), ``norm1`` (after attention in post-LN; before it
    in pre-LN), ``mlp`` (Mlp), ``norm2``, dropout and (pre-LN only) stochastic depth.
    """

    def __init__(self, cfg: BlockConfig, *, drop_path: float = 0.0, rngs: nnx.Rngs):
        init = nnx.initializers.normal(cfg.initializer_range)
        common = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.attn = MultiHeadAttention(
            cfg.dim, cfg.num_heads, qkv_bias=cfg.qkv_bias, attention_dropout=cfg.attention_dropout,
            attention_impl=cfg.attention_impl, kernel_init=init, **common)
        self.norm1 = LayerNorm(cfg.dim, eps=cfg.layer_norm_eps, **common)
        self.mlp = Mlp(cfg.dim, cfg.mlp_dim, activation=cfg.activation, kernel_init=init, **common)
        self.norm2 = LayerNorm(cfg.dim, eps=cfg.layer_norm_eps, **common)
        self.dropout = Dropout(cfg.dropout, rngs=rngs)
        self.drop_path = DropPath(drop_path, rngs=rngs)
        self.pre_norm = cfg.pre_norm

    def __call__(self, x: Array, mask: Array | None = None, *, deterministic: bool | None = None) -> Array:
        """``mask``: boolean [B, 1, 1, T] key mask (True = attend) or None."""
        det = dict(deterministic=deterministic)
        if self.pre_norm:
            y = self.dropout(self.attn(self.norm1(x), mask, **det), **det)
            x = x + self.drop_path(y, **det)
            y = self.dropout(self.mlp(self.norm2(x)), **det)
            return x + self.drop_path(y, **det)
        x = self.norm1(x + self.dropout(self.attn(x, mask, **det), **det))
        return self.norm2(x + self.dropout(self.mlp(x), **det))


class Encoder(nnx.Module):
    """A stack of ``num_layers`` transformer blocks (``layers[i]``).

    ``remat=True`` recomputes each block's activations in the backward pass (``nnx.remat``).
    ``scan=True`` stores the blocks stacked (``layers`` is one block whose parameters have a
    leading ``layers`` axis) and runs them with ``nnx.scan``: the compiled program holds one block,
    so compile time and program size do not grow with depth. Same numbers as the unrolled stack
    given the same parameters (:func:`copy_layers` moves them between the two layouts).
    ``drop_path`` is the stochastic-depth rate of the last block (linearly increasing from 0).
    """

    def __init__(
        self,
        cfg: BlockConfig,
        num_layers: int,
        *,
        drop_path: float = 0.0,
        remat: bool = False,
        scan: bool = False,
        rngs: nnx.Rngs,
    ):
        self.remat, self.scan, self.num_layers = remat, scan, num_layers
        if scan:
            if drop_path:
                raise ValueError("scan over layers needs drop_path=0 (stochastic depth varies per layer)")
            self.layers = _stacked_blocks(cfg, num_layers, rngs)
        else:
            rates = [drop_path * i / max(num_layers - 1, 1) for i in range(num_layers)]
            self.layers = nnx.List([TransformerBlock(cfg, drop_path=r, rngs=rngs) for r in rates])

    def __call__(
        self,
        x: Array,
        mask: Array | None = None,
        *,
        deterministic: bool | None = None,
        return_all: bool = False,
    ) -> Array | tuple[Array, list[Array]]:
        """``x`` [B, T, D]; ``mask`` boolean [B, T] (True = real token) or None."""
        if mask is not None:
            mask = jnp.asarray(mask)
            if mask.ndim != 2:
                raise ValueError(f"attention mask must be [batch, tokens], got shape {mask.shape}")
            mask = mask.astype(bool)[:, None, None, :]
        hidden = []

        def apply(block, h, b):
            return block(h, b, deterministic=deterministic)

        fn = nnx.remat(apply) if self.remat else apply
        # Keep activations split over the batch mesh axes between blocks (no-op without a mesh).
        # Without it, under FSDP (parameters sharded on the same mesh axis as the batch) XLA may
        # all-gather the whole batch: BarcodeBERT paper on fsdp=8 needed 32 GiB of temporaries
        # per device instead of 5 GiB (python -m bioscan_jax.plan).
        x = constrain(x, ("batch", None, None))
        if self.scan:
            @nnx.scan(in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 0))
            def body(block, h):
                h = constrain(fn(block, h, mask), ("batch", None, None))
                return h, (h if return_all else None)

            x, stacked = body(self.layers, x)
            return (x, list(stacked)) if return_all else x
        for block in self.layers:
            x = constrain(fn(block, x, mask), ("batch", None, None))
            if return_all:
                hidden.append(x)
        return (x, hidden) if return_all else x


def layer_params(encoder: Encoder) -> list[dict[str, Any]]:
    """The blocks' parameters as one pure dict per layer, from either layout."""
    if not encoder.scan:
        return [nnx.state(block, nnx.Param).to_pure_dict() for block in encoder.layers]
    stacked = nnx.state(encoder.layers, nnx.Param).to_pure_dict()
    return [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(encoder.num_layers)]


def copy_layers(src: Encoder, dst: Encoder) -> None:
    """Copy the blocks' parameters of ``src`` into ``dst`` in place; either may be scanned, so a
    checkpoint or converted model in one layout loads into the other."""
    if src.num_layers != dst.num_layers:
        raise ValueError(f"cannot copy {src.num_layers} layers into an encoder of {dst.num_layers}")
    per_layer = layer_params(src)
    if dst.scan:
        state = nnx.state(dst.layers, nnx.Param)
        state.replace_by_pure_dict(jax.tree.map(lambda *a: jnp.stack(a), *per_layer))
        nnx.update(dst.layers, state)
        return
    for block, params in zip(dst.layers, per_layer):
        state = nnx.state(block, nnx.Param)
        state.replace_by_pure_dict(params)
        nnx.update(block, state)


def _is_unrolled(node: Any) -> bool:
    """Whether a pure-dict ``layers`` node is the unrolled layout (keys 0..n-1, int or digit str)."""
    return isinstance(node, dict) and bool(node) and all(str(k).isdigit() for k in node)


def match_layer_layout(pure: Any, like: Any) -> Any:
    """``pure`` (a nested dict of parameters, e.g. a converted or pretrained encoder) with every
    :class:`Encoder`'s ``layers`` in the layout of ``like`` (the target's nested dict): unrolled
    blocks ``{0: {...}, 1: {...}}`` are stacked along a new first axis for a scanned encoder, and a
    stacked block is split per layer for an unrolled one. Other entries pass through unchanged
    (a shape or path mismatch is left for the caller's check to report)."""
    if not isinstance(pure, dict) or not isinstance(like, dict):
        return pure
    out = {}
    for key, value in pure.items():
        target = like.get(key)
        if target is None and str(key).isdigit():  # restored checkpoints name layer indices as strings
            target = like.get(int(key), like.get(str(key)))
        if key == "layers" and isinstance(target, dict) and isinstance(value, dict):
            if _is_unrolled(value) and not _is_unrolled(target):
                blocks = [value[k] for k in sorted(value, key=lambda k: int(k))]
                value = jax.tree.map(lambda *a: np.stack([np.asarray(x) for x in a]), *blocks)
            elif _is_unrolled(target) and not _is_unrolled(value):
                n = len(target)
                value = {i: jax.tree.map(lambda a, i=i: np.asarray(a)[i], value) for i in range(n)}
        out[key] = match_layer_layout(value, target) if target is not None else value
    return out


def _stacked_blocks(cfg: BlockConfig, num_layers: int, rngs: nnx.Rngs) -> TransformerBlock:
    """``num_layers`` blocks as one block whose variables have a leading ``layers`` axis (logical
    name ``layers``), for ``nnx.scan``: one compiled block body whatever the depth."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
        return TransformerBlock(cfg, rngs=rngs)

    return make(rngs)


def masked_mean(x: Array, mask: Array | None) -> Array:
    """Mean over axis 1 of ``x`` [B, T, D] restricted to ``mask`` [B, T]; float32 result."""
    x = x.astype(jnp.float32)
    if mask is None:
        return jnp.mean(x, axis=1)
    m = jnp.asarray(mask).astype(jnp.float32)[..., None]
    return jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


class BertEmbeddings(nnx.Module):
    """BERT input embeddings: word + absolute position + token type → LayerNorm → dropout.

    Tables: ``word`` [vocab, embed] (row ``pad_token_id`` zero and frozen, like HF),
    ``position`` [None, embed], ``token_type`` [None, embed].
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        *,
        max_position: int = 512,
        type_vocab_size: int = 2,
        pad_token_id: int | None = 0,
        layer_norm_eps: float = 1e-12,
        dropout: float = 0.1,
        initializer_range: float = 0.02,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        init = nnx.initializers.normal(initializer_range)
        kw = dict(embedding_init=init, param_dtype=param_dtype, rngs=rngs)
        self.word = Embed(vocab_size, dim, axes=("vocab", "embed"), padding_idx=pad_token_id, **kw)
        self.position = Embed(max_position, dim, axes=(None, "embed"), **kw)
        self.token_type = Embed(type_vocab_size, dim, axes=(None, "embed"), **kw)
        self.norm = LayerNorm(dim, eps=layer_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dropout = Dropout(dropout, rngs=rngs)
        self.max_position = max_position

    def __call__(
        self,
        input_ids: Array,
        token_type_ids: Array | None = None,
        *,
        deterministic: bool | None = None,
    ) -> Array:
        t = input_ids.shape[1]
        if t > self.max_position:
            raise ValueError(f"sequence of {t} tokens exceeds max_position_embeddings={self.max_position}")
        x = self.word(input_ids) + self.position.embedding[:t][None]
        if token_type_ids is None:
            x = x + self.token_type.embedding[0]
        else:
            x = x + self.token_type(token_type_ids)
        return self.dropout(self.norm(x), deterministic=deterministic)


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The fields of a BERT encoder (HF ``BertConfig`` names where they exist), shared by the
    k-mer BERT (:class:`bioscan_jax.models.kmer_bert.KmerBertConfig`, which derives
    ``vocab_size`` from ``k``) and the taxonomy-text tower (:class:`bioscan_jax.models.text.TextConfig`)."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    initializer_range: float = 0.02
    vocab_size: int | None = None
    hidden_act: str = "gelu"  # exact erf, as HF "gelu"
    attention_impl: str = "auto"  # see MultiHeadAttention
    dtype: Any = None  # compute dtype (None: float32 params → float32 compute)
    param_dtype: Any = jnp.float32
    remat: bool = False
    scan_layers: bool = False  # stacked blocks run with nnx.scan (Encoder scan=True)

    def block_config(self) -> BlockConfig:
        """The post-LN transformer block of this encoder."""
        return BlockConfig(
            dim=self.hidden_size,
            num_heads=self.num_heads,
            mlp_dim=self.intermediate_size,
            pre_norm=False,
            layer_norm_eps=self.layer_norm_eps,
            dropout=self.dropout_rate,
            attention_dropout=self.attention_dropout_rate,
            activation=self.hidden_act,
            attention_impl=self.attention_impl,
            initializer_range=self.initializer_range,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )


class BertEncoder(nnx.Module):
    """BERT's token embeddings → post-LN transformer encoder, built from a :class:`BertConfig`.

    The one encoder of the k-mer BERT (:class:`bioscan_jax.models.kmer_bert.KmerBert`) and the
    taxonomy-text tower (:class:`bioscan_jax.models.text.TextEncoder`); they differ only in the
    vocabulary their config names and in what they return. Parameters: ``embeddings``,
    ``encoder`` (the layout the checkpoint converters map HF BERT onto).
    """

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.config = c = config
        self.embeddings = BertEmbeddings(
            c.vocab_size,
            c.hidden_size,
            max_position=c.max_position_embeddings,
            type_vocab_size=c.type_vocab_size,
            pad_token_id=c.pad_token_id,
            layer_norm_eps=c.layer_norm_eps,
            dropout=c.dropout_rate,
            initializer_range=c.initializer_range,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            rngs=rngs,
        )
        self.encoder = Encoder(c.block_config(), c.num_layers, remat=c.remat, scan=c.scan_layers, rngs=rngs)

    def encode(self, input_ids: Array, attention_mask: Array | None = None, *, token_type_ids: Array | None = None,
               deterministic: bool | None = None, return_all: bool = False) -> tuple[Array, dict[str, Any]]:
        """``(last hidden [B, T, D], aux)``: ``aux['hidden']`` the same, ``aux['pooled']`` its masked
        mean over ``attention_mask`` [B, D]; with ``return_all`` also ``aux['hidden_states']``."""
        x = self.embeddings(input_ids, token_type_ids, deterministic=deterministic)
        if return_all:
            x, all_hidden = self.encoder(x, attention_mask, deterministic=deterministic, return_all=True)
        else:
            x = self.encoder(x, attention_mask, deterministic=deterministic)
        aux: dict[str, Any] = {"hidden": x, "pooled": masked_mean(x, attention_mask)}
        if return_all:
            aux["hidden_states"] = all_hidden
        return x, aux
