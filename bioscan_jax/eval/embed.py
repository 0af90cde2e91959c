"""Embedding a dataset with a model: one jitted forward over fixed-size, batch-sharded batches,
each process feeding its own shard, results gathered on every process in source order."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, PartitionSpec as P

from bioscan_jax.data.pipeline import ROW
from bioscan_jax import sharding as mesh_lib

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


@functools.lru_cache(maxsize=8)  # an entry holds embed_fn (and what it refers to)
def _jitted_forward(graphdef, embed_fn: EmbedFn, out_sharding):
    """The jitted ``embed_fn`` of one model structure: the same model definition and function
    (evaluators call :func:`embed_batches` at every epoch) reuse one compiled program."""

    def forward(state, batch):
        return embed_fn(nnx.merge(graphdef, state), batch).astype(jnp.float32)

    return jax.jit(forward, out_shardings=out_sharding)


def _any_process_has_a_batch(has_batch: bool, had_batch: bool, processes: int) -> bool:
    """Whether the loop goes on: some process still has a batch. With several processes all
    stop together, and a process that never had a record is an error on every process."""
    if processes == 1:
        return has_batch
    # [has a batch now, has seen a batch] per process: stop together, fail together.
    flags = mesh_lib.gather_same_shape(np.asarray([has_batch, has_batch or had_batch], np.int32))
    if not flags[:, 0].any():
        return False
    if not flags[:, 1].all():
        raise ValueError(f"processes {np.flatnonzero(flags[:, 1] == 0).tolist()} have no records to embed "
                         f"while others do: the split is smaller than the number of processes")
    return True


def embed_batches(
    model: nnx.Module,
    batches: Iterable[Mapping[str, np.ndarray]],
    embed_fn: EmbedFn,
    *,
    mesh: Mesh,
    batch_size: int,
    keep: tuple[str, ...] = (),
    order_by: tuple[str, ...] = (ROW,),
) -> dict[str, np.ndarray]:
    """``embed_fn(model, batch)`` (jitted, model in eval mode) over a split, in one or many processes.

    Each process feeds only its own records (build the pipeline with ``shard='jax'`` and
    ``drop_remainder=False``), at most ``batch_size // process_count`` rows per batch; the forward
    runs on the global batch over ``mesh``. Batches are padded to a fixed size so one compiled
    program serves them all, and padded rows are dropped again. Processes may run out at different
    times: the ones that did feed padding until all are done. With one process nothing is gathered.

    Args:
      model: the same model on every process, in host memory or on devices; it is replicated
        over ``mesh`` unless its arrays already span it.
      embed_fn: ``(model, batch) -> [B, ...]``.
      batch_size: the global batch, a multiple of the mesh's batch shards and of the process count.
      keep: batch columns to return alongside the embeddings (numbers or strings).
      order_by: columns that give the source order (e.g. ``('split_id', ROW)``); when the batches
        carry them (evaluation pipelines carry :data:`ROW`), rows are returned in that order, so
        the result does not depend on the number of processes.

    Returns:
      ``{'embedding': [N, ...] float32, **keep}`` over every record of every process, the same on
      every process.
    """
    processes = jax.process_count()
    shards = mesh_lib.batch_axis_size(mesh)
    if batch_size % shards or batch_size % processes:
        raise ValueError(f"embedding batch size {batch_size} must be divisible by the mesh's batch axes "
                         f"(data*fsdp = {shards}) and by the {processes} processes")
    local_size = batch_size // processes
    model.eval()
    graphdef, state = nnx.split(model)
    state = mesh_lib.replicate(state, mesh)

    forward = _jitted_forward(graphdef, embed_fn, mesh_lib.batch_sharding(mesh))
    columns = tuple(dict.fromkeys((*keep, *order_by)))
    chunks: list[np.ndarray] = []
    kept: dict[str, list[np.ndarray]] = {k: [] for k in columns}
    template: dict[str, np.ndarray] | None = None
    iterator = iter(batches)
    while True:
        local = next(iterator, None)
        if not _any_process_has_a_batch(local is not None, template is not None, processes):
            break
        if local is not None:
            arrays = {k: np.asarray(v) for k, v in local.items() if np.asarray(v).dtype.kind in "biuf"}
            template = arrays
            padded, n = pad_batch(arrays, local_size)
        else:  # this process is done, others are not: feed one padded batch of nothing
            padded, n = pad_batch({k: v[:1] for k, v in template.items()}, local_size)
            n = 0
        out = forward(state, mesh_lib.to_global_batch(padded, mesh))
        mine = multihost_utils.global_array_to_host_local_array(out, mesh, P(mesh_lib.BATCH_AXES))
        chunks.append(np.asarray(mine)[:n])
        if local is not None:
            for k in columns:
                if k in local:
                    kept[k].append(np.asarray(local[k])[:n])
                elif k in keep:
                    raise KeyError(f"embed_batches: keep={k!r} is not a column of the batches ({sorted(local)})")
    if not chunks:
        raise ValueError("no batches to embed (empty split?)")
    result = {"embedding": mesh_lib.allgather_rows(np.concatenate(chunks))}
    for k in columns:
        if kept[k] or k in keep:
            result[k] = mesh_lib.allgather_rows(np.concatenate(kept[k]) if kept[k] else np.zeros((0,), np.int32))
    if all(k in result for k in order_by) and order_by:
        order = np.lexsort([result[k] for k in reversed(order_by)])
        result = {k: v[order] for k, v in result.items()}
    return {k: v for k, v in result.items() if k == "embedding" or k in keep}
