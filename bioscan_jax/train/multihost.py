"""Multi-process helpers: config agreement at start-up, gathering per-process results.

In a multi-process run (a TPU pod, several GPU hosts, or ``python -m bioscan_jax.launch``) every
process runs the same program on its own shard of the data. Three things then need care:

* **the same config everywhere** — :func:`assert_same_config` compares a fingerprint of the
  config across processes right after start-up and raises on every process when they differ
  (different flags, a stale config file on one host), instead of training a silently
  inconsistent model;
* **results of the whole dataset, not of one host's shard** — :func:`allgather_rows`
  concatenates per-process arrays of different lengths (numbers or strings) in process order;
* **embedding a split** — :func:`bioscan_jax.eval.embed.embed_batches` uses these helpers: each
  process feeds only *its* records (a pipeline built with ``shard='jax'``), the forward pass runs
  on the global batch, and the embeddings of all processes are gathered on every process.

With one process every function reduces to its single-process meaning (no collectives).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


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


def gather_same_shape(x: np.ndarray) -> np.ndarray:
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
        width = int(gather_same_shape(np.asarray([x.dtype.itemsize // (4 if kind == "U" else 1)], np.int64)).max())
        width = max(width, 1)
        target = np.dtype(f"{kind}{width}")
        codes = x.astype(target).view(np.uint32 if kind == "U" else np.uint8).reshape(x.shape + (width,))
        gathered = allgather_rows(codes.astype(np.int32))
        return gathered.astype(np.uint32 if kind == "U" else np.uint8).view(target).reshape(gathered.shape[:-1])
    if kind == "b":
        return allgather_rows(x.astype(np.uint8)).astype(bool)
    counts = gather_same_shape(np.asarray([x.shape[0]], np.int64))[:, 0]
    longest = int(counts.max())
    padded = np.zeros((longest,) + x.shape[1:], x.dtype)
    padded[: x.shape[0]] = x
    every = gather_same_shape(padded)
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
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # RNG state
            return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        x = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)
