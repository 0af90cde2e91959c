"""Paper-style tables and bar charts of CLIBD retrieval results.

Both take ``results_by_setting``: alignment setting (e.g. ``"No alignment"``, ``"I+D+T"``) ->
pair name (``dna_to_dna``, ...) -> a :func:`bioscan_jax.eval.retrieval.retrieval_report`
(``{rank: {metric: {"seen", "unseen", "hm"}}}``). The per-pair dicts returned by
:func:`bioscan_jax.eval.retrieval.clibd_retrieval` (which hold the report under ``"report"``)
are accepted as well.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from bioscan_jax.data.schema import EVAL_RANKS
from bioscan_jax.eval.retrieval import headline_rank, pair_names

#: Column order of the paper's figure.
PAPER_PAIRS: tuple[str, ...] = ("dna_to_dna", "image_to_image", "image_to_dna")
MODALITY_NAMES: dict[str, str] = {"image": "Image", "dna": "DNA", "text": "Text"}


def pair_title(pair: str) -> str:
    """``image_to_dna`` -> ``Image→DNA``."""
    query, _, key = pair.partition("_to_")
    return f"{MODALITY_NAMES.get(query, query)}→{MODALITY_NAMES.get(key, key)}"


def _report(entry: Mapping[str, Any]) -> Mapping[str, Any]:
    return entry["report"] if "report" in entry else entry


def _cell(entry: Mapping[str, Any] | None, rank: str, metric: str) -> dict[str, float] | None:
    if entry is None:
        return None
    report = _report(entry)
    if rank not in report or metric not in report[rank]:
        return None
    return report[rank][metric]


def _fmt(x: float, percent: bool, digits: int) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{100 * x if percent else x:.{digits}f}"


def format_table(
    results_by_setting: Mapping[str, Mapping[str, Mapping[str, Any]]],
    *,
    ranks: Sequence[str] = ("species",),
    metric: str = "macro_top1",
    pairs: Sequence[str] = PAPER_PAIRS,
    percent: bool = True,
    digits: int = 1,
) -> str:
    """A Markdown table: one row per setting (and rank), one column per pair.

    Each cell is ``seen / unseen / H.M.`` of ``metric`` (default: species top-1 macro accuracy,
    in percent, as in the CLIBD paper). Missing values print as ``–``.
    """
    multi_rank = len(ranks) > 1
    header = ["Alignment"] + (["Rank"] if multi_rank else []) + [
        f"{pair_title(p)} (seen / unseen / H.M.)" for p in pairs
    ]
    lines = [
        f"{metric} (%)" if percent else metric,
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * (1 + multi_rank) + [":---:"] * len(pairs)) + "|",
    ]
    for setting, by_pair in results_by_setting.items():
        for rank in ranks:
            row = [setting] + ([rank] if multi_rank else [])
            for pair in pairs:
                cell = _cell(by_pair.get(pair), rank, metric)
                if cell is None:
                    row.append("–")
                else:
                    row.append(
                        " / ".join(_fmt(cell[v], percent, digits) for v in ("seen", "unseen", "hm"))
                    )
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def bar_chart(
    results_by_setting: Mapping[str, Mapping[str, Mapping[str, Any]]],
    path: str | os.PathLike,
    *,
    ranks: Sequence[str] = EVAL_RANKS,
    metric: str = "macro_top1",
    pairs: Sequence[str] = PAPER_PAIRS,
    value: str = "hm",
) -> str:
    """Saves a figure with one panel per rank: bars per pair (groups) x setting (colours).

    Bar height is ``value`` (``"hm"``, ``"seen"`` or ``"unseen"``) of ``metric`` in percent;
    seen and unseen are also marked on every bar (▲ seen, ▼ unseen). Returns ``path``.
    """
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no global backend state
    from matplotlib.lines import Line2D

    if value not in ("hm", "seen", "unseen"):
        raise ValueError(f"value must be 'hm', 'seen' or 'unseen', got {value!r}")
    settings = list(results_by_setting)
    fig = Figure(figsize=(4.2 * len(ranks), 3.6))
    axes = fig.subplots(1, len(ranks), squeeze=False, sharey=True)
    width = 0.8 / max(1, len(settings))
    colours = matplotlib.colormaps["tab10"].colors
    for ax, rank in zip(axes[0], ranks, strict=True):
        for s, setting in enumerate(settings):
            for p, pair in enumerate(pairs):
                cell = _cell(results_by_setting[setting].get(pair), rank, metric)
                if cell is None:
                    continue
                x = p - 0.4 + width * (s + 0.5)
                height = 100 * cell[value]
                ax.bar(x, 0 if math.isnan(height) else height, width, color=colours[s % len(colours)],
                       label=setting if p == 0 else None)
                ax.plot([x], [100 * cell["seen"]], "^", color="k", ms=3)
                ax.plot([x], [100 * cell["unseen"]], "v", color="k", ms=3)
        ax.set_title(rank.capitalize())
        ax.set_xticks(range(len(pairs)), [pair_title(p) for p in pairs])
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel(f"{metric} (%), bar = {value}")
    handles, labels = axes[0][0].get_legend_handles_labels()
    handles += [Line2D([], [], ls="", marker=m, color="k", ms=4) for m in ("^", "v")]
    labels += ["seen", "unseen"]
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    return os.fspath(path)


def report_tables(by_setting: Mapping[str, Mapping[str, Any]], ranks: Sequence[str]) -> str:
    """The paper-style tables: species top-1 macro (default view), then every rank (macro, micro)."""
    pairs = [p for p in PAPER_PAIRS if any(p in r for r in by_setting.values())]
    pairs += sorted({p for r in by_setting.values() for p in pair_names(r)} - set(pairs))
    species = headline_rank(ranks)
    parts = [f"CLIBD retrieval, {species} (seen / unseen / harmonic mean)",
             format_table(by_setting, ranks=(species,), pairs=pairs)]
    if len(ranks) > 1:
        parts += ["", "Per rank", format_table(by_setting, ranks=ranks, pairs=pairs)]
        parts += ["", "Per rank, micro", format_table(by_setting, ranks=ranks, pairs=pairs, metric="micro_top1")]
    return "\n".join(parts)


def exclusion_note(results: Mapping[str, Any]) -> str:
    """The records left out of the metrics, per split (``results['excluded']``), or ``''``."""
    lines = []
    for split, ex in results.get("excluded", {}).items():
        bad = {k: v for k, v in ex.items() if k != "n_records" and v}
        if bad:
            lines.append(f"  {split} ({ex['n_records']} records): " + ", ".join(f"{k}={v}" for k, v in bad.items()))
    return ("Left out of the affected metrics:\n" + "\n".join(lines)) if lines else ""


def write_report(workdir: str, by_setting: Mapping[str, Mapping[str, Any]], ranks: Sequence[str],
                 extra: Mapping[str, Any]) -> str:
    """Writes ``retrieval.json``, ``retrieval.md`` and ``retrieval_<rank>.png``; returns the text."""
    text = report_tables(by_setting, ranks)
    note = exclusion_note(next(iter(by_setting.values()))) if by_setting else ""
    if note:
        text += "\n\n" + note
    with open(os.path.join(workdir, "retrieval.json"), "w") as f:
        json.dump({"settings": by_setting, **extra}, f, indent=1, default=float)
    with open(os.path.join(workdir, "retrieval.md"), "w") as f:
        f.write(text + "\n")
    pairs = [p for p in PAPER_PAIRS if any(p in r for r in by_setting.values())]
    for rank in ranks:
        bar_chart(by_setting, os.path.join(workdir, f"retrieval_{rank}.png"), ranks=(rank,), pairs=pairs)
    bar_chart(by_setting, os.path.join(workdir, "retrieval_all_ranks.png"), ranks=ranks, pairs=pairs)
    return text
