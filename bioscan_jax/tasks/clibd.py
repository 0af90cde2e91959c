r"""CLIBD: contrastive alignment of image, DNA and taxonomy-text towers; retrieval evaluation.

  python run.py --config=configs/clibd.py                      # tiny, embedded synthetic data
  python run.py --config=configs/clibd.py:paper --config.data.manual_dir=/data/bioscan5m

What a run does (``run``):

1. opens ``data.train_split`` (default ``pretrain+train``), the key splits and the query splits;
   training records without a DNA barcode are left out and counted (``n_train_without_dna``);
2. builds the word vocabulary of the taxonomy text from ``data.vocab_split`` (saved as
   ``workdir/text_vocab.json``) and the k-mer tokenizer of the DNA tower;
3. optionally initialises encoders from pretrained weights (:func:`pretrained_encoders`):
   ``model.dna.init = 'mlm'`` first runs BarcodeBERT masked-token pretraining
   (:func:`bioscan_jax.train.stages.pretrain_mlm`) in ``workdir/dna_pretrain``; a path
   (a BarcodeBERT workdir, its ``pretrain/`` or ``pretrain/checkpoints`` directory, or an HF
   BERT checkpoint) loads an existing encoder; ``model.image.init`` loads an HF/timm ViT;
4. with ``eval.no_alignment`` evaluates the untrained model (same encoders, random projection
   heads: the paper's "no alignment" row);
5. trains with the symmetric InfoNCE loss over every ordered pair of enabled modalities
   (:mod:`bioscan_jax.train.contrastive`) with the shared train loop (AdamW + OneCycle, mesh,
   checkpoints, metrics) in ``workdir/train``;
6. evaluates by nearest-key retrieval (keys ``train`` + ``key_unseen``, queries ``test`` and
   ``test_unseen``; DNA→DNA, image→image, image→DNA; top-1/3/5 micro and macro accuracy per
   rank, seen / unseen / harmonic mean) and writes ``retrieval.json``, ``retrieval.md``,
   ``summary.json`` and bar charts ``retrieval_<rank>.png``; the tables are printed.

Bad input in evaluation: images that fail to decode and records without DNA get a NaN embedding
for that modality, so the retrieval metrics leave them out and count them (``n_queries_nan``,
``n_keys_nan`` per pair; ``excluded`` per split in ``retrieval.json``); queries without a label at
a rank are left out of that rank (``n_excluded_unlabelled``). An empty key or query split is a
``ValueError`` naming the split. In training an undecodable image stops the run with an error
naming the record (prepare the dataset with ``on_bad_record='skip'`` to drop such records).

The training side (config → towers, data setup, pretrained encoders, :func:`train_clibd`,
:func:`load_towers`) lives in :mod:`bioscan_jax.train.clibd`; this module evaluates and reports.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bioscan_jax.data import fields, pipeline, schema
from bioscan_jax.data import text as text_lib
from bioscan_jax.eval import embed as embed_lib
from bioscan_jax.eval import report as report_lib
from bioscan_jax.eval import retrieval
from bioscan_jax.models import towers
from bioscan_jax.train.clibd import (  # the training side, orchestrated here
    NO_ALIGNMENT,
    ClibdSetup,
    check_config,
    enabled_modalities,
    eval_splits,
    model_factory,
    prepare,
    pretrained_encoders,
    quiet_library_logs,
    setting_name,
    split_list,
    train_clibd,
)
from bioscan_jax.train.state import make_rngs

logger = logging.getLogger(__name__)


# ============================================================================= evaluation


class EvalImageRecord(pipeline.ImageRecord):
    """The eval view of a record's image; an undecodable image becomes zeros with
    ``image_ok=False`` (its embedding is set to NaN and counted, not dropped silently)."""

    def random_map(self, element, rng):
        try:
            out = super().random_map(element, rng)
            out["image_ok"] = True
        except ValueError as e:
            logger.warning("%s", e)
            out = {k: element[k] for k in self.passthrough}
            out[fields.IMAGE] = np.zeros((self.crop, self.crop, 3), np.float32)
            out["image_ok"] = False
        return out


class EvalBatch(grain.transforms.Map):
    """A list of eval records -> image, DNA tokens (missing DNA: ``dna_ok=False``), text, labels."""

    def __init__(self, tokenizer, vocab, ranks: Sequence[str], split_id: int, with_image: bool):
        self.tokenizer, self.vocab, self.ranks = tokenizer, vocab, tuple(ranks)
        self.split_id, self.with_image = split_id, with_image

    def map(self, element):
        n = len(element)
        out: dict[str, np.ndarray] = {"split_id": np.full((n,), self.split_id, np.int32),
                                      pipeline.ROW: np.asarray([r[pipeline.ROW] for r in element], np.int64)}
        if self.with_image:
            out[fields.IMAGE] = np.stack([r[fields.IMAGE] for r in element])
            out["image_ok"] = np.asarray([r["image_ok"] for r in element], bool)
        seqs = [r.get("dna_barcode") or "" for r in element]
        ids, mask, _ = self.tokenizer.tokenize(seqs, names=[r.get("processid") for r in element], errors="count")
        out["dna_ids"], out["dna_attention_mask"] = ids, mask
        out["dna_ok"] = mask.any(axis=1)
        out["text_ids"], out["text_attention_mask"] = self.vocab.encode(text_lib.taxonomy_texts(element))
        for rank in self.ranks:
            out[f"label_{rank}"] = np.asarray([r[rank] for r in element], np.int32)
        return out


def eval_batches(config, setup: ClibdSetup, source, split_id: int, ranks: Sequence[str]):
    """One pass over a split in fixed-size batches (the last one smaller), eval image view."""
    d = config.data
    with_image = setup.model_config.image is not None
    passthrough = tuple(dict.fromkeys(["processid", "dna_barcode", *ranks,
                                       *(fields.name_feature(r) for r in schema.EVAL_RANKS)]))
    needed = ([fields.IMAGE] if with_image else []) + list(passthrough)
    ds = pipeline.records_pipeline(source, train=False, seed=config.seed, shard="jax", num_epochs=1, features=needed)
    passthrough += (pipeline.ROW,)
    if with_image:
        ds = ds.random_map(EvalImageRecord(train=False, crop=int(d.image_size), resize=int(d.resize),
                                           normalize=bool(d.normalize_images), passthrough=passthrough))
    else:
        ds = ds.map(lambda r: {**r, "image_ok": False})
    ds = ds.batch(int(config.eval.batch_size) // jax.process_count(), drop_remainder=False, batch_fn=list)
    ds = ds.map(EvalBatch(setup.tokenizer, setup.vocab, ranks, split_id, with_image))
    options = grain.ReadOptions()
    if d.get("read_threads"):
        options.num_threads = int(d.read_threads)
    if d.get("prefetch"):
        options.prefetch_buffer_size = int(d.prefetch)
    return ds.to_iter_dataset(options)


def eval_modalities(config, model_config: towers.ClibdConfig) -> tuple[str, ...]:
    """Modalities that the retrieval pairs need and the model has."""
    wanted = {m for pair in _pairs(config) for m in pair}
    return tuple(m for m in model_config.modalities if m in wanted)


def _pairs(config) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in split_list(config.eval.pairs):
        q, sep, k = item.partition("_to_")
        if not sep or q not in towers.MODALITIES or k not in towers.MODALITIES:
            raise ValueError(f"config.eval.pairs item {item!r} is not '<query>_to_<key>' over {towers.MODALITIES}")
        pairs.append((q, k))
    return tuple(pairs)


class EmbeddingCache:
    """Eval batches per split kept in memory when small, so several models embed the same
    decoded images (the no-alignment baseline and the trained model)."""

    def __init__(self, config, setup: ClibdSetup, splits: Sequence[str], ranks: Sequence[str]):
        self.config, self.setup, self.splits, self.ranks = config, setup, tuple(splits), tuple(ranks)
        keys, _ = eval_splits(config)
        for split in self.splits:
            if len(setup.data[split]) == 0:
                role = "key" if split in keys else "query"
                raise ValueError(f"{role} split {split!r} is empty: there is nothing to retrieve "
                                 f"{'from' if role == 'key' else 'with'}")
        total = sum(len(setup.data[s]) for s in self.splits)
        self.cached = total <= int(config.eval.cache_max_records)
        self._batches: list[Mapping[str, np.ndarray]] | None = None

    def _stream(self):
        for i, split in enumerate(self.splits):
            yield from eval_batches(self.config, self.setup, self.setup.data[split], i, self.ranks)

    def batches(self):
        if not self.cached:
            return self._stream()
        if self._batches is None:
            self._batches = list(self._stream())
        return iter(self._batches)


def embed_splits(config, model: towers.ClibdModel, setup: ClibdSetup, cache: EmbeddingCache,
                 ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """Embeds every split of ``cache`` with one jitted forward: ``(embeddings[split][modality],
    labels[split][rank], excluded[split])``; failed images and missing DNA are NaN rows."""
    mods = eval_modalities(config, setup.model_config)
    dim = setup.model_config.embed_dim

    def embed_fn(m, batch):
        features, _ = m(batch, modalities=mods, deterministic=True)
        return jnp.concatenate([features[x] for x in mods], axis=-1)

    keep = ("split_id", "image_ok", "dna_ok", *(f"label_{r}" for r in cache.ranks))
    out = embed_lib.embed_batches(model, cache.batches(), embed_fn, mesh=setup.mesh,
                                  batch_size=int(config.eval.batch_size), keep=keep,
                                  order_by=("split_id", pipeline.ROW))
    embeddings, labels, excluded = {}, {}, {}
    for i, split in enumerate(cache.splits):
        rows = out["split_id"] == i
        if not rows.any():
            raise ValueError(f"split {split!r} gave no records to embed")
        emb, ok = {}, {"image": out["image_ok"][rows], "dna": out["dna_ok"][rows]}
        for j, m in enumerate(mods):
            x = out["embedding"][rows, j * dim:(j + 1) * dim].copy()
            if m in ok:
                x[~ok[m]] = np.nan
            emb[m] = x
        embeddings[split] = emb
        labels[split] = {r: out[f"label_{r}"][rows] for r in cache.ranks}
        excluded[split] = {"n_records": int(rows.sum()),
                           "n_image_failed": int((~ok["image"]).sum()) if "image" in mods else None,
                           "n_without_dna": int((~ok["dna"]).sum()) if "dna" in mods else None,
                           **{f"n_unlabelled_{r}": int((labels[split][r] == schema.MISSING_INDEX).sum())
                              for r in cache.ranks}}
    return embeddings, labels, excluded


def evaluate(config, model: towers.ClibdModel, setup: ClibdSetup, cache: EmbeddingCache | None = None
             ) -> dict[str, Any]:
    """The CLIBD retrieval benchmark of ``model`` (:func:`bioscan_jax.eval.retrieval.clibd_retrieval`)
    plus the per-split exclusion counts under ``excluded``."""
    keys, queries = eval_splits(config)
    ranks = tuple(config.eval.ranks)
    cache = cache or EmbeddingCache(config, setup, (*keys, *queries), ranks)
    embeddings, labels, excluded = embed_splits(config, model, setup, cache)
    results = retrieval.clibd_retrieval(
        embeddings, labels, pairs=_pairs(config), key_splits=keys, query_splits=queries,
        ks=tuple(config.eval.ks), ranks=ranks)
    results["excluded"] = excluded
    return results


# ============================================================================= report


def _pair_names(results: Mapping[str, Any]) -> list[str]:
    return [p for p in results if p not in ("skipped_pairs", "excluded")]


def report_tables(by_setting: Mapping[str, Mapping[str, Any]], ranks: Sequence[str]) -> str:
    """The paper-style tables: species top-1 macro (default view), then every rank."""
    pairs = [p for p in report_lib.PAPER_PAIRS if any(p in r for r in by_setting.values())]
    extra = sorted({p for r in by_setting.values() for p in _pair_names(r)} - set(pairs))
    pairs += extra
    species = "species" if "species" in ranks else ranks[-1]
    parts = [f"CLIBD retrieval, {species} (seen / unseen / harmonic mean)",
             report_lib.format_table(by_setting, ranks=(species,), pairs=pairs)]
    if len(ranks) > 1:
        parts += ["", "Per rank", report_lib.format_table(by_setting, ranks=ranks, pairs=pairs)]
        parts += ["", "Per rank, micro", report_lib.format_table(by_setting, ranks=ranks, pairs=pairs,
                                                                  metric="micro_top1")]
    return "\n".join(parts)


def _exclusion_note(results: Mapping[str, Any]) -> str:
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
    note = _exclusion_note(next(iter(by_setting.values()))) if by_setting else ""
    if note:
        text += "\n\n" + note
    with open(os.path.join(workdir, "retrieval.json"), "w") as f:
        json.dump({"settings": by_setting, **extra}, f, indent=1, default=float)
    with open(os.path.join(workdir, "retrieval.md"), "w") as f:
        f.write(text + "\n")
    pairs = [p for p in report_lib.PAPER_PAIRS if any(p in r for r in by_setting.values())]
    for rank in ranks:
        report_lib.bar_chart(by_setting, os.path.join(workdir, f"retrieval_{rank}.png"), ranks=(rank,), pairs=pairs)
    report_lib.bar_chart(by_setting, os.path.join(workdir, "retrieval_all_ranks.png"), ranks=ranks, pairs=pairs)
    return text


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Baseline (optional) → training → retrieval evaluation → report; returns the summary.

    Routine INFO logs of the libraries (orbax, TFDS) are hidden unless ``config.quiet_logs`` is
    False."""
    if config.get("quiet_logs", True):
        with quiet_library_logs():
            return _run(config, workdir)
    return _run(config, workdir)


def _run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    t_start = time.perf_counter()
    check_config(config)
    os.makedirs(workdir, exist_ok=True)
    setup = prepare(config, workdir)
    mods = enabled_modalities(config)
    keys, queries = eval_splits(config)
    ranks = tuple(config.eval.ranks)
    summary: dict[str, Any] = {
        "data": setup.data.description, "modalities": list(mods),
        "split_sizes": {s: len(src) for s, src in setup.data.sources.items()},
        "n_train": len(setup.train_source), "n_train_without_dna": setup.n_train_without_dna,
    }
    logger.info("data %s: %s", setup.data.description, summary["split_sizes"])
    pretrained = pretrained_encoders(config, setup, workdir)
    cache = EmbeddingCache(config, setup, (*keys, *queries), ranks)
    by_setting: dict[str, Any] = {}
    if config.eval.no_alignment:
        t0 = time.perf_counter()
        baseline = model_factory(setup, pretrained)(make_rngs(config.seed))
        by_setting[NO_ALIGNMENT] = evaluate(config, baseline, setup, cache)
        summary["no_alignment_eval_seconds"] = time.perf_counter() - t0
        del baseline
    model, train_summary = train_clibd(config, workdir, setup=setup, pretrained=pretrained)
    summary["train"] = train_summary
    t0 = time.perf_counter()
    by_setting[setting_name(mods)] = evaluate(config, model, setup, cache)
    summary["eval_seconds"] = time.perf_counter() - t0
    summary["seconds"] = time.perf_counter() - t_start
    headline = {}
    for setting, res in by_setting.items():
        headline[setting] = {p: res[p]["report"].get("species", {}).get("macro_top1") for p in _pair_names(res)}
    summary["species_macro_top1"] = headline
    text = write_report(workdir, by_setting, ranks, {"key_splits": list(keys), "query_splits": list(queries),
                                                    "summary": summary})
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=float)
    print(text, flush=True)
    print(f"\nCLIBD run finished in {summary['seconds']:.0f} s; reports in {workdir}", flush=True)
    return summary
