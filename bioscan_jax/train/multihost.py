"""Multi-process helpers: config agreement at start-up, gathering per-process results.

In a multi-process run (a TPU pod, several GPU hosts, or ``python -m bioscan_jax.launch``) every
process runs the same program on its own shard of the data. Two things then need care:

* **the same config everywhere** — :func:`assert_same_config` compares a fingerprint of the
  config across processes right after start-up and raises on every process when they differ
  (different flags, a stale config file on one host), instead of training a silently
  inconsistent model;
* **results of the whole dataset, not of one host's shard** — the gathering helpers live in
  :mod:`bioscan_jax.sharding` (``allgather_rows``, ``gather_same_shape``, ``replicate``), below
  both training and evaluation.

With one process every function reduces to its single-process meaning (no collectives).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


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
