"""Embeddings of the zero-shot clustering benchmark, computed once per model and stored.

:func:`cached_embeddings` embeds the records of a split with one model (:func:`embed_model`:
jitted, batch-sharded over the mesh's data axes) and writes them to
``workdir/embeddings/<split>__<model>.npz`` (:func:`embedding_path`) with the processids and
label indices of the records; a later run reuses them unless ``config.embed.recompute`` is set,
the model definition changed (:func:`model_fingerprint`) or the split's records differ.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from bioscan_jax.eval import embed as embed_lib
from bioscan_jax.tasks.zsc import encoders as zsc_encoders
from bioscan_jax.tasks.zsc.encoders import KEEP, Encoder
from bioscan_jax import config_access
from bioscan_jax.models import params as params_lib

logger = logging.getLogger(__name__)


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able object (config sections)."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def model_fingerprint(name: str, config) -> str:
    """What an embedding depends on besides the records: the model entry and its weights' source."""
    m = config.models[name]
    parts: list[Any] = [config_access.to_dict(m), config.seed, config.data.max_nucleotides]
    if m.weights == "pretrain":
        parts.append(config_access.to_dict(config.barcodebert))
    if m.weights == "clibd":
        parts.append([config_access.to_dict(config.clibd), config.clibd_workdir])
    return fingerprint(parts)



def embedding_path(workdir: str, split: str, name: str) -> str:
    return os.path.join(workdir, "embeddings", f"{split}__{name}.npz")


def save_embeddings(path: str, arrays: Mapping[str, np.ndarray], fingerprint: str) -> None:
    """Writes ``arrays`` (+ the fingerprint) to ``path`` atomically."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path[: -len(".npz")] + ".tmp.npz"
    np.savez(tmp, **arrays, fingerprint=np.asarray(fingerprint))
    os.replace(tmp, path)


def load_embeddings(path: str, fingerprint: str, processid: np.ndarray) -> dict[str, np.ndarray] | None:
    """The stored embeddings if they match the model (``fingerprint``) and the records, else None."""
    if not os.path.exists(path):
        return None
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    if str(arrays.pop("fingerprint", "")) != fingerprint:
        logger.info("%s was written for another model definition; re-embedding", path)
        return None
    if not np.array_equal(arrays.get("processid"), processid):
        logger.info("%s holds other records than the split; re-embedding", path)
        return None
    return arrays


def embed_model(encoder: Encoder, source, config, mesh) -> dict[str, np.ndarray]:
    """Embeds every record of ``source`` (in order) with ``encoder``; labels kept beside."""
    params_lib.place_on_mesh(encoder.model, mesh, config.sharding_rules)
    batch_size = int(config.embed.batch_size)
    out = embed_lib.embed_batches(encoder.model, encoder.batches(source, batch_size), encoder.embed_fn,
                                  mesh=mesh, batch_size=batch_size, keep=KEEP)
    out["processid"] = out["processid"].astype(str)
    return out


def cached_embeddings(name: str, source, processid: np.ndarray, config, workdir: str, mesh,
                      trained: zsc_encoders.Trained) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The embeddings of ``source`` (split ``config.data.split``, records ``processid``) by model
    ``name``, stored ones when they still match, else computed (the encoder built with
    ``trained``) and stored; and what happened (``path``, ``reused``, ``dim``, ``seconds``)."""
    t0 = time.perf_counter()
    path = embedding_path(workdir, config.data.split, name)
    key = model_fingerprint(name, config)
    arrays = None if config.embed.recompute else load_embeddings(path, key, processid)
    reused = arrays is not None
    if not reused:
        encoder = zsc_encoders.build_encoder(name, config, trained)
        arrays = embed_model(encoder, source, config, mesh)
        if not np.array_equal(arrays["processid"], processid):
            raise RuntimeError(f"{name}: the embedding pipeline returned the records in another order")
        save_embeddings(path, arrays, key)
    info = {"path": path, "reused": reused, "dim": int(arrays["embedding"].shape[1]),
            "seconds": time.perf_counter() - t0}
    logger.info("%s: %s embeddings %s in %.1fs", name, "reused" if reused else "computed",
                arrays["embedding"].shape, info["seconds"])
    return arrays, info
