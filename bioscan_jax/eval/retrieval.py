"""CLIBD taxonomic classification by nearest-key retrieval.

Protocol (BIOSCAN-CLIBD):

* keys are the ``train`` and ``key_unseen`` records; queries are ``test`` (seen species) and
  ``test_unseen`` (unseen species), or ``val`` / ``val_unseen`` while tuning;
* query -> key modality pairs: DNA->DNA, image->image and image->DNA (a query modality may also
  be matched against the keys' taxonomy-text embeddings);
* the cosine-nearest keys are found by :func:`bioscan_jax.eval.knn.nearest_keys`; at every rank
  (order, family, genus, species) the prediction is the label of the nearest key;
* top-k accuracy: a query is a hit when its true label is among the labels of its ``k``
  nearest keys (this is also how the CLIBD code counts top-3 and top-5; top-1 is the number
  the paper reports);
* micro = fraction of queries that are hits; macro = mean over the classes present in the
  queries of the per-class hit rate; H.M. = ``2 / (1/seen + 1/unseen)`` (0 if either is 0).

Missing labels (``missing_labels``): ``'class'`` (CLIBD's, the default) makes a missing label at
a rank a class of its own, as CLIBD's HDF5 build writes ``not_classified``
(``generate_hdf5_file_5m.py::replace_non_with_not_classified``) and its metrics compare strings
(``util.py::top_k_micro_accuracy``, ``top_k_macro_accuracy``): such a query counts, and it is a
hit when its nearest key is unlabelled too; ``n_unlabelled`` counts them. With ``'exclude'``
queries whose label at a rank is missing are left out of that rank's metrics
(``n_excluded_unlabelled``).

Bad input is counted, never dropped silently:
queries and keys with a non-finite embedding (failed decode, missing DNA) are left out of
everything (``n_queries_nan``, ``n_keys_nan``). Keys without a label at a rank stay in the key
set (retrieval does not depend on the rank); a query whose nearest key is unlabelled at that
rank is a miss, and those keys are counted in ``n_keys_unlabelled``. An empty query or key set
is a ``ValueError`` naming the split.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bioscan_jax.data.schema import EVAL_RANKS, MISSING_INDEX
from bioscan_jax.eval.knn import nearest_keys

Array = jax.Array
ArrayLike = Array | np.ndarray

#: Query -> key modality pairs of the CLIBD paper's retrieval figure.
CLIBD_PAIRS: tuple[tuple[str, str], ...] = (("dna", "dna"), ("image", "image"), ("image", "dna"))
#: Splits that together form the key set.
KEY_SPLITS: tuple[str, ...] = ("train", "key_unseen")
#: (seen, unseen) query splits of the reported numbers.
TEST_QUERY_SPLITS: tuple[str, str] = ("test", "test_unseen")
#: Metrics reported per rank, for ``ks``.
DEFAULT_KS: tuple[int, ...] = (1, 3, 5)
#: How a query without a label at a rank is scored (module docstring).
MISSING_LABELS: tuple[str, ...] = ("class", "exclude")


def pair_name(query_modality: str, key_modality: str) -> str:
    """Result key of a query -> key pair, e.g. ``image_to_dna``."""
    return f"{query_modality}_to_{key_modality}"


def harmonic_mean(seen: float, unseen: float) -> float:
    """``2 / (1/seen + 1/unseen)``; 0 if either is 0, NaN if either is NaN."""
    seen, unseen = float(seen), float(unseen)
    if np.isnan(seen) or np.isnan(unseen):
        return float("nan")
    if seen <= 0 or unseen <= 0:
        return 0.0
    return 2.0 / (1.0 / seen + 1.0 / unseen)


def finite_rows(x: ArrayLike) -> np.ndarray:
    """Host bool mask of the rows of ``x`` whose entries are all finite."""
    return np.asarray(jnp.all(jnp.isfinite(jnp.asarray(x)), axis=-1))


def _per_rank_metrics(
    hits: np.ndarray, true: np.ndarray, ks: Sequence[int]
) -> dict[str, float]:
    """Micro and macro top-k accuracy from ``hits[q, k_index]`` and the true labels."""
    out: dict[str, float] = {}
    if true.size == 0:
        for k in ks:
            out[f"micro_top{k}"] = out[f"macro_top{k}"] = float("nan")
        return out
    _, cls = np.unique(true, return_inverse=True)
    per_class_n = np.bincount(cls)
    for i, k in enumerate(ks):
        hit = hits[:, i].astype(np.float64)
        out[f"micro_top{k}"] = float(hit.mean())
        out[f"macro_top{k}"] = float(np.mean(np.bincount(cls, weights=hit) / per_class_n))
    return out


def evaluate_retrieval(
    query_emb: ArrayLike,
    query_labels: Mapping[str, ArrayLike],
    key_emb: ArrayLike,
    key_labels: Mapping[str, ArrayLike],
    *,
    ks: Sequence[int] = DEFAULT_KS,
    ranks: Sequence[str] = EVAL_RANKS,
    query_split: str = "queries",
    key_split: str = "keys",
    query_chunk: int = 1024,
    key_chunk: int = 16384,
    missing_labels: str = "class",
) -> dict[str, Any]:
    """Nearest-key classification accuracy of one query set against one key set.

    Args:
      query_emb: ``[Q, D]`` query embeddings (normalised here; cosine similarity).
      query_labels: rank -> ``[Q]`` int label indices (missing = :data:`MISSING_INDEX`).
      key_emb: ``[K, D]`` key embeddings.
      key_labels: rank -> ``[K]`` int label indices, indexed like ``query_labels``.
      ks: the k of the top-k accuracies.
      ranks: ranks to score; each must be in both label dicts.
      query_split, key_split: names used in error messages and nowhere else.
      query_chunk, key_chunk: block sizes of the search (memory ``O(query_chunk * key_chunk)``).
      missing_labels: ``'class'`` or ``'exclude'`` (module docstring).

    Returns:
      ``{rank: {"micro_top{k}", "macro_top{k}", "n_used", "n_excluded", "n_unlabelled",
      "n_excluded_unlabelled", "n_excluded_nan", "n_classes", "n_keys_unlabelled"}, ...,
      "n_queries", "n_queries_nan", "n_keys", "n_keys_nan"}``. A rank with no usable query has
      NaN accuracies and ``n_used == 0``.
    """
    ks = tuple(int(k) for k in ks)
    query_emb, key_emb = jnp.asarray(query_emb), jnp.asarray(key_emb)
    n_queries, n_keys = query_emb.shape[0], key_emb.shape[0]
    _check_inputs(ks, missing_labels, ranks, (("query", query_labels, n_queries, query_split),
                                              ("key", key_labels, n_keys, key_split)))

    query_ok, key_ok = finite_rows(query_emb), finite_rows(key_emb)
    if not query_ok.any():
        raise ValueError(f"query split {query_split!r} has no finite embedding ({n_queries} records, all NaN/inf)")
    if not key_ok.any():
        raise ValueError(f"key split {key_split!r} has no finite embedding ({n_keys} records, all NaN/inf)")
    max_k = max(ks)
    if max_k > key_ok.sum():
        raise ValueError(f"top-{max_k} needs at least {max_k} usable keys; split {key_split!r} has {key_ok.sum()}")

    query_emb = jnp.where(jnp.asarray(query_ok)[:, None], query_emb, 0)
    indices, _ = nearest_keys(
        query_emb, key_emb, max_k, key_mask=key_ok, query_chunk=query_chunk, key_chunk=key_chunk
    )
    indices = np.asarray(indices)

    result: dict[str, Any] = {
        "n_queries": int(n_queries),
        "n_queries_nan": int((~query_ok).sum()),
        "n_keys": int(n_keys),
        "n_keys_nan": int((~key_ok).sum()),
    }
    for rank in ranks:
        result[rank] = _rank_metrics(np.asarray(query_labels[rank]).astype(np.int64),
                                     np.asarray(key_labels[rank]).astype(np.int64), indices, query_ok, key_ok,
                                     ks=ks, missing_labels=missing_labels)
    return result


def _check_inputs(ks: tuple[int, ...], missing_labels: str, ranks: Sequence[str], sets) -> None:
    """One-line errors for bad arguments: ``sets`` is ``(name, labels, n, split)`` per side."""
    if missing_labels not in MISSING_LABELS:
        raise ValueError(f"unknown missing_labels {missing_labels!r}; valid: {', '.join(MISSING_LABELS)}")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    for name, labels, n, split in sets:
        if n == 0:
            raise ValueError(f"{name} split {split!r} is empty")
    for name, labels, n, split in sets:
        for rank in ranks:
            if rank not in labels:
                raise ValueError(f"{name} labels of split {split!r} have no rank {rank!r}")
            if np.shape(labels[rank]) != (n,):
                raise ValueError(f"{name} labels of split {split!r} at rank {rank!r} have shape "
                                 f"{np.shape(labels[rank])}, expected ({n},)")


def _rank_metrics(true: np.ndarray, key_true: np.ndarray, indices: np.ndarray, query_ok: np.ndarray,
                  key_ok: np.ndarray, *, ks: tuple[int, ...], missing_labels: str) -> dict[str, Any]:
    """The accuracies and counts of one rank (:func:`evaluate_retrieval`'s per-rank dict)."""
    pred = key_true[indices]  # [Q, max_k]
    labelled = true != MISSING_INDEX
    # 'class': MISSING_INDEX is a label like any other, so it matches an unlabelled key
    used = query_ok & labelled if missing_labels == "exclude" else query_ok
    hits = np.stack([np.any(pred[used, :k] == true[used, None], axis=1) for k in ks], axis=1)
    metrics = _per_rank_metrics(hits, true[used], ks)
    metrics.update(
        n_used=int(used.sum()),
        n_unlabelled=int((query_ok & ~labelled).sum()),
        n_excluded_unlabelled=int((query_ok & ~labelled & ~used).sum()),
        n_excluded_nan=int((~query_ok).sum()),
        n_classes=int(np.unique(true[used]).size),
        n_keys_unlabelled=int((key_ok & (key_true == MISSING_INDEX)).sum()),
    )
    metrics["n_excluded"] = metrics["n_excluded_unlabelled"] + metrics["n_excluded_nan"]
    return metrics


def retrieval_report(
    seen: Mapping[str, Any], unseen: Mapping[str, Any], *, ranks: Sequence[str] | None = None
) -> dict[str, dict[str, dict[str, float]]]:
    """Seen, unseen and harmonic mean of every accuracy: ``{rank: {metric: {seen, unseen, hm}}}``."""
    if ranks is None:
        ranks = [r for r in EVAL_RANKS if r in seen and r in unseen]
    report: dict[str, dict[str, dict[str, float]]] = {}
    for rank in ranks:
        metrics = [m for m in seen[rank] if m.startswith(("micro_top", "macro_top"))]
        report[rank] = {
            m: {
                "seen": seen[rank][m],
                "unseen": unseen[rank][m],
                "hm": harmonic_mean(seen[rank][m], unseen[rank][m]),
            }
            for m in metrics
        }
    return report


def _concat_splits(
    splits: Sequence[str], arrays: Mapping[str, Mapping[str, ArrayLike]], field: str, what: str
) -> np.ndarray:
    parts = []
    for split in splits:
        if split not in arrays:
            raise ValueError(f"{what}: split {split!r} is missing (have {sorted(arrays)})")
        if field not in arrays[split]:
            raise ValueError(f"{what}: split {split!r} has no {field!r} (have {sorted(arrays[split])})")
        parts.append(np.asarray(arrays[split][field]))
    return np.concatenate(parts, axis=0)


def clibd_retrieval(
    embeddings: Mapping[str, Mapping[str, ArrayLike]],
    labels: Mapping[str, Mapping[str, ArrayLike]],
    *,
    pairs: Sequence[tuple[str, str]] = CLIBD_PAIRS,
    key_splits: Sequence[str] = KEY_SPLITS,
    query_splits: tuple[str, str] = TEST_QUERY_SPLITS,
    ks: Sequence[int] = DEFAULT_KS,
    ranks: Sequence[str] = EVAL_RANKS,
    query_chunk: int = 1024,
    key_chunk: int = 16384,
    missing_labels: str = "class",
) -> dict[str, Any]:
    """The full CLIBD retrieval benchmark for every query -> key modality pair.

    Args:
      embeddings: split -> modality (``image``, ``dna``, ``text``) -> ``[N, D]`` embeddings;
        rows of all modalities of a split are the same records in the same order.
      labels: split -> rank -> ``[N]`` int labels.
      pairs: (query modality, key modality) pairs. A pair whose modality is absent from any
        split involved is skipped and listed under ``skipped_pairs``.
      key_splits: splits concatenated into the key set.
      query_splits: (seen, unseen) query splits.

    Returns:
      ``{pair_name: {"seen": result, "unseen": result, "report": retrieval_report},
      "skipped_pairs": [...]}``, where ``result`` is :func:`evaluate_retrieval`'s dict.
    """
    seen_split, unseen_split = query_splits
    key_name = "+".join(key_splits)
    key_labels = {r: _concat_splits(key_splits, labels, r, "key labels") for r in ranks}
    out: dict[str, Any] = {"skipped_pairs": []}
    for q_mod, k_mod in pairs:
        involved = (*key_splits, seen_split, unseen_split)
        have = all(
            s in embeddings and (k_mod if s in key_splits else q_mod) in embeddings[s] for s in involved
        )
        if not have:
            out["skipped_pairs"].append(pair_name(q_mod, k_mod))
            continue
        key_emb = _concat_splits(key_splits, embeddings, k_mod, "key embeddings")
        results = {}
        for which, split in (("seen", seen_split), ("unseen", unseen_split)):
            if split not in labels:
                raise ValueError(f"query labels: split {split!r} is missing (have {sorted(labels)})")
            results[which] = evaluate_retrieval(
                embeddings[split][q_mod],
                labels[split],
                key_emb,
                key_labels,
                ks=ks,
                ranks=ranks,
                query_split=f"{split} ({q_mod})",
                key_split=f"{key_name} ({k_mod})",
                query_chunk=query_chunk,
                key_chunk=key_chunk,
                missing_labels=missing_labels,
            )
        results["report"] = retrieval_report(results["seen"], results["unseen"], ranks=ranks)
        out[pair_name(q_mod, k_mod)] = results
    return out


def embed_batches(
    embed_fn: Callable[[Mapping[str, Any]], ArrayLike],
    batches: Iterable[Mapping[str, Any]],
    *,
    mask_key: str | None = "mask",
) -> np.ndarray:
    """Applies ``embed_fn`` (typically jitted, sharded) to every batch and stacks the rows.

    Rows whose ``batch[mask_key]`` is false (padding of the last batch) are dropped; without a
    mask entry every row is kept. The loop is per batch, never per record.
    """
    out = []
    for batch in batches:
        emb = np.asarray(jax.device_get(embed_fn(batch)))
        if mask_key is not None and mask_key in batch:
            emb = emb[np.asarray(batch[mask_key], bool)]
        out.append(emb)
    if not out:
        raise ValueError("embed_batches: no batches")
    return np.concatenate(out, axis=0)


def overall_accuracy(results: Mapping[str, Any], ranks: Sequence[str]) -> float:
    """CLIBD's model-selection score (``scripts/train_cl.py::compute_overall_acc``): the plain mean
    of top-1 micro and macro accuracy, seen and unseen, at every rank, over every evaluated
    query -> key pair of :func:`clibd_retrieval`'s ``results``. NaN cells (a rank with no usable
    query) are left out; NaN when nothing is left."""
    values = [results[pair][which][rank][metric]
              for pair in pair_names(results)
              for which in ("seen", "unseen")
              for rank in ranks
              for metric in ("micro_top1", "macro_top1")]
    values = [float(v) for v in values if np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def headline_rank(ranks: Sequence[str]) -> str:
    """The rank of the paper's headline figures: species, else the finest rank evaluated."""
    return "species" if "species" in ranks else tuple(ranks)[-1]


def pair_names(results: Mapping[str, Any]) -> list[str]:
    """The retrieval pairs of a :func:`clibd_retrieval` result (``'dna_to_dna'``, ...), without
    its bookkeeping entries (``skipped_pairs``, and ``excluded`` added by the CLIBD evaluation)."""
    return [p for p in results if p not in ("skipped_pairs", "excluded")]
