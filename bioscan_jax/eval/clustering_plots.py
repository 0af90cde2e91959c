"""Figures for the zero-shot clustering benchmark, drawn with matplotlib's Agg backend.

The figures are built on :class:`matplotlib.figure.Figure` with an explicit Agg canvas, so no
pyplot global state or display is involved and the helpers are safe on headless machines.

* :func:`plot_ami_by_rank` — AMI (%) at each rank, one line per encoder × modality (the paper's
  figure).
* :func:`plot_umap_scatter` — a 2-D UMAP of embeddings, coloured by order.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from bioscan_jax.data.schema import MISSING_INDEX
from bioscan_jax.eval.clustering import PAPER_RANKS, check_embeddings, reduce_embeddings

__all__ = ["plot_ami_by_rank", "plot_umap_scatter", "rank_display_name"]


def rank_display_name(rank: str) -> str:
    """Axis label of a label column: ``"dna_bin"`` → ``"BIN"``, ``"genus"`` → ``"Genus"``."""
    return "BIN" if rank == "dna_bin" else rank.capitalize()


def _new_figure(figsize: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | pathlib.Path, dpi: int) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)
    return path


def plot_ami_by_rank(
    results: Mapping[str, Mapping[str, Any]],
    path: str | pathlib.Path,
    *,
    ranks: Sequence[str] = PAPER_RANKS,
    title: str | None = None,
    dpi: int = 150,
) -> pathlib.Path:
    """Line plot of AMI (%) per rank, one line per entry of ``results``; saved as PNG.

    ``results`` maps a line label (e.g. ``"BarcodeBERT (DNA)"``) to either the dict returned by
    :func:`~bioscan_jax.eval.clustering.evaluate_clustering` (keys ``ami/<rank>``) or a plain
    rank → AMI mapping (fractions in [0, 1]). Ranks a line lacks are left as gaps. Returns the path.
    """
    if not results:
        raise ValueError("plot_ami_by_rank needs at least one result")
    fig = _new_figure((7.0, 4.5))
    ax = fig.add_subplot()
    xs = np.arange(len(ranks))
    for name, res in results.items():
        ys = []
        for rank in ranks:
            value = res.get(f"ami/{rank}", res.get(rank))
            ys.append(np.nan if value is None else 100.0 * float(value))
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xticks(xs, [rank_display_name(r) for r in ranks])
    ax.set_xlabel("Taxonomic rank")
    ax.set_ylabel("AMI (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    if title:
        ax.set_title(title)
    return _save(fig, path, dpi)


def plot_umap_scatter(
    embeddings: ArrayLike,
    order: ArrayLike,
    path: str | pathlib.Path,
    *,
    order_names: Sequence[str] | None = None,
    seed: int = 0,
    n_neighbors: int = 30,
    max_legend: int = 20,
    title: str | None = None,
    encoder: str = "embeddings",
    dpi: int = 150,
) -> pathlib.Path:
    """2-D UMAP scatter of ``embeddings`` coloured by order; saved as PNG.

    ``embeddings`` of width 2 are plotted as given; wider ones are first reduced with UMAP to
    2 dims (``n_neighbors``, ``min_dist=0``, euclidean, ``seed``). ``order`` holds order indices
    (-1 missing, drawn in grey); ``order_names[i]`` names index ``i`` in the legend, which lists
    the ``max_legend`` most frequent orders. Returns the path.
    """
    x = check_embeddings(embeddings, encoder)
    order = np.asarray(order)
    if order.shape != (x.shape[0],):
        raise ValueError(f"order must have shape ({x.shape[0]},), got {order.shape}")
    if x.shape[1] != 2:
        x, _ = reduce_embeddings(x, "umap", n_components=2, n_neighbors=n_neighbors, seed=seed, encoder=encoder)

    import matplotlib

    fig = _new_figure((7.0, 6.0))
    ax = fig.add_subplot()
    missing = order == MISSING_INDEX
    if missing.any():
        ax.scatter(x[missing, 0], x[missing, 1], s=2, c="lightgrey", label=f"no order ({int(missing.sum())})")
    present, counts = np.unique(order[~missing], return_counts=True)
    by_size = present[np.argsort(-counts, kind="stable")]
    cmap = matplotlib.colormaps["tab20"]
    for i, o in enumerate(by_size):
        sel = order == o
        name = order_names[o] if order_names is not None else f"order {o}"
        label = name if i < max_legend else None
        ax.scatter(x[sel, 0], x[sel, 1], s=2, color=cmap(i % cmap.N), label=label, rasterized=True)
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_xticks([])
    ax.set_yticks([])
    if len(by_size) or missing.any():
        ax.legend(fontsize="x-small", markerscale=4, loc="best", ncols=1 + (len(by_size) > 10))
    if title:
        ax.set_title(title)
    return _save(fig, path, dpi)
