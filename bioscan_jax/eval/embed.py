"""Embedding a dataset with a model: one jitted forward over fixed-size, batch-sharded batches."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from bioscan_jax.train import mesh as mesh_lib

EmbedFn = Callable[[nnx.Module, Mapping[str, jax.Array]], jax.Array]


def pad_batch(batch: Mapping[str, np.ndarray], size: int) -> tuple[dict[str, np.ndarray], int]:
    """Pads every array of ``batch`` along axis 0 to ``size`` rows (repeating row 0); returns
    the padded batch and the number of real rows."""
    n = len(next(iter(batch.values())))
    if n > size:
        raise ValueError(f"batch of {n} rows is larger than the embedding batch size {size}")
    if n == size:
        return dict(batch), n
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        pad = np.repeat(v[:1], size - n, axis=0)
        out[k] = np.concatenate([v, pad], axis=0)
    return out, n


def embed_batches(
    model: nnx.Module,
    batches: Iterable[Mapping[str, np.ndarray]],
    embed_fn: EmbedFn,
    *,
    mesh: Mesh,
    batch_size: int,
    keep: tuple[str, ...] = (),
) -> dict[str, np.ndarray]:
    """Runs ``embed_fn(model, batch)`` (jitted, model in eval mode) over ``batches``.

    Batches are padded to ``batch_size`` rows so one compiled program serves every batch; padded
    rows are dropped again. Returns ``{'embedding': [N, D] float32}`` plus the arrays named in
    ``keep`` (e.g. ``'label'``), concatenated over batches. Single-process.
    """
    if batch_size % mesh_lib.batch_axis_size(mesh):
        raise ValueError(
            f"embedding batch size {batch_size} must be divisible by the mesh's batch axes "
            f"(data*fsdp = {mesh_lib.batch_axis_size(mesh)})")
    model.eval()
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, batch):
        m = nnx.merge(graphdef, state)
        return embed_fn(m, batch).astype(jnp.float32)

    chunks: list[np.ndarray] = []
    kept: dict[str, list[np.ndarray]] = {k: [] for k in keep}
    for local in batches:
        arrays = {k: v for k, v in local.items() if np.asarray(v).dtype.kind in "biuf"}
        padded, n = pad_batch(arrays, batch_size)
        out = forward(state, mesh_lib.to_global_batch(padded, mesh))
        chunks.append(np.asarray(jax.device_get(out))[:n])
        for k in keep:
            kept[k].append(np.asarray(local[k])[:n])
    if not chunks:
        raise ValueError("no batches to embed (empty split?)")
    result = {"embedding": np.concatenate(chunks)}
    result.update({k: np.concatenate(v) for k, v in kept.items()})
    return result
