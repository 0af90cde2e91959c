"""The evaluations of the BarcodeBERT DNA benchmark (:mod:`bioscan_jax.tasks.barcodebert`).

* :func:`run_probes`: the linear probe (species, ``train`` → ``test``) and the 1-NN probe (genus,
  ``train`` → ``test_unseen``) of a frozen encoder, with the same 1-NN probe of a random-init
  encoder and of k-mer count vectors (:func:`kmer_baseline`);
* :func:`probe_head`: the species linear probe a fine-tuning head starts from (LP-FT);
* :func:`val_keeper`: the fine-tune stage's evaluator, species accuracy on
  :func:`validation_split` at each epoch end, keeping the parameters of the best epoch
  (``finetune.select``, checked by :func:`check_finetune_selection`);
* :func:`finetune_accuracy`: the fine-tuned classifier's species accuracy on ``test``.

Every function reads the task's config (its ``data``, ``probe`` and ``finetune`` sections).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from flax import nnx

from bioscan_jax.data import dna as dna_lib
from bioscan_jax.data import pipeline, sources
from bioscan_jax.eval import embed as embed_lib
from bioscan_jax.eval import evaluators, probes
from bioscan_jax.models import kmer_bert
from bioscan_jax import sharding as mesh_lib

#: The probe settings a linear-probe head (``finetune.head_init='linear_probe'``) depends on.
LINEAR_PROBE_FIELDS = ("linear_recipe", "linear_epochs", "linear_lr", "linear_batch_size", "linear_momentum",
                       "linear_weight_decay", "linear_rank")
#: ``finetune.select``: which parameters of the fine-tuning run the test accuracy is reported for.
SELECTS = ("last", "best_val")
#: Where the fine-tune stage keeps the parameters of its best validation epoch.
BEST_VAL_DIR = "best_val"
#: What :func:`val_keeper` logs (:class:`~bioscan_jax.eval.evaluators.Accuracy` with prefix ``val``).
VAL_METRIC = "val/accuracy"


def validation_split(config) -> str | None:
    """The split fine-tuning reports its species accuracy on at each epoch end, and pretraining
    its masked-token loss (``finetune.val_split``, default ``'val'``); None when it is ``''`` or for a BOLD import
    (``data.source='bold'``), which has no validation split
    (:func:`bioscan_jax.data.bold.assign_species_split` makes pretrain, train, test and
    test_unseen only). The test split is never evaluated during training."""
    split = config.finetune.get("val_split", "val")
    if not split or config.data.source == "bold":
        return None
    return split


def no_validation_reason(config) -> str:
    """Why :func:`validation_split` is None, for the stages' log lines."""
    return ("a BOLD import has no validation split" if config.data.source == "bold"
            else "config.finetune.val_split is empty")


def check_finetune_selection(config) -> None:
    """``finetune.select`` is known, ``best_val`` has a validation split, and that split is not
    the test split (``ValueError`` naming the field)."""
    select = config.finetune.get("select", "last")
    if select not in SELECTS:
        raise ValueError(f"unknown config.finetune.select {select!r}; valid: {', '.join(SELECTS)}")
    split = validation_split(config)
    if split is not None and split == config.data.test_split:
        raise ValueError(f"config.finetune.val_split={split!r} is the test split: training never evaluates on it")
    if select == "best_val" and split is None:
        raise ValueError("config.finetune.select='best_val' needs a validation split: "
                         + ("a BOLD import has none (use select='last')" if config.data.source == "bold"
                            else "set config.finetune.val_split"))


def label_ranks(config) -> tuple[str, ...]:
    """The label columns the probes and the fine-tuned accuracy read."""
    return tuple(dict.fromkeys((config.probe.knn_rank, config.probe.linear_rank, "species")))


def _eval_batches(config, source, tokenizer):
    return pipeline.dna_pipeline(
        source, tokenizer=tokenizer, batch_size=mesh_lib.process_batch_size(config.probe.eval_batch_size), train=False,
        drop_remainder=False, shard="jax", num_epochs=1, keep=label_ranks(config))


def embed_split(config, model: nnx.Module, source, tokenizer, mesh, fn) -> dict[str, np.ndarray]:
    """``fn(model, batch)`` over a whole split, with its labels (:func:`label_ranks`)."""
    return embed_lib.embed_batches(model, _eval_batches(config, source, tokenizer), fn, mesh=mesh,
                                   batch_size=config.probe.eval_batch_size, keep=label_ranks(config))


def predicted_class(model, batch):
    logits, _ = model(batch["ids"], batch["attention_mask"])
    return logits.argmax(-1)[:, None]


def species_predictions(config, model, source, tokenizer, mesh) -> tuple[np.ndarray, np.ndarray]:
    """The classifier's predicted species (argmax) and the true species of every record of
    ``source``: what the test accuracy and the per-epoch validation accuracy are computed from."""
    pred = embed_split(config, model, source, tokenizer, mesh, predicted_class)
    return pred["embedding"][:, 0], pred["species"]


def val_keeper(config, data: sources.Splits, tokenizer, mesh, workdir: str) -> evaluators.KeepBest | None:
    """The fine-tune stage's evaluator: species accuracy on :func:`validation_split` as
    ``val/accuracy``, keeping the parameters of the best epoch in ``workdir/finetune/best_val``
    (whatever ``finetune.select`` says, so the choice can be made after training); None without a
    validation split."""
    split = validation_split(config)
    if split is None:
        return None
    source = data[split]
    accuracy = evaluators.Accuracy(lambda model: species_predictions(config, model, source, tokenizer, mesh),
                                   prefix="val")
    return evaluators.KeepBest(accuracy, os.path.join(workdir, "finetune", BEST_VAL_DIR), metric=VAL_METRIC)


def kmer_baseline(config, data: sources.Splits) -> dict[str, Any]:
    """1-NN accuracy (``probe.knn_rank``) of k-mer count vectors (cosine), keys and queries as the
    probe's."""
    k = int(config.probe.kmer_baseline_k)
    tok = dna_lib.tokenizer_for(config.model.tokenization, k, max_nucleotides=config.data.max_nucleotides)

    def counts(split):
        records = data[split]
        seqs = [r["dna_barcode"] for r in records]
        names = [r["processid"] for r in records]
        ids, _ = tok(seqs, names=names)
        labels = np.asarray([r[config.probe.knn_rank] for r in records])
        return dna_lib.kmer_counts(ids, k, dtype=np.float32), labels

    kx, ky = counts(config.data.probe_key_split)
    qx, qy = counts(config.data.probe_query_split)
    return {**probes.knn_probe(kx, ky, qx, qy), "k": k}


def _linear_fit_options(config) -> dict[str, Any]:
    """The linear probe's recipe and optimisation settings (``probe`` section), for
    :func:`probes.linear_probe`."""
    p = config.probe
    opts = dict(recipe=p.linear_recipe, epochs=p.linear_epochs, lr=p.linear_lr, batch_size=p.linear_batch_size,
                seed=config.seed)
    if p.linear_recipe == "reference":
        opts.update(momentum=p.linear_momentum, weight_decay=p.linear_weight_decay)
    return opts


def run_probes(config, data, model_cfg, tokenizer, encoder, mesh) -> dict[str, Any]:
    """Linear probe (species, train → test) and 1-NN probe (genus, train → test_unseen; ranks
    ``probe.linear_rank`` and ``probe.knn_rank``) of the
    frozen ``encoder``; the same 1-NN probe of a random-init encoder and of k-mer counts."""
    d = config.data
    out: dict[str, Any] = {}
    emb = {s: embed_split(config, encoder, data[s], tokenizer, mesh, kmer_bert.pooled_embedding)
           for s in dict.fromkeys((d.finetune_split, d.test_split, d.probe_key_split, d.probe_query_split))}
    rank = config.probe.knn_rank
    out["knn"] = {**probes.knn_probe(
        emb[d.probe_key_split]["embedding"], emb[d.probe_key_split][rank],
        emb[d.probe_query_split]["embedding"], emb[d.probe_query_split][rank]), "rank": rank}
    lr = config.probe.linear_rank
    out["linear"] = {**probes.linear_probe(
        emb[d.finetune_split]["embedding"], emb[d.finetune_split][lr],
        emb[d.test_split]["embedding"], emb[d.test_split][lr], num_classes=data.num_classes(lr),
        return_head=True, **_linear_fit_options(config)), "rank": lr}
    if config.probe.random_init_baseline:
        random_encoder = kmer_bert.KmerBert(model_cfg, rngs=nnx.Rngs(config.seed + 1000))
        rnd = {s: embed_split(config, random_encoder, data[s], tokenizer, mesh, kmer_bert.pooled_embedding)
               for s in dict.fromkeys((d.probe_key_split, d.probe_query_split))}
        out["knn_random_init"] = probes.knn_probe(
            rnd[d.probe_key_split]["embedding"], rnd[d.probe_key_split][rank],
            rnd[d.probe_query_split]["embedding"], rnd[d.probe_query_split][rank])
    out["kmer_baseline"] = kmer_baseline(config, data)
    return out


def probe_head(config, data, tokenizer, encoder, mesh) -> probes.LinearHead:
    """A species linear probe of the frozen ``encoder`` on ``data.finetune_split`` (for
    ``finetune.head_init='linear_probe'`` when the probes stage did not run)."""
    emb = embed_split(config, encoder, data[config.data.finetune_split], tokenizer, mesh, kmer_bert.pooled_embedding)
    ok = emb["species"] >= 0
    return probes.fit_head(emb["embedding"][ok], emb["species"][ok], num_classes=data.num_classes("species"),
                           **_linear_fit_options(config))


def finetune_accuracy(config, model, data, tokenizer, mesh) -> dict[str, Any]:
    """Species accuracy of the fine-tuned classifier on ``data.test_split`` (labelled rows,
    :func:`bioscan_jax.eval.evaluators.labelled_accuracy`, as the per-epoch validation accuracy)."""
    predicted, species = species_predictions(config, model, data[config.data.test_split], tokenizer, mesh)
    acc = evaluators.labelled_accuracy(predicted, species)
    return {"accuracy": acc["accuracy"], "ci95": acc["ci95"], "n": acc["n"], "n_test": acc["n"],
            "n_excluded": acc["n_excluded"]}
