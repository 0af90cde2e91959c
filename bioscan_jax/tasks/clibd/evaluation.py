"""CLIBD evaluation: the eval view of the records, one jitted forward of the towers over every
key and query split, nearest-key retrieval (:func:`bioscan_jax.eval.retrieval.clibd_retrieval`),
and the same retrieval on the validation queries as an evaluator during training
(:class:`ValRetrieval`).

The protocol is the reference's (bioscan-ml/clibd ``bioscanclip/util/util.py`` and
``scripts/inference_and_eval.py``: keys = train + key_unseen, queries = test / test_unseen or
val / val_unseen; cosine 1-NN; macro top-1 per rank; seen / unseen / harmonic mean).

Bad input: images that fail to decode and records without DNA get a NaN embedding for that
modality, so the retrieval metrics leave them out and count them (``n_queries_nan``,
``n_keys_nan`` per pair; ``excluded`` per split); queries without a label at a rank are left out
of that rank (``n_excluded_unlabelled``). An empty key or query split is a ``ValueError`` naming
the split.

``setup`` below is the training side's :class:`bioscan_jax.tasks.clibd.training.ClibdSetup` (the opened
splits, DNA tokenizer, text vocabulary, model config and mesh); this module reads its fields only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from bioscan_jax import config_access
from bioscan_jax.data import fields, pipeline, schema, sources
from bioscan_jax.data import text as text_lib
from bioscan_jax.eval import embed as embed_lib
from bioscan_jax.eval import retrieval
from bioscan_jax.models import towers
from bioscan_jax import sharding as mesh_lib

logger = logging.getLogger(__name__)

#: ``config.eval`` fields naming the query splits of the test benchmark and of validation.
TEST_QUERIES, VAL_QUERIES = "query_splits", "val_query_splits"


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

    def __init__(self, tokenizer, vocab, ranks: Sequence[str], with_image: bool):
        self.tokenizer, self.vocab, self.ranks, self.with_image = tokenizer, vocab, tuple(ranks), with_image

    def map(self, element):
        out: dict[str, np.ndarray] = {pipeline.ROW: np.asarray([r[pipeline.ROW] for r in element], np.int64)}
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


def eval_batches(config, setup, source, ranks: Sequence[str]):
    """One pass over a split in fixed-size batches (the last one smaller), eval image view
    (CLIBD: Resize ``data.resize`` → CenterCrop ``data.image_size``)."""
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
    ds = ds.batch(mesh_lib.process_batch_size(int(config.eval.batch_size)), drop_remainder=False, batch_fn=list)
    ds = ds.map(EvalBatch(setup.tokenizer, setup.vocab, ranks, with_image))
    options = grain.ReadOptions()
    if d.get("read_threads"):
        options.num_threads = int(d.read_threads)
    if d.get("prefetch"):
        options.prefetch_buffer_size = int(d.prefetch)
    return ds.to_iter_dataset(options)


def retrieval_pairs(config) -> tuple[tuple[str, str], ...]:
    """``config.eval.pairs`` (``'<query>_to_<key>'`` items) as ``(query, key)`` modality pairs."""
    pairs = []
    for item in config_access.name_list(config.eval.pairs):
        q, sep, k = item.partition("_to_")
        if not sep or q not in towers.MODALITIES or k not in towers.MODALITIES:
            raise ValueError(f"config.eval.pairs item {item!r} is not '<query>_to_<key>' over {towers.MODALITIES}")
        pairs.append((q, k))
    return tuple(pairs)


def eval_modalities(config, model_config: towers.ClibdConfig) -> tuple[str, ...]:
    """Modalities that the retrieval pairs need and the model has."""
    wanted = {m for pair in retrieval_pairs(config) for m in pair}
    return tuple(m for m in model_config.modalities if m in wanted)


class EvalBatches:
    """The eval batches of each split, decoded once and kept in memory when all ``splits``
    together hold at most ``eval.cache_max_records`` records, so every model evaluated in a run
    (the no-alignment baseline, the validation evaluator at each epoch, the trained model)
    embeds the same decoded images; larger splits are decoded again at each pass."""

    def __init__(self, config, setup, splits: Sequence[str], ranks: Sequence[str], *,
                 key_splits: Sequence[str] = ()):
        self.config, self.setup, self.splits, self.ranks = config, setup, tuple(splits), tuple(ranks)
        for split in self.splits:
            if len(setup.data[split]) == 0:
                role = "key" if split in key_splits else "query"
                raise ValueError(f"{role} split {split!r} is empty: there is nothing to retrieve "
                                 f"{'from' if role == 'key' else 'with'}")
        self.cached = sum(len(setup.data[s]) for s in self.splits) <= int(config.eval.cache_max_records)
        self._kept: dict[str, list[Mapping[str, np.ndarray]]] = {}

    def _split(self, split: str) -> Iterator[Mapping[str, np.ndarray]]:
        if split not in self.splits:
            raise KeyError(f"split {split!r} is not one of the evaluated splits {list(self.splits)}")
        if not self.cached:
            return iter(eval_batches(self.config, self.setup, self.setup.data[split], self.ranks))
        if split not in self._kept:
            self._kept[split] = list(eval_batches(self.config, self.setup, self.setup.data[split], self.ranks))
        return iter(self._kept[split])

    def batches(self, splits: Sequence[str]) -> Iterator[Mapping[str, np.ndarray]]:
        """The batches of ``splits`` in turn, each row tagged ``split_id`` = its split's index."""
        for i, split in enumerate(splits):
            for batch in self._split(split):
                yield {**batch, "split_id": np.full(len(batch[pipeline.ROW]), i, np.int32)}


def embed_splits(config, model: towers.ClibdModel, setup, batches: EvalBatches, splits: Sequence[str],
                 ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """Embeds ``splits`` with one jitted forward: ``(embeddings[split][modality],
    labels[split][rank], excluded[split])``; failed images and missing DNA are NaN rows."""
    mods = eval_modalities(config, setup.model_config)
    dim = setup.model_config.embed_dim
    keep = ("split_id", "image_ok", "dna_ok", *(f"label_{r}" for r in batches.ranks))
    out = embed_lib.embed_batches(model, batches.batches(splits), towers.aligned_features(mods), mesh=setup.mesh,
                                  batch_size=int(config.eval.batch_size), keep=keep,
                                  order_by=("split_id", pipeline.ROW))
    embeddings, labels, excluded = {}, {}, {}
    for i, split in enumerate(splits):
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
        labels[split] = {r: out[f"label_{r}"][rows] for r in batches.ranks}
        excluded[split] = {"n_records": int(rows.sum()),
                           "n_image_failed": int((~ok["image"]).sum()) if "image" in mods else None,
                           "n_without_dna": int((~ok["dna"]).sum()) if "dna" in mods else None,
                           **{f"n_unlabelled_{r}": int((labels[split][r] == schema.MISSING_INDEX).sum())
                              for r in batches.ranks}}
    return embeddings, labels, excluded


def evaluate(config, model: towers.ClibdModel, setup, batches: EvalBatches | None = None, *,
             queries: str = TEST_QUERIES) -> dict[str, Any]:
    """The CLIBD retrieval benchmark of ``model`` on the query splits ``config.eval[queries]``
    against ``config.eval.key_splits`` (:func:`bioscan_jax.eval.retrieval.clibd_retrieval`), plus
    the per-split exclusion counts under ``excluded``."""
    keys, (seen, unseen) = sources.retrieval_splits(config.eval, queries)
    ranks = tuple(config.eval.ranks)
    splits = (*keys, seen, unseen)
    batches = batches or EvalBatches(config, setup, splits, ranks, key_splits=keys)
    embeddings, labels, excluded = embed_splits(config, model, setup, batches, splits)
    results = retrieval.clibd_retrieval(
        embeddings, labels, pairs=retrieval_pairs(config), key_splits=keys, query_splits=(seen, unseen),
        ks=tuple(config.eval.ks), ranks=ranks, missing_labels=str(config.eval.missing_labels))
    results["excluded"] = excluded
    return results


#: CLIBD's model-selection score on the validation queries (``compute_overall_acc``).
OVERALL_METRIC = "val/overall_acc"


class ValRetrieval:
    """The evaluator CLIBD training runs (:class:`bioscan_jax.train.loop.Evaluator`): retrieval
    of the validation queries (``config.eval.val_query_splits``, BIOSCAN-5M ``val`` and
    ``val_unseen``) against the keys, reported as
    ``val/<pair>/<rank>_macro_top1_{seen,unseen,hm}`` at the headline rank (species), and
    :data:`OVERALL_METRIC`, CLIBD's model-selection score (:func:`retrieval.overall_accuracy`). The
    test splits are never read during training.

    As ``scripts/train_cl.py``, it evaluates only after ``config.eval.eval_skip_epoch``: at the end
    of 0-based epoch ``e`` when ``e > eval_skip_epoch`` (and after the last step); other calls
    return nothing (``steps_per_epoch`` turns steps into epochs)."""

    def __init__(self, config, setup, batches: EvalBatches, *, steps_per_epoch: int):
        if VAL_QUERIES not in sources.retrieval_query_fields(config.eval):  # also: no test split among them
            raise ValueError("config.eval.val_query_splits is empty: there is nothing to validate on")
        self.config, self.setup, self.batches = config, setup, batches
        self.rank = retrieval.headline_rank(tuple(config.eval.ranks))
        self.steps_per_epoch = int(steps_per_epoch)
        self.skip_epoch = int(config.eval.eval_skip_epoch)

    def epoch_of(self, step: int) -> int:
        """The 0-based epoch that ``step`` ends (or lies in)."""
        return max(0, -(-int(step) // self.steps_per_epoch) - 1)

    def curve_metrics(self) -> list[str]:
        """The names of the harmonic means it logs, one per pair (the training-curve plot)."""
        return [f"val/{q}_to_{k}/{self.rank}_macro_top1_hm" for q, k in retrieval_pairs(self.config)]

    def run(self, model, step: int) -> dict[str, float]:
        if self.epoch_of(step) <= self.skip_epoch:
            return {}
        results = evaluate(self.config, model, self.setup, self.batches, queries=VAL_QUERIES)
        out = {OVERALL_METRIC: retrieval.overall_accuracy(results, tuple(self.config.eval.ranks)),
               "val/epoch": float(self.epoch_of(step))}
        for pair in retrieval.pair_names(results):
            cell = results[pair]["report"].get(self.rank, {}).get("macro_top1", {})
            for which in ("seen", "unseen", "hm"):
                if which in cell:
                    out[f"val/{pair}/{self.rank}_macro_top1_{which}"] = float(cell[which])
        return out

