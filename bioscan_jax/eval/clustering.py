"""Zero-shot clustering evaluation (BIOSCAN-ZSC).

Protocol (BIOSCAN-5M paper, §8 of the design notes): embeddings of test + test_unseen from a
frozen encoder are reduced with UMAP to 50 dims (``n_neighbors=30``, ``min_dist=0``, euclidean,
seed 0), clustered with Ward agglomerative clustering into as many clusters as there are true
species, and the one clustering is scored with AMI (primary) and ARI against every taxonomic
rank and the BIN. Image+DNA runs z-score each modality per feature and concatenate.

Entry point, in the manner of an evaluator that returns a dict of metrics::

    metrics = evaluate_clustering(emb, labels, encoder="BarcodeBERT")
    metrics["ami/species"], metrics["ami/genus"], metrics["n_excluded/subfamily"], ...

``labels`` maps a label column of :data:`bioscan_jax.data.schema.LABEL_COLUMNS` (``"class"`` …
``"species"``, ``"dna_bin"``) to one integer index per record, ``-1`` where missing (exactly what
:func:`bioscan_jax.data.schema.label_indices` returns). Records missing a label at a rank are left
out of that rank's scores and counted under ``n_excluded/<rank>``; they are still clustered.

Choices worth knowing:

* Ward runs in O(n·d) memory (:mod:`bioscan_jax.eval.ward`); the cut gives exactly ``k``
  clusters, even with tied merge heights.
* ``k`` = number of distinct species among the records that have a species label.
* UMAP needs more than ``n_components + 1`` records (its spectral initialisation); with fewer
  records it is an error. If ``n_neighbors`` is not below the number of records it is lowered to
  ``n - 1`` with a warning and reported as ``reduction/n_neighbors``.
* Silhouette (euclidean, in the clustered space, against the predicted clusters) is computed on a
  seeded subsample of at most ``silhouette_samples`` records (default 10,000), since it costs
  O(n²); ``silhouette/n_samples`` says how many. It is NaN when undefined on that sample (fewer
  than 2 clusters, or as many clusters as records).
* UMAP with a seed runs single-threaded (umap-learn's rule); results are then deterministic.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from sklearn import metrics as skm

from bioscan_jax.data.schema import LABEL_COLUMNS, MISSING_INDEX
from bioscan_jax.eval.ward import ward_cluster

__all__ = [
    "PAPER_RANKS",
    "REDUCTIONS",
    "check_embeddings",
    "check_labels",
    "cluster_embeddings",
    "evaluate_clustering",
    "MISSING_LABEL_POLICIES",
    "PRENORMS",
    "fuse_embeddings",
    "prenorm_embeddings",
    "num_species",
    "reduce_embeddings",
    "score_clustering",
    "silhouette",
    "zscore",
]

#: Label columns the paper scores the species-level clustering against (class … species, BIN).
PAPER_RANKS: tuple[str, ...] = LABEL_COLUMNS[LABEL_COLUMNS.index("class") :]
#: Supported dimensionality reductions before clustering.
REDUCTIONS: tuple[str, ...] = ("umap", "pca", "none")

# The reference settings of the paper.
_N_COMPONENTS = 50
_N_NEIGHBORS = 30
_MIN_DIST = 0.0
_METRIC = "euclidean"
_SILHOUETTE_SAMPLES = 10_000


# ----------------------------------------------------------------------------- input checks


def check_embeddings(x: ArrayLike, encoder: str = "embeddings") -> np.ndarray:
    """Returns ``x`` as a 2-D float array; raises ``ValueError`` on bad shape or NaN/inf rows.

    The error names ``encoder``, the number of bad rows and the first bad row index.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{encoder}: embeddings must be 2-D (records, features), got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{encoder}: embeddings must be numeric, got dtype {x.dtype}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{encoder}: embeddings are empty, shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    bad = ~np.isfinite(x).all(axis=1)
    n_bad = int(bad.sum())
    if n_bad:
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{encoder}: {n_bad} of {x.shape[0]} embedding rows contain NaN or inf "
            f"(first at row {first}); not clustering"
        )
    return x


def check_labels(labels: Mapping[str, ArrayLike], n_records: int) -> dict[str, np.ndarray]:
    """Validates a rank → label-index mapping; returns it in :data:`LABEL_COLUMNS` order.

    Each value must be a 1-D integer array of length ``n_records`` with values ``>= -1``.
    """
    unknown = [r for r in labels if r not in LABEL_COLUMNS]
    if unknown:
        raise ValueError(f"Unknown label column(s) {unknown}; valid: {list(LABEL_COLUMNS)}")
    out = {}
    for rank in (r for r in LABEL_COLUMNS if r in labels):
        y = np.asarray(labels[rank])
        if y.ndim != 1 or y.shape[0] != n_records:
            raise ValueError(f"labels[{rank!r}] must have shape ({n_records},), got {y.shape}")
        if y.size and not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"labels[{rank!r}] must be integer indices (missing = -1), got dtype {y.dtype}")
        if y.size and y.min() < MISSING_INDEX:
            row = int(np.argmin(y))
            raise ValueError(f"labels[{rank!r}] has index {int(y[row])} at record {row}; missing is {MISSING_INDEX}")
        out[rank] = y.astype(np.int64, copy=False)
    return out


def num_species(species: ArrayLike) -> int:
    """Number of distinct species among records that have a species label."""
    y = np.asarray(species)
    return int(np.unique(y[y != MISSING_INDEX]).size)


# ----------------------------------------------------------------------------- fusion


def zscore(x: ArrayLike, name: str = "embeddings") -> np.ndarray:
    """Per-feature z-score over records: ``(x - mean) / std`` (population std).

    Constant features (std 0) become 0. Statistics are computed in float64; the result keeps
    ``x``'s float dtype (float32 stays float32).
    """
    x = check_embeddings(x, name)
    mean = x.mean(axis=0, dtype=np.float64)
    std = x.std(axis=0, dtype=np.float64)
    std[std == 0] = 1.0
    return ((x - mean) / std).astype(x.dtype, copy=False)


def _concat_modalities(embeddings: Mapping[str, ArrayLike], zscored: bool) -> np.ndarray:
    """The modalities' (n, d_m) arrays (each z-scored over its records when ``zscored``),
    concatenated along features in mapping order; they must have the same records."""
    if not embeddings:
        raise ValueError("clustering needs the embeddings of at least one modality")
    parts = [zscore(x, name) if zscored else check_embeddings(x, name) for name, x in embeddings.items()]
    rows = {name: p.shape[0] for name, p in zip(embeddings, parts, strict=True)}
    if len(set(rows.values())) != 1:
        raise ValueError(f"Modalities have different numbers of records: {rows}")
    dtype = np.result_type(*parts, np.float32)
    return np.concatenate([p.astype(dtype, copy=False) for p in parts], axis=1)


def fuse_embeddings(embeddings: Mapping[str, ArrayLike]) -> np.ndarray:
    """Image+DNA (or any multi-modal) fusion: z-score each modality, then concatenate features.

    ``embeddings`` maps a modality name (used in errors) to an (n, d_m) array; all must have
    the same records in the same order. Returns an (n, Σ d_m) array, in mapping order.
    """
    return _concat_modalities(embeddings, zscored=True)


#: Normalisation of each model's embeddings before clustering (and before concatenating the
#: modalities of a multi-modal spec):
#: ``'fused'`` — none for one modality; a multi-modal spec z-scores each modality over all records
#: (:func:`fuse_embeddings`);
#: ``'elementwise_zscore'`` — the reference's ``--prenorm=elementwise_zscore``
#: (zs-ssl-clustering ``io.py::load_embeddings``): every modality z-scored per feature *within each
#: partition* (test and test_unseen separately), then modalities concatenated, then partitions;
#: ``'none'`` — raw embeddings, concatenated as they are.
PRENORMS = ("fused", "elementwise_zscore", "none")


def prenorm_embeddings(embeddings: Mapping[str, ArrayLike], partition: ArrayLike | None = None,
                       prenorm: str = "fused") -> np.ndarray:
    """The clustered features of one spec: each modality's (n, d_m) embeddings normalised as
    ``prenorm`` says (:data:`PRENORMS`), concatenated in mapping order. ``partition`` (n,) names
    each record's partition (e.g. its split); ``None`` is one partition.

    The reference divides by a zero std (a constant feature becomes NaN and UMAP fails); here such
    a feature becomes 0, as :func:`zscore` does.
    """
    if prenorm not in PRENORMS:
        raise ValueError(f"prenorm={prenorm!r}; valid: {', '.join(PRENORMS)}")
    if prenorm == "none" or (prenorm == "fused" and len(embeddings) == 1):
        return _concat_modalities(embeddings, zscored=False)
    if prenorm == "fused":
        return fuse_embeddings(embeddings)
    x = _concat_modalities(embeddings, zscored=False)  # checks the modalities agree
    n = x.shape[0]
    groups = np.zeros(n, np.int64) if partition is None else np.unique(np.asarray(partition), return_inverse=True)[1]
    if groups.shape != (n,):
        raise ValueError(f"partition has shape {np.shape(partition)}, expected ({n},)")
    out = np.empty_like(x)
    for g in np.unique(groups):
        rows = groups == g
        out[rows] = fuse_embeddings({name: np.asarray(e)[rows] for name, e in embeddings.items()})
    return out


# ----------------------------------------------------------------------------- reduction


def import_umap():
    """Imports umap-learn without its TensorFlow-backed ``ParametricUMAP`` (core stays TF-free).

    umap's package ``__init__`` tries ``from .parametric_umap import ...``, which imports
    TensorFlow when it is installed (seconds, and a heavy dependency). Marking that submodule
    absent for the duration of the import makes umap take its documented no-TensorFlow path.
    """
    if "umap" in sys.modules:
        return sys.modules["umap"]
    key = "umap.parametric_umap"
    blocked = key not in sys.modules
    if blocked:
        sys.modules[key] = None  # type: ignore[assignment]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ImportWarning)
            import umap
    finally:
        if blocked and key in sys.modules and sys.modules[key] is None:
            del sys.modules[key]
    return umap


def reduce_embeddings(
    x: ArrayLike,
    method: str = "umap",
    *,
    n_components: int = _N_COMPONENTS,
    n_neighbors: int = _N_NEIGHBORS,
    min_dist: float = _MIN_DIST,
    metric: str = _METRIC,
    seed: int = 0,
    encoder: str = "embeddings",
) -> tuple[np.ndarray, dict[str, Any]]:
    """Reduces (n, d) embeddings before clustering; returns ``(reduced float64, info)``.

    ``method``: ``"umap"`` (the reference: 50 dims, 30 neighbours, min_dist 0, euclidean,
    seeded), ``"pca"`` (scikit-learn PCA to ``min(n_components, n, d)`` dims, seeded) or
    ``"none"``. ``info`` holds ``reduction``, ``reduction/n_components`` and, for UMAP,
    ``reduction/n_neighbors`` (the value used) and ``reduction/n_neighbors_adapted``.
    """
    x = check_embeddings(x, encoder)
    n, d = x.shape
    info: dict[str, Any] = {"reduction": method}
    if method == "none":
        info["reduction/n_components"] = d
        return x.astype(np.float64, copy=False), info
    if method == "pca":
        from sklearn.decomposition import PCA

        k = min(n_components, n, d)
        info["reduction/n_components"] = k
        return PCA(n_components=k, random_state=seed).fit_transform(x).astype(np.float64), info
    if method != "umap":
        raise ValueError(f"Unknown reduction {method!r}; valid: {list(REDUCTIONS)}")

    if n <= n_components + 1:
        raise ValueError(
            f"{encoder}: UMAP to {n_components} dims needs more than {n_components + 1} records "
            f"(spectral initialisation), got {n}; use reduction='pca' or 'none', or fewer n_components"
        )
    used = min(n_neighbors, n - 1)
    if used != n_neighbors:
        warnings.warn(
            f"{encoder}: UMAP n_neighbors lowered from {n_neighbors} to {used} for {n} records", stacklevel=2
        )
    info.update({
        "reduction/n_components": n_components,
        "reduction/n_neighbors": used,
        "reduction/n_neighbors_adapted": used != n_neighbors,
    })
    umap = import_umap()
    reducer = umap.UMAP(
        n_components=n_components, n_neighbors=used, min_dist=min_dist, metric=metric, random_state=seed
    )
    with warnings.catch_warnings():
        # Seeding makes umap single-threaded on purpose; its notice about n_jobs is expected.
        warnings.filterwarnings("ignore", message=r"n_jobs value .* overridden", category=UserWarning)
        y = reducer.fit_transform(x)
    return np.asarray(y, dtype=np.float64), info


# ----------------------------------------------------------------------------- scores


#: How records without a label at a rank are scored: ``'class'`` — the missing label (-1) is one
#: class of its own, as the reference's per-rank notebook does (zs-ssl-clustering
#: ``notebooks/results-BIOSCAN5M.ipynb``: ``adjusted_mutual_info_score(attrs[:, i], y_pred)`` on
#: ``cat.codes``, where NaN is -1); ``'drop'`` — such records are left out of that rank's score.
MISSING_LABEL_POLICIES = ("class", "drop")


def score_clustering(pred: ArrayLike, labels: Mapping[str, ArrayLike], *, missing: str = "class"
                     ) -> dict[str, float | int]:
    """AMI and ARI of one clustering against each rank's labels.

    ``missing`` (:data:`MISSING_LABEL_POLICIES`) says how records with label -1 are scored in
    ``ami/<rank>`` and ``ari/<rank>``; the other policy's AMI is always reported too, as
    ``ami_<policy>/<rank>`` (``ami_class`` / ``ami_drop``), so both are on record. Also per rank:
    ``n_used/<rank>``, ``n_excluded/<rank>`` (records left out: the missing ones under ``'drop'``),
    ``n_missing/<rank>`` and ``n_classes/<rank>`` (the missing class counts as one under ``'class'``).
    NaN when no record is scored.
    """
    if missing not in MISSING_LABEL_POLICIES:
        raise ValueError(f"missing={missing!r}; valid: {', '.join(MISSING_LABEL_POLICIES)}")
    pred = np.asarray(pred)
    out: dict[str, float | int] = {}
    for rank, y in check_labels(labels, pred.shape[0]).items():
        labelled = y != MISSING_INDEX
        scored: dict[str, np.ndarray] = {"class": np.ones_like(labelled), "drop": labelled}
        for policy, keep in scored.items():
            ami = float(skm.adjusted_mutual_info_score(y[keep], pred[keep])) if keep.any() else float("nan")
            if policy == missing:
                out[f"ami/{rank}"] = ami
                out[f"ari/{rank}"] = float(skm.adjusted_rand_score(y[keep], pred[keep])) if keep.any() else float("nan")
            else:
                out[f"ami_{policy}/{rank}"] = ami
        keep = scored[missing]
        out[f"n_used/{rank}"] = int(keep.sum())
        out[f"n_excluded/{rank}"] = int(y.shape[0] - keep.sum())
        out[f"n_missing/{rank}"] = int((~labelled).sum())
        out[f"n_classes/{rank}"] = int(np.unique(y[keep]).size)
    return out


def silhouette(
    x: ArrayLike, pred: ArrayLike, *, max_samples: int = _SILHOUETTE_SAMPLES, seed: int = 0
) -> tuple[float, int]:
    """Euclidean silhouette of ``pred`` in space ``x`` on a seeded subsample.

    Uses all records when ``n <= max_samples``, else ``max_samples`` records drawn without
    replacement by ``np.random.default_rng(seed)``. Returns ``(score, n_samples)``; the score is
    NaN when undefined on the sample (fewer than 2 clusters or no cluster with 2+ members).
    """
    x = np.asarray(x)
    pred = np.asarray(pred)
    n = x.shape[0]
    if n > max_samples:
        idx = np.sort(np.random.default_rng(seed).choice(n, size=max_samples, replace=False))
        x, pred = x[idx], pred[idx]
    n_labels = np.unique(pred).size
    if not 2 <= n_labels <= x.shape[0] - 1:
        return float("nan"), int(x.shape[0])
    return float(skm.silhouette_score(x, pred, metric="euclidean")), int(x.shape[0])


# ----------------------------------------------------------------------------- pipeline


def cluster_embeddings(
    embeddings: ArrayLike,
    *,
    n_clusters: int | None = None,
    distance_threshold: float | None = None,
    reduction: str = "umap",
    n_components: int = _N_COMPONENTS,
    n_neighbors: int = _N_NEIGHBORS,
    min_dist: float = _MIN_DIST,
    metric: str = _METRIC,
    seed: int = 0,
    encoder: str = "embeddings",
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Reduce, then Ward-cluster. Returns ``(labels, reduced, info)``.

    Give exactly one of ``n_clusters`` (must not exceed the number of records) or
    ``distance_threshold``. ``info`` holds the reduction settings, ``n_clusters`` found and the
    timings ``time/reduce_s`` and ``time/cluster_s`` (Ward + cut).
    """
    x = check_embeddings(embeddings, encoder)
    n = x.shape[0]
    if (n_clusters is None) == (distance_threshold is None):
        raise ValueError("Give exactly one of n_clusters or distance_threshold")
    if n_clusters is not None:
        if n < n_clusters:
            raise ValueError(f"{encoder}: {n} records is fewer than the {n_clusters} clusters asked for")
        if n_clusters < 1:
            raise ValueError(f"{encoder}: n_clusters must be >= 1, got {n_clusters}")
    if n < 2:
        raise ValueError(f"{encoder}: clustering needs at least 2 records, got {n}")

    t0 = time.perf_counter()
    reduced, info = reduce_embeddings(
        x, reduction, n_components=n_components, n_neighbors=n_neighbors, min_dist=min_dist,
        metric=metric, seed=seed, encoder=encoder,
    )
    t1 = time.perf_counter()
    labels = ward_cluster(reduced, n_clusters=n_clusters, distance_threshold=distance_threshold)
    t2 = time.perf_counter()
    info["n_clusters"] = int(labels.max()) + 1
    if distance_threshold is not None:
        info["distance_threshold"] = float(distance_threshold)
    info["time/reduce_s"] = t1 - t0
    info["time/cluster_s"] = t2 - t1
    return labels, reduced, info


def _species_clusters(species: int | None, n: int, encoder: str) -> int:
    """The number of clusters of the protocol, one per true species; one-line errors when the
    labels cannot set it."""
    if species is None:
        raise ValueError(f"{encoder}: labels need 'species' to set the number of clusters (or pass n_clusters)")
    if species == 0:
        raise ValueError(f"{encoder}: no record has a species label; cannot set the number of clusters")
    if species == 1:
        raise ValueError(f"{encoder}: the clustered set has only one species ({n} records); need at least two species")
    if n < species:
        raise ValueError(f"{encoder}: {n} records is fewer than the {species} clusters (one per true species)")
    return species


def evaluate_clustering(
    embeddings: ArrayLike,
    labels: Mapping[str, ArrayLike],
    *,
    encoder: str = "embeddings",
    n_clusters: int | None = None,
    distance_threshold: float | None = None,
    reduction: str = "umap",
    n_components: int = _N_COMPONENTS,
    n_neighbors: int = _N_NEIGHBORS,
    min_dist: float = _MIN_DIST,
    metric: str = _METRIC,
    seed: int = 0,
    silhouette_samples: int = _SILHOUETTE_SAMPLES,
    missing: str = "class",
) -> dict[str, Any]:
    """The BIOSCAN-ZSC evaluation of one encoder's embeddings; returns a flat metrics dict.

    Args:
      embeddings: (n, d) features of the records, e.g. test + test_unseen.
      labels: label column → (n,) int indices, -1 missing; ``"species"`` is required unless
        ``n_clusters`` or ``distance_threshold`` is given. Every given column is scored.
      encoder: name used in errors and stored under ``"encoder"``.
      n_clusters: override the number of clusters (default: number of true species).
      distance_threshold: cut the Ward tree at this merge height instead of a cluster count.
      reduction, n_components, n_neighbors, min_dist, metric, seed: see :func:`reduce_embeddings`.
      silhouette_samples: largest subsample the silhouette is computed on.
      missing: how records without a label at a rank are scored (:data:`MISSING_LABEL_POLICIES`).

    Returns:
      ``encoder``, ``n_records``, ``n_features``, ``n_clusters``, ``n_species``, the reduction
      settings, ``ami|ari|n_used|n_excluded|n_classes/<rank>`` for each given column (see
      :func:`score_clustering`), ``silhouette``, ``silhouette/n_samples`` and timings
      ``time/{reduce,cluster,score,silhouette,total}_s``.

    Raises:
      ValueError: NaN/inf embeddings (names the encoder and the number of bad rows); labels of
        the wrong shape or an unknown column; only one species; fewer records than clusters.
    """
    t_start = time.perf_counter()
    x = check_embeddings(embeddings, encoder)
    n = x.shape[0]
    y = check_labels(labels, n)
    species = num_species(y["species"]) if "species" in y else None
    if n_clusters is None and distance_threshold is None:
        n_clusters = _species_clusters(species, n, encoder)

    pred, reduced, info = cluster_embeddings(
        x, n_clusters=n_clusters, distance_threshold=distance_threshold, reduction=reduction,
        n_components=n_components, n_neighbors=n_neighbors, min_dist=min_dist, metric=metric,
        seed=seed, encoder=encoder,
    )
    t0 = time.perf_counter()
    scores = score_clustering(pred, y, missing=missing)
    t1 = time.perf_counter()
    sil, sil_n = silhouette(reduced, pred, max_samples=silhouette_samples, seed=seed)
    t2 = time.perf_counter()

    out: dict[str, Any] = {
        "encoder": encoder,
        "n_records": n,
        "n_features": x.shape[1],
        "n_species": species,
        "seed": seed,
    }
    out.update({k: v for k, v in info.items() if not k.startswith("time/")})
    out.update(scores)
    out["silhouette"] = sil
    out["silhouette/n_samples"] = sil_n
    out["time/reduce_s"] = info["time/reduce_s"]
    out["time/cluster_s"] = info["time/cluster_s"]
    out["time/score_s"] = t1 - t0
    out["time/silhouette_s"] = t2 - t1
    out["time/total_s"] = t2 - t_start
    return out
