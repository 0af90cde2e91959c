"""Scoring of the zero-shot clustering benchmark (:mod:`bioscan_jax.tasks.zsc`).

* :func:`split_records` / :func:`check_clusterable`: the clustered records' processids, labels and
  partitions, and the checks that stop a run before anything is embedded;
* :func:`evaluate_spec`: one encoder spec's features (:func:`spec_embeddings`, normalised as
  ``config.cluster.prenorm``) reduced, Ward-clustered and scored
  (:func:`bioscan_jax.eval.clustering.evaluate_clustering`), or an ``error`` entry for bad
  (NaN/inf) embeddings;
* :func:`results_table` and :func:`make_plots`: the AMI table and the figures
  (:mod:`bioscan_jax.eval.clustering_plots`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from bioscan_jax.eval import clustering
from bioscan_jax.eval import clustering_plots
from bioscan_jax.tasks.zsc.encoders import KEEP, RANKS, EncoderSpec

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- data


def split_records(source) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """The processids, label indices (``RANKS``, -1 missing) and partition (the record's own
    split, e.g. ``test`` or ``test_unseen``) of a split expression, in source order."""
    view = source.select([*KEEP, "split"]) if hasattr(source, "select") else source
    rows = [view[i] for i in range(len(view))]
    processid = np.asarray([str(r["processid"]) for r in rows])
    labels = {rank: np.asarray([int(r[rank]) for r in rows], dtype=np.int64) for rank in RANKS}
    partition = np.asarray([str(r.get("split", "")) for r in rows])
    return processid, labels, partition


def processid_order(processid: np.ndarray, partition: np.ndarray, split: str) -> np.ndarray:
    """The record order of zs-ssl-clustering: sorted by ``processid`` within each partition,
    partitions in the order the split expression names them (``test+test_unseen``: test first).
    ``zs_ssl_clustering/datasets/bioscan5m.py::_load_metadata`` sorts the metadata by processid
    right after reading it (~L196; commit 2f4470b: "needed to reproduce"), and ``io.py`` stacks the
    partitions in the order given."""
    parts = [p for p in split.split("+") if p]
    rank = {p: i for i, p in enumerate(parts)}
    key = np.asarray([rank.get(p, len(parts)) for p in partition])
    return np.lexsort((processid, key))


def check_clusterable(labels: Mapping[str, np.ndarray], split: str, config) -> int:
    """Raises ``ValueError`` when the split cannot be clustered as configured; returns #species."""
    n = len(labels["species"])
    k = clustering.num_species(labels["species"])
    labelled = int((labels["species"] >= 0).sum())
    if k < 2:
        raise ValueError(f"split {split!r} has {k} species among {labelled} species-labelled records "
                         f"({n} records): zero-shot clustering needs at least two species")
    if n < k:
        raise ValueError(f"split {split!r} has {n} records, fewer than the {k} clusters (one per species)")
    c = config.cluster
    if c.reduction == "umap" and n <= int(c.n_components) + 1:
        raise ValueError(f"split {split!r} has {n} records; UMAP to {c.n_components} dims needs more than "
                         f"{int(c.n_components) + 1}: use more records or config.cluster.reduction='pca'")
    if c.reduction not in clustering.REDUCTIONS:
        raise ValueError(f"config.cluster.reduction={c.reduction!r}; valid: {list(clustering.REDUCTIONS)}")
    if c.prenorm not in clustering.PRENORMS:
        raise ValueError(f"config.cluster.prenorm={c.prenorm!r}; valid: {list(clustering.PRENORMS)}")
    if c.missing_labels not in clustering.MISSING_LABEL_POLICIES:
        raise ValueError(f"config.cluster.missing_labels={c.missing_labels!r}; "
                         f"valid: {list(clustering.MISSING_LABEL_POLICIES)}")
    return k


# ----------------------------------------------------------------------------- evaluation


def spec_embeddings(spec: EncoderSpec, embeddings: Mapping[str, Mapping[str, np.ndarray]],
                    partition: np.ndarray | None = None, prenorm: str = "fused") -> np.ndarray:
    """The clustered features of a spec: its models' embeddings normalised as ``prenorm``
    (:data:`clustering.PRENORMS`; per ``partition`` for the reference's elementwise z-score) and
    concatenated."""
    return clustering.prenorm_embeddings({name: embeddings[name]["embedding"] for name in spec.models},
                                         partition, prenorm)


def evaluate_spec(spec: EncoderSpec, embeddings, labels, config, partition: np.ndarray | None = None
                  ) -> dict[str, Any]:
    """The clustering metrics of one spec, or ``{'error': ...}`` for bad (NaN/inf) embeddings."""
    c = config.cluster
    try:
        metrics = _cluster(spec, embeddings, labels, config, partition, c.prenorm)
        per_rank = str(c.get("per_rank_prenorm", "") or "")
        if per_rank and per_rank != c.prenorm and "+" not in spec.modality:
            # results-BIOSCAN5M.ipynb cells 56, 59: the per-rank figures of single-modality encoders
            # come from a clustering with prenorm 'none' (the main table, cell 44, z-scores)
            again = _cluster(spec, embeddings, labels, config, partition, per_rank)
            metrics["per_rank/prenorm"] = per_rank
            metrics.update({f"per_rank/{k}": v for k, v in again.items() if k.startswith(("ami/", "ari/"))})
    except ValueError as e:
        logger.error("%s: not clustered: %s", spec.name, e)
        return {"modality": spec.modality, "models": list(spec.models), "error": str(e)}
    return {"modality": spec.modality, "models": list(spec.models), **metrics}


def _cluster(spec: EncoderSpec, embeddings, labels, config, partition, prenorm: str) -> dict[str, Any]:
    c = config.cluster
    x = spec_embeddings(spec, embeddings, partition, prenorm)
    return clustering.evaluate_clustering(
        x, labels, encoder=spec.name, reduction=c.reduction, n_components=int(c.n_components),
        n_neighbors=int(c.n_neighbors), min_dist=float(c.min_dist), seed=int(config.seed),
        silhouette_samples=int(c.silhouette_samples), missing=c.missing_labels)


def results_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table: encoder × modality → AMI (%) per rank, ARI (%) at species, silhouette."""
    ranks = [clustering_plots.rank_display_name(r) for r in RANKS]
    head = ["encoder", "modality", *[f"AMI {r}" for r in ranks], "ARI Species", "silhouette"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for name, res in results.items():
        encoder = "+".join(res["models"])
        if "error" in res:
            cells = ["error"] * (len(head) - 2)
        else:
            cells = [f"{100 * res[f'ami/{r}']:.1f}" for r in RANKS]
            cells += [f"{100 * res['ari/species']:.1f}", f"{res['silhouette']:.3f}"]
        lines.append("| " + " | ".join([encoder, res["modality"], *cells]) + " |")
    per_rank = {name: res for name, res in results.items() if "per_rank/prenorm" in res}
    if per_rank:
        prenorm = next(iter(per_rank.values()))["per_rank/prenorm"]
        lines += ["", f"AMI per rank with prenorm '{prenorm}' (the reference notebook's per-rank figures):", "",
                  "| encoder | modality | " + " | ".join(f"AMI {r}" for r in ranks) + " |",
                  "|---|---|" + "---:|" * len(ranks)]
        for res in per_rank.values():
            cells = [f"{100 * res[f'per_rank/ami/{r}']:.1f}" for r in RANKS]
            lines.append("| " + " | ".join(["+".join(res["models"]), res["modality"], *cells]) + " |")
    return "\n".join(lines)


def _slug(name: str) -> str:
    return name.replace(":", "__").replace("/", "_")


def make_plots(specs, results, embeddings, labels, label_names, config, workdir: str,
               partition: np.ndarray | None = None) -> list[str]:
    """AMI-by-rank lines for every clustered spec and a 2-D UMAP per chosen spec."""
    ok = {s.name: results[s.name] for s in specs if "error" not in results[s.name]}
    paths = []
    plot_dir = os.path.join(workdir, "plots")
    if ok and config.plots.ami_by_rank:
        paths.append(str(clustering_plots.plot_ami_by_rank(
            ok, os.path.join(plot_dir, "ami_by_rank.png"), title=f"BIOSCAN-ZSC, {config.data.split}")))
    wanted = str(config.plots.umap_scatter or "")
    chosen = list(ok) if wanted == "all" else [s.strip() for s in wanted.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in results]
    if unknown:
        logger.warning("config.plots.umap_scatter names specs that were not evaluated: %s", unknown)
    n = len(labels["order"])
    for spec in (s for s in specs if s.name in chosen and s.name in ok):
        paths.append(str(clustering_plots.plot_umap_scatter(
            spec_embeddings(spec, embeddings, partition, config.cluster.prenorm), labels["order"],
            os.path.join(plot_dir, f"umap_{_slug(spec.name)}.png"),
            order_names=label_names.get("order"), seed=int(config.seed),
            n_neighbors=min(int(config.cluster.n_neighbors), n - 1), title=spec.name, encoder=spec.name)))
    return paths
