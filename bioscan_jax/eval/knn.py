"""Exact cosine nearest-neighbour search as a jitted, blockwise matmul + ``top_k``.

Queries are processed ``query_chunk`` rows at a time, and for each block the keys are scanned
``key_chunk`` rows at a time; the running top-k of a query block is merged with the top-k of
each key block. Peak working memory is ``O(query_chunk * key_chunk)`` on top of the inputs,
so key sets of millions of records fit.

Mesh use: the functions are pure ``jnp``. The query axis is laid out so that a query array
sharded over its rows (e.g. ``P(('data', 'fsdp'))``) stays sharded: each scan step handles a
strided block of ``query_chunk`` queries drawn evenly from every shard. Keys are read whole by
every step (replicate them, or let the partitioner gather them).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    x = jnp.asarray(x)
    norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True))
    return (x / jnp.maximum(norm, eps)).astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("k", "query_chunk", "key_chunk", "normalize"))
def _nearest_keys(queries, keys, key_mask, *, k, query_chunk, key_chunk, normalize):
    n_queries, dim = queries.shape
    n_keys = keys.shape[0]
    if normalize:
        queries, keys = l2_normalize(queries), l2_normalize(keys)
    # Masked keys become zero rows (no NaN leaks into the products) and score -inf.
    keys = jnp.where(key_mask[:, None], keys, jnp.zeros((), keys.dtype))

    q_blocks = -(-n_queries // query_chunk)
    k_blocks = -(-n_keys // key_chunk)
    queries = jnp.pad(queries, ((0, q_blocks * query_chunk - n_queries), (0, 0)))
    # Row r = i * q_blocks + j goes to block j, slot i: a row-sharded array keeps its sharding.
    queries = queries.reshape(query_chunk, q_blocks, dim).transpose(1, 0, 2)
    key_pad = k_blocks * key_chunk - n_keys
    keys = jnp.pad(keys, ((0, key_pad), (0, 0))).reshape(k_blocks, key_chunk, dim)
    valid = jnp.pad(key_mask, (0, key_pad)).reshape(k_blocks, key_chunk)
    offsets = jnp.arange(k_blocks, dtype=jnp.int32) * key_chunk
    k_block = min(k, key_chunk)

    def search_block(q):
        def scan_keys(carry, xs):
            best_sims, best_idx = carry
            key_c, valid_c, offset = xs
            sims = jnp.einsum("qd,kd->qk", q, key_c, preferred_element_type=jnp.float32)
            sims = jnp.where(valid_c[None, :], sims, -jnp.inf)
            block_sims, block_idx = jax.lax.top_k(sims, k_block)
            # Running results first: on equal similarity the lower key index wins.
            sims = jnp.concatenate([best_sims, block_sims], axis=1)
            idx = jnp.concatenate([best_idx, block_idx.astype(jnp.int32) + offset], axis=1)
            best_sims, pos = jax.lax.top_k(sims, k)
            return (best_sims, jnp.take_along_axis(idx, pos, axis=1)), None

        init = (
            jnp.full((q.shape[0], k), -jnp.inf, jnp.float32),
            jnp.full((q.shape[0], k), -1, jnp.int32),
        )
        (sims, idx), _ = jax.lax.scan(scan_keys, init, (keys, valid, offsets))
        return idx, sims

    idx, sims = jax.lax.map(search_block, queries)  # [q_blocks, query_chunk, k]
    idx = idx.transpose(1, 0, 2).reshape(-1, k)[:n_queries]
    sims = sims.transpose(1, 0, 2).reshape(-1, k)[:n_queries]
    return idx, sims


def nearest_keys(
    queries: Array | np.ndarray,
    keys: Array | np.ndarray,
    k: int = 5,
    *,
    key_mask: Array | np.ndarray | None = None,
    query_chunk: int = 1024,
    key_chunk: int = 16384,
    normalize: bool = True,
) -> tuple[Array, Array]:
    """The ``k`` most cosine-similar keys of every query, best first.

    Args:
      queries: ``[Q, D]`` query embeddings (finite; a non-finite row gets unspecified
        neighbours, see :func:`bioscan_jax.eval.retrieval.evaluate_retrieval` for the counting).
      keys: ``[K, D]`` key embeddings.
      k: neighbours per query; at most the number of usable keys.
      key_mask: optional ``[K]`` bool, ``False`` = never return this key (e.g. NaN embeddings).
      query_chunk: queries per block (clipped to ``Q``).
      key_chunk: keys per block (clipped to ``K``).
      normalize: L2-normalise both sides first (cosine similarity); ``False`` = inner product.

    Returns:
      ``(indices [Q, k] int32, similarities [Q, k] float32)``. Equal similarities resolve to
      the lower key index.
    """
    queries, keys = jnp.asarray(queries), jnp.asarray(keys)
    if queries.ndim != 2 or keys.ndim != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"queries and keys must be [N, D] with one D, got {queries.shape} and {keys.shape}")
    if queries.shape[0] == 0:
        raise ValueError("nearest_keys: the query set is empty")
    if key_mask is None:
        key_mask = jnp.ones((keys.shape[0],), bool)
        n_usable = keys.shape[0]
    else:
        key_mask = jnp.asarray(key_mask, bool)
        if key_mask.shape != (keys.shape[0],):
            raise ValueError(f"key_mask must have shape ({keys.shape[0]},), got {key_mask.shape}")
        n_usable = int(jnp.sum(key_mask))
    if not 1 <= k <= n_usable:
        raise ValueError(f"k={k} must be between 1 and the number of usable keys ({n_usable})")
    return _nearest_keys(
        queries,
        keys,
        key_mask,
        k=k,
        query_chunk=max(1, min(query_chunk, queries.shape[0])),
        key_chunk=max(1, min(key_chunk, keys.shape[0])),
        normalize=normalize,
    )
