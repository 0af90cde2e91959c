"""Identifying specimens by their nearest reference barcodes, with a novel-species flag.

A :class:`Reference` is a labelled set embedded once (``bioscan-jax index``). :func:`identify`
gives every query, at each of order, family, genus and species, the label of its most similar
reference record labelled at that rank (cosine similarity, the project's chunked jitted top-k),
that similarity, the nearest record overall, and a novelty score: ``1 - `` the similarity of the
nearest species-labelled record. No reference repository has a novelty flag; the threshold here
is calibrated on the reference itself (:func:`calibrate_novelty`): some species are held out
whole ("novel" queries), some records of the others are held out ("known" queries), the rest are
keys; the threshold maximises Youden's J (TPR - FPR) and its AUROC, precision and recall are
reported.

A reference may mix modalities (``bioscan-jax identify --images``: DNA barcodes and labelled
images embedded by one CLIBD model's towers into one space): ``Reference.modality`` then names
each key's modality, every output row says which modality its nearest key came from
(``nearest_modality``), and the calibration's queries are the records of one modality
(``query_modality``: image queries against DNA + image keys).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from bioscan_jax.eval.embedded import check_searchable
from bioscan_jax.eval.knn import nearest_keys

RANKS = ("order", "family", "genus", "species")
INDEX_ARRAYS, INDEX_INFO = "index.npz", "index.json"
#: Where :func:`calibrate_novelty` returns its held-out queries' scores (for plots; not for JSON).
CALIBRATION_SCORES = "calibration_scores"


@dataclasses.dataclass
class Reference:
    ids: np.ndarray  # [n] str
    embeddings: np.ndarray  # [n, d] float32
    labels: dict[str, np.ndarray]  # rank -> [n] str ('' = missing)
    model: dict[str, Any]  # the embedder's description (spec, kind, ...)
    source: str = ""
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)  # status -> count, not indexed
    modality: np.ndarray | None = None  # [n] str ('dna', 'image') when the keys mix modalities

    def save(self, directory: str | os.PathLike) -> None:
        d = pathlib.Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / (INDEX_ARRAYS + ".tmp.npz")
        extra = {} if self.modality is None else {"modality": self.modality.astype(str)}
        np.savez(tmp, ids=self.ids.astype(str), embeddings=self.embeddings, **extra,
                 **{f"label_{r}": v.astype(str) for r, v in self.labels.items()})
        os.replace(tmp, d / INDEX_ARRAYS)
        (d / INDEX_INFO).write_text(json.dumps({"model": self.model, "source": self.source, "records": len(self.ids),
                                                "skipped": self.skipped, "ranks": list(self.labels)}, indent=2))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Reference":
        d = pathlib.Path(directory)
        if not (d / INDEX_ARRAYS).exists() or not (d / INDEX_INFO).exists():
            raise FileNotFoundError(f"{d} is not a bioscan-jax index (no {INDEX_ARRAYS} / {INDEX_INFO}); "
                                    "make one with `bioscan-jax index`")
        info = json.loads((d / INDEX_INFO).read_text())
        with np.load(d / INDEX_ARRAYS) as z:
            labels = {r: z[f"label_{r}"] for r in info["ranks"]}
            return cls(ids=z["ids"], embeddings=z["embeddings"], labels=labels, model=info["model"],
                       source=info.get("source", ""), skipped=info.get("skipped", {}),
                       modality=z["modality"] if "modality" in z.files else None)

    def with_modality(self, name: str) -> "Reference":
        """The same keys, each marked as of modality ``name``."""
        return dataclasses.replace(self, modality=np.full(len(self.ids), name))


def combine(references: Sequence[Reference], model: dict[str, Any]) -> Reference:
    """One key set of several references of one model (each with its ``modality``; a specimen's
    barcode and image may share an id: ``(modality, id)`` names a key); what each left out stays
    counted under its modality."""
    if any(r.modality is None for r in references):
        raise ValueError("combine: every reference needs its modality (Reference.with_modality)")
    ids = np.concatenate([r.ids for r in references])
    skipped = {f"{r.modality[0] if len(r.modality) else '?'}: {k}": v for r in references for k, v in r.skipped.items()}
    return Reference(ids=ids, embeddings=np.concatenate([r.embeddings for r in references]),
                     labels={rank: np.concatenate([r.labels[rank] for r in references]) for rank in references[0].labels},
                     model=model, source=" + ".join(r.source for r in references), skipped=skipped,
                     modality=np.concatenate([r.modality for r in references]))


def labels_of(frame: pd.DataFrame, ranks: Sequence[str] = RANKS) -> dict[str, np.ndarray]:
    """Rank columns of a frame as str arrays ('' where missing); a missing column is an error."""
    absent = [r for r in ranks if r not in frame.columns]
    if absent:
        raise ValueError(f"the reference has no {', '.join(absent)} column(s); columns: {', '.join(frame.columns[:20])}")
    return {r: frame[r].fillna("").astype(str).to_numpy() for r in ranks}


def build_reference(embedder, ids: Sequence[str], seqs: Sequence[Any], labels: Mapping[str, np.ndarray], *,
                    source: str = "", progress: bool = False) -> Reference:
    """Embeds the labelled records; those without an embedding are left out and counted."""
    out = embedder.embed(ids, seqs, progress=progress)
    ok = out.ok
    skipped: dict[str, int] = {}
    for s in np.asarray(out.status)[~ok]:
        skipped[s] = skipped.get(s, 0) + 1
    if not ok.any():
        raise ValueError(f"no reference record could be embedded ({skipped})")
    return Reference(ids=np.asarray(ids, dtype=str)[ok], embeddings=out.embeddings[ok],
                     labels={r: np.asarray(v, dtype=str)[ok] for r, v in labels.items()}, model=embedder.describe,
                     source=source, skipped=skipped)


def _top1(queries: np.ndarray, keys: np.ndarray, key_mask: np.ndarray | None = None):
    idx, sim = nearest_keys(queries, keys, k=1, key_mask=key_mask)
    return np.asarray(idx)[:, 0], np.asarray(sim)[:, 0]


def identify(reference: Reference, ids: Sequence[str], embedded, *, threshold: float | None = None) -> pd.DataFrame:
    """One row per query (module docstring); rows whose status is not ok get empty predictions."""
    ok = embedded.ok
    q = embedded.embeddings[ok]
    rows: dict[str, Any] = {"id": np.asarray(ids, dtype=str)}
    check_searchable(q, rows["id"][ok], "identify: queries")
    check_searchable(reference.embeddings, reference.ids, f"identify: reference {reference.source}")
    n = len(rows["id"])
    searches: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}  # one search per distinct key set

    def top1(mask: np.ndarray):
        key = np.packbits(mask).tobytes()
        if key not in searches:
            searches[key] = _top1(q, reference.embeddings, None if mask.all() else mask)
        return searches[key]

    for rank in RANKS:
        labelled = reference.labels[rank] != ""
        pred, sim = np.full(n, "", dtype=object), np.full(n, np.nan)
        if ok.any() and labelled.any():
            i, s = top1(labelled)
            pred[ok], sim[ok] = reference.labels[rank][i], s
        rows[rank], rows[f"{rank}_similarity"] = pred, sim
    nearest = np.full(n, "", dtype=object)
    if ok.any():
        i, _ = top1(np.ones(len(reference.ids), bool))
        nearest[ok] = reference.ids[i]
    rows["nearest_id"] = nearest
    if reference.modality is not None:
        modality = np.full(n, "", dtype=object)
        if ok.any():
            modality[ok] = reference.modality[i]
        rows["nearest_modality"] = modality
    score = 1.0 - rows["species_similarity"]
    rows["novel_score"] = score
    novel = np.full(n, "", dtype=object)
    if threshold is not None:
        novel[ok] = np.where(score[ok] > threshold, "true", "false")
    rows["novel"] = novel
    rows["status"] = np.asarray(embedded.status, dtype=object)
    return pd.DataFrame(rows)


def _calibration_split(species: np.ndarray, querying: np.ndarray, rng: np.random.Generator, novel_fraction: float,
                       known_fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``(keys, known queries, novel queries, held-out species)`` as record indices: species whose
    ``querying`` records are held out whole, a fraction of the ``querying`` records of the others;
    every other record of the others is a key."""
    names = np.unique(species[(species != "") & querying])
    if names.size < 5:
        raise ValueError(f"novelty calibration needs at least 5 reference species, found {names.size}")
    held_out = set(rng.choice(names, size=max(1, int(round(novel_fraction * names.size))), replace=False).tolist())
    novel_q = np.flatnonzero(np.isin(species, list(held_out)) & querying)
    known_q, keys = [], []
    for name in np.unique(species[species != ""]):
        if name in held_out:
            continue
        rows = rng.permutation(np.flatnonzero((species == name) & querying))
        n_q = int(round(known_fraction * rows.size)) if rows.size >= 2 else 0
        known_q.extend(rows[:n_q].tolist())
        keys.extend(rows[n_q:].tolist())
        keys.extend(np.flatnonzero((species == name) & ~querying).tolist())
    if not known_q:
        raise ValueError("novelty calibration: no species has two or more reference records to hold one out")
    return np.asarray(keys), np.asarray(known_q, dtype=np.int64), novel_q, len(held_out)


def calibrate_novelty(reference: Reference, *, seed: int = 0, novel_fraction: float = 0.2,
                      known_fraction: float = 0.2, query_modality: str | None = None) -> dict[str, Any]:
    """Leave-species-out calibration of the novelty threshold on the reference (module docstring).
    ``query_modality``: the queries are the reference records of that modality (e.g. ``'image'``:
    images against the DNA and image keys); ``None``: every record may be a query. The held-out
    queries' scores come back under :data:`CALIBRATION_SCORES` (``known``, ``novel``)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    species = reference.labels["species"]
    querying = np.ones(len(species), bool)
    if query_modality is not None:
        if reference.modality is None:
            raise ValueError(f"novelty calibration for {query_modality} queries needs a reference of several modalities")
        querying = reference.modality == query_modality
    rng = np.random.default_rng(seed)
    keys, known_q, novel_q, n_held_out = _calibration_split(species, querying, rng, novel_fraction, known_fraction)
    queries = np.concatenate([known_q, novel_q])
    is_novel = np.concatenate([np.zeros(known_q.size, bool), np.ones(novel_q.size, bool)])
    _, sim = _top1(reference.embeddings[queries], reference.embeddings[keys])
    score = 1.0 - sim
    auroc = float(roc_auc_score(is_novel, score))
    fpr, tpr, thresholds = roc_curve(is_novel, score)  # flagged: score >= threshold
    best = int(np.argmax(tpr - fpr))
    threshold = float(np.nextafter(thresholds[best], -np.inf))  # so that "novel if score > threshold"
    flagged = score > threshold
    precision = float((flagged & is_novel).sum() / max(flagged.sum(), 1))
    recall = float((flagged & is_novel).sum() / max(is_novel.sum(), 1))
    out = {"threshold": threshold, "auroc": auroc, "precision": precision, "recall": recall,
           "false_positive_rate": float(fpr[best]), "held_out_species": n_held_out,
           "novel_queries": int(novel_q.size), "known_queries": int(known_q.size), "keys": int(keys.size),
           "seed": seed, "rule": "novel if 1 - (similarity of the nearest species-labelled record) > threshold"}
    if query_modality is not None:
        out["queries_modality"] = query_modality
    out[CALIBRATION_SCORES] = {"known": score[~is_novel], "novel": score[is_novel]}
    return out


def without_scores(novelty: Mapping[str, Any]) -> dict[str, Any]:
    """``novelty`` without :data:`CALIBRATION_SCORES` (what JSON files keep)."""
    return {k: v for k, v in novelty.items() if k != CALIBRATION_SCORES}
