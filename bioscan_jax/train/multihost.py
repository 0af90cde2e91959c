"""Multi-process helpers: config agreement at start-up, gathering per-process results.

In a multi-process run (a TPU pod, several GPU hosts, or ``python -m bioscan_jax.launch``) every
process runs the same program on its own shard of the data. Three things then need care:

* **the same config everywhere** — :func:`assert_same_config` compares a fingerprint of the
  config across processes right after start-up and raises on every process when they differ
  (different flags, a stale config file on one host), instead of training a silently
  inconsistent model;
* **results of the whole dataset, not of one host's shard** — :func:`allgather_rows`
  concatenates per-process arrays of different lengths (numbers or strings) in process order;
* **embedding a split** — :func:`embed_batches` is the multi-process form of
  :func:`bioscan_jax.eval.embed.embed_batches`: each process feeds only *its* records (a
  pipeline built with ``shard='jax'``), the forward pass runs on the global batch, and the
  embeddings (plus ``keep`` columns) of all processes are gathered on every process.

With one process every function reduces to its single-process meaning (no collectives).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bioscan_jax.eval.embed import pad_batch
from bioscan_jax.train import mesh as mesh_lib

EmbedFn = Callable[[nnx.Module, Mapping[str, jax.Array]], jax.Array]


class ConfigMismatchError(RuntimeError):
    """The processes of one run were started with different configs."""


# ----------------------------------------------------------------------------- config


def config_text(config: Any) -> str:
    """A canonical text form of a config (sorted-key JSON where possible) for fingerprinting."""
    if hasattr(config, "to_json_best_effort"):
        return config.to_json_best_effort(sort_keys=True)
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    try:
        return json.dumps(config, sort_keys=True, default=repr)
    except TypeError:
        return repr(config)


def config_fingerprint(config: Any) -> str:
    """Hex SHA-256 of :func:`config_text` (16 bytes, 32 hex digits)."""
    return hashlib.sha256(config_text(config).encode()).hexdigest()[:32]


def assert_same_config(config: Any, *, what: str = "config") -> str:
    """Raise :class:`ConfigMismatchError` on every process unless all processes hold the same
    config; return its fingerprint. A no-op (besides hashing) with one process.

    Every process must call it (it is a collective), right after ``jax.distributed`` is up.
    """
    fingerprint = config_fingerprint(config)
    if jax.process_count() == 1:
        return fingerprint
    mine = np.frombuffer(bytes.fromhex(fingerprint), np.uint8).astype(np.int32)
    every = np.asarray(multihost_utils.process_allgather(mine))  # [processes, 16]
    hexes = ["".join(f"{int(b):02x}" for b in row) for row in every]
    differ = [p for p, h in enumerate(hexes) if h != hexes[0]]
    if differ:
        listing = ", ".join(f"process {p}: {h[:12]}" for p, h in enumerate(hexes))
        raise ConfigMismatchError(
            f"the {what} differs across the {len(hexes)} processes of this run (processes {differ} "
            f"disagree with process 0; fingerprints {listing}). Start every process with the same "
            f"--config file, the same overrides and the same code version")
    return fingerprint


# ----------------------------------------------------------------------------- gathering


def _gather_same_shape(x: np.ndarray) -> np.ndarray:
    """``[processes, *x.shape]``: ``x`` of every process (all of one shape and dtype)."""
    return np.asarray(multihost_utils.process_allgather(x))


def allgather_rows(x: Any) -> np.ndarray:
    """Concatenate each process's ``x`` (any number of rows) along axis 0, in process order.

    Every process gets the whole result. Numbers, booleans and strings are supported; the
    trailing dimensions must agree across processes.
    """
    x = np.asarray(x)
    if jax.process_count() == 1:
        return x
    if x.ndim == 0:
        raise ValueError("allgather_rows needs arrays with a leading (row) dimension")
    kind = x.dtype.kind
    if kind in "US":  # strings: gather as fixed-width code points
        width = int(_gather_same_shape(np.asarray([x.dtype.itemsize // (4 if kind == "U" else 1)], np.int64)).max())
        width = max(width, 1)
        target = np.dtype(f"{kind}{width}")
        codes = x.astype(target).view(np.uint32 if kind == "U" else np.uint8).reshape(x.shape + (width,))
        gathered = allgather_rows(codes.astype(np.int32))
        return gathered.astype(np.uint32 if kind == "U" else np.uint8).view(target).reshape(gathered.shape[:-1])
    if kind == "b":
        return allgather_rows(x.astype(np.uint8)).astype(bool)
    counts = _gather_same_shape(np.asarray([x.shape[0]], np.int64))[:, 0]
    longest = int(counts.max())
    padded = np.zeros((longest,) + x.shape[1:], x.dtype)
    padded[: x.shape[0]] = x
    every = _gather_same_shape(padded)
    return np.concatenate([every[p, : int(n)] for p, n in enumerate(counts)], axis=0)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Put every leaf of ``tree`` (identical on all processes) on all devices of ``mesh``.

    Leaves that already are global arrays (spanning several processes, e.g. a train state) are
    left as they are.
    """
    sharding = NamedSharding(mesh, P())

    def put(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x
        x = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


# ----------------------------------------------------------------------------- embedding


def embed_batches(
    model: nnx.Module,
    batches: Iterable[Mapping[str, np.ndarray]],
    embed_fn: EmbedFn,
    *,
    mesh: Mesh,
    batch_size: int,
    keep: tuple[str, ...] = (),
) -> dict[str, np.ndarray]:
    """``embed_fn(model, batch)`` over every process's share of a split, gathered everywhere.

    Args:
      model: the (same) model on every process, in host or single-device memory; it is
        replicated over ``mesh``.
      batches: this process's batches (build the pipeline with ``shard='jax'`` and
        ``drop_remainder=False``), at most ``batch_size // process_count`` rows each. Processes
        may run out at different times: the ones that did feed padding until all are done.
      embed_fn: ``(model, batch) -> [B, ...]`` (jitted here, model in eval mode).
      batch_size: the global batch (rows per step over all processes); a multiple of the mesh's
        batch shards and of the process count.
      keep: batch columns to return alongside the embeddings (numbers or strings).

    Returns:
      ``{'embedding': [N, ...] float32, **keep}`` over all records of all processes, in process
      order (process 0's records first), identical on every process.
    """
    processes = jax.process_count()
    shards = mesh_lib.batch_axis_size(mesh)
    if batch_size % shards or batch_size % processes:
        raise ValueError(f"embedding batch size {batch_size} must be divisible by the mesh's batch shards "
                         f"(data*fsdp = {shards}) and by the {processes} processes")
    local_size = batch_size // processes
    model.eval()
    graphdef, state = nnx.split(model)
    state = replicate(state, mesh)
    out_sharding = mesh_lib.batch_sharding(mesh)

    def forward(state, batch):
        return embed_fn(nnx.merge(graphdef, state), batch).astype(jnp.float32)

    forward = jax.jit(forward, out_shardings=out_sharding)
    chunks: list[np.ndarray] = []
    kept: dict[str, list[np.ndarray]] = {k: [] for k in keep}
    template: dict[str, np.ndarray] | None = None
    iterator = iter(batches)
    while True:
        local = next(iterator, None)
        if processes > 1:
            # [has a batch now, has seen a batch] per process: stop together, fail together.
            flags = _gather_same_shape(np.asarray([local is not None, local is not None or template is not None],
                                                  np.int32))
            if not flags[:, 0].any():
                break
            if not flags[:, 1].all():
                raise ValueError(f"processes {np.flatnonzero(flags[:, 1] == 0).tolist()} have no records to embed "
                                 f"while others do: the split is smaller than the number of processes")
        elif local is None:
            break
        if local is not None:
            arrays = {k: np.asarray(v) for k, v in local.items() if np.asarray(v).dtype.kind in "biuf"}
            template = arrays
            padded, n = pad_batch(arrays, local_size)
        elif template is not None:
            padded, n = pad_batch({k: v[:1] for k, v in template.items()}, local_size)
            n = 0
        else:
            raise ValueError(f"process {jax.process_index()} has no records to embed while others do; "
                             f"the split is smaller than the number of processes")
        out = forward(state, mesh_lib.to_global_batch(padded, mesh))
        mine = multihost_utils.global_array_to_host_local_array(out, mesh, P(mesh_lib.BATCH_AXES))
        chunks.append(np.asarray(mine)[:n])
        if local is not None:
            for k in keep:
                kept[k].append(np.asarray(local[k])[:n])
    if not chunks:
        raise ValueError("no batches to embed (empty split?)")
    result = {"embedding": allgather_rows(np.concatenate(chunks))}
    for k in keep:
        result[k] = allgather_rows(np.concatenate(kept[k]) if kept[k] else np.zeros((0,), np.int32))
    return result
