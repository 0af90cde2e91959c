"""BarcodeBERT: masked k-mer pretraining → species fine-tuning → linear and 1-NN probes.

The three BIOSCAN-5M DNA metrics, as in the paper:

* fine-tuned species accuracy on ``test`` (encoder + mean-pooled linear head, trained on ``train``);
* linear-probe species accuracy on ``test`` (frozen pretrained encoder, softmax regression);
* 1-NN genus accuracy on unseen species (cosine on masked-mean embeddings; keys = ``train``,
  queries = ``test_unseen``).

Every run also reports the 1-NN probe of the same encoder with random weights and of k-mer count
vectors on the same split, so it shows what pretraining buys and where the model stands against
the alignment-free baseline. Results go to ``workdir/summary.json``, ``workdir/summary.md`` and a
plot of the training curves, ``workdir/training_curves.png``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import ml_collections
import numpy as np
from flax import nnx

from bioscan_jax.data import dna as dna_lib
from bioscan_jax.data import pipeline, schema, sources
from bioscan_jax.eval import embed as embed_lib
from bioscan_jax.eval import evaluators, probes
from bioscan_jax.models import kmer_bert
from bioscan_jax.train import loop, losses, stages
from bioscan_jax import sharding as mesh_lib
from bioscan_jax.checkpoint import complete_steps
from bioscan_jax.train.metrics import read_metrics

logger = logging.getLogger(__name__)

STAGES = ("pretrain", "finetune", "probes")
#: ``finetune.head_init``: a random classifier head (the reference) or the species linear probe
#: of the frozen pretrained encoder (LP-FT: Kumar et al., ICLR 2022).
HEAD_INITS = ("random", "linear_probe")


#: The probe settings a linear-probe head (``finetune.head_init='linear_probe'``) depends on.
LINEAR_PROBE_FIELDS = ("linear_recipe", "linear_epochs", "linear_lr", "linear_batch_size", "linear_momentum",
                       "linear_weight_decay", "linear_rank")


def _check_stages(config) -> tuple[str, ...]:
    stages = tuple(s.strip() for s in config.stages.split(",") if s.strip())
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise ValueError(f"unknown config.stages {bad}; valid: {', '.join(STAGES)}")
    return stages


def open_data(config) -> sources.Splits:
    """The splits the task reads (pretraining, fine-tuning, test, 1-NN keys and queries), each
    deduplicated by barcode over the whole metadata when ``data.dedup_barcodes`` (the
    reference's ``data/data_split.py``: :func:`sources.reference_dedup`). ``sizes`` records every
    split's size before and after."""
    d = config.data
    wanted = list(dict.fromkeys((sources.pretrain_split(d), d.finetune_split, d.test_split, d.probe_key_split,
                                 d.probe_query_split)))
    if validation_split(config) is not None:  # fine-tuning's per-epoch accuracy
        wanted.append(validation_split(config))
        wanted = list(dict.fromkeys(wanted))
    features = tuple(dict.fromkeys((*stages.DNA_FEATURES, schema.FIRST_OF_BARCODE, *label_ranks(config))))
    data = sources.open_splits(d, wanted, features=features, seed=config.seed)
    sizes: dict[str, Any] = {}
    for split in wanted:
        records = len(data[split])
        if d.dedup_barcodes:
            data.sources[split] = sources.reference_dedup(data[split])
            if len(data[split]) == 0:
                raise ValueError(f"split {split!r} has no record left after barcode deduplication ({records} records)")
        sizes[split] = {"records": records, "used": len(data[split])}
    data.sizes = sizes
    return data


def check_batches_fit(config, data: sources.Splits, stages: tuple[str, ...]) -> None:
    """Every training stage asked for has at least one batch of records (checked before any
    stage runs: a fine-tuning split too small for its batch fails before pretraining)."""
    for stage, split in (("pretrain", sources.pretrain_split(config.data)), ("finetune", config.data.finetune_split)):
        batch = int(config[stage].train.batch_size)
        if stage in stages and len(data[split]) < batch:
            raise ValueError(
                f"config.{stage}.train.batch_size={batch} is larger than the {stage} split {split!r} "
                f"({len(data[split])} records{' after barcode deduplication' if config.data.dedup_barcodes else ''}); "
                f"lower the batch size or use a larger split")


def evaluated_sets(config, data: sources.Splits) -> dict[str, dict[str, Any]]:
    """What each metric is computed on: the split and its number of records (after dedup)."""
    d = config.data
    roles = {"pretrain": sources.pretrain_split(d), "finetune_train": d.finetune_split, "test": d.test_split,
             "knn_keys": d.probe_key_split, "knn_queries": d.probe_query_split}
    return {role: {"split": split, "records": len(data[split])} for role, split in roles.items()}


#: ``finetune.select``: which parameters of the fine-tuning run the test accuracy is reported for.
SELECTS = ("last", "best_val")
#: Where the fine-tune stage keeps the parameters of its best validation epoch.
BEST_VAL_DIR = "best_val"
VAL_METRIC = "val/accuracy"


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


def finetune(config, data: sources.Splits, model_cfg, tokenizer, encoder: nnx.Module | None, workdir: str,
             head: probes.LinearHead | None = None, encoder_identity: str = "", mesh=None):
    """Species fine-tuning on ``data.finetune_split``, starting from ``encoder`` (if given) and
    from ``head`` (a linear probe of the frozen encoder, for ``finetune.head_init='linear_probe'``)
    or a random head. ``encoder_identity`` (the pretraining run's fingerprint) is part of this
    stage's run identity.

    At each epoch end and after the last step the species accuracy on :func:`validation_split`
    goes to ``finetune/metrics.jsonl`` as ``val/accuracy`` (:func:`val_keeper`; it reads the model
    only: the training batches, RNG and result are those of a run without it); the parameters of
    the best epoch are kept in ``finetune/best_val``, cleared when the stage starts from step 0."""
    mesh = mesh_lib.make_mesh(config.mesh) if mesh is None else mesh
    keeper = val_keeper(config, data, tokenizer, mesh, workdir)
    stage_dir = os.path.join(workdir, "finetune")
    if keeper is None:
        logger.info("fine-tuning reports no validation accuracy: %s",
                    "a BOLD import has no validation split" if config.data.source == "bold"
                    else "config.finetune.val_split is empty")
    elif config.get("resume", "auto") == "restart" or not complete_steps(os.path.join(stage_dir, "checkpoints")):
        keeper.clear()  # a run from step 0 keeps nothing of an earlier one
    source = data[config.data.finetune_split]
    num_classes = data.num_classes("species")
    stage = config.finetune
    batch = stage.train.batch_size

    def factory(rngs):
        return kmer_bert.KmerBertClassifier(model_cfg, num_classes, pooling=stage.get("pooling", "masked_mean"),
                                            rngs=rngs)

    warm_start = {}
    if encoder is not None:  # start the encoder from the pretrained one
        warm_start["bert"] = nnx.state(encoder, nnx.Param).to_pure_dict()
    if head is not None:
        if head.kernel.shape != (model_cfg.hidden_size, num_classes):
            raise ValueError(f"linear-probe head of shape {head.kernel.shape} does not fit the classifier "
                             f"({model_cfg.hidden_size} features, {num_classes} species)")
        warm_start["head"] = {"kernel": head.kernel, "bias": head.bias}

    def data_iter():
        return iter(pipeline.dna_pipeline(
            source, tokenizer=tokenizer, batch_size=stages.local_batch(batch), train=True, seed=config.seed + 1,
            label_rank="species", worker_count=config.data.worker_count))

    # val_split decides which parameters best_val/ keeps, so it is part of the identity; select is
    # not: it changes neither the training nor what is kept, only which kept parameters are reported.
    identity = stages.dna_stage_identity(model_cfg, tokenizer, data, config.data.finetune_split, num_classes=num_classes,
                              pooling=stage.get("pooling", "masked_mean"),
                              encoder=(encoder_identity or "given") if encoder is not None else "random",
                              head=({k: config.probe[k] for k in LINEAR_PROBE_FIELDS} if head is not None else "random"),
                              val_split=validation_split(config) or "")
    return loop.train(
        stages.stage_config(config, stage), stage_dir, model_factory=factory,
        loss_fn=losses.classification_loss, data_iter_factory=data_iter, steps_per_epoch=len(source) // batch,
        warm_start=warm_start or None, identity=identity, evaluators=[keeper] if keeper is not None else ())


def label_ranks(config) -> tuple[str, ...]:
    """The label columns the probes and the fine-tuned accuracy read."""
    return tuple(dict.fromkeys((config.probe.knn_rank, config.probe.linear_rank, "species")))


def _eval_batches(config, source, tokenizer):
    return pipeline.dna_pipeline(
        source, tokenizer=tokenizer, batch_size=stages.local_batch(config.probe.eval_batch_size), train=False,
        drop_remainder=False, shard="jax", num_epochs=1, keep=label_ranks(config))


def embed_split(config, model: nnx.Module, source, tokenizer, mesh, fn) -> dict[str, np.ndarray]:
    """``fn(model, batch)`` over a whole split, with its labels (:func:`label_ranks`)."""
    return embed_lib.embed_batches(model, _eval_batches(config, source, tokenizer), fn, mesh=mesh,
                                   batch_size=config.probe.eval_batch_size, keep=label_ranks(config))


def predicted_class(model, batch):
    logits, _ = model(batch["ids"], batch["attention_mask"])
    return logits.argmax(-1)[:, None]


def kmer_baseline(config, data: sources.Splits) -> dict[str, Any]:
    """1-NN accuracy (``probe.knn_rank``) of k-mer count vectors (cosine), keys and queries as the
    probe's."""
    k = int(config.probe.kmer_baseline_k)
    tok = dna_lib.KmerTokenizer(k, max_nucleotides=config.data.max_nucleotides,
                                strip_trailing_n=bool(config.data.strip_trailing_n))

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
    out["linear"] = probes.linear_probe(
        emb[d.finetune_split]["embedding"], emb[d.finetune_split][lr],
        emb[d.test_split]["embedding"], emb[d.test_split][lr], num_classes=data.num_classes(lr),
        return_head=True, **_linear_fit_options(config))
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
    return {"accuracy": acc["accuracy"], "n_test": acc["n"], "n_excluded": acc["n_excluded"]}


def logged_value(stage_dir: str, key: str, step: int) -> float | None:
    """The last value of ``key`` logged at ``step`` in ``stage_dir/metrics.jsonl`` (a resumed run
    may log a step twice), or None."""
    values = [r[key] for r in read_metrics(stage_dir) if r.get("step") == step and key in r]
    return float(values[-1]) if values else None


def selected_model(config, data, tokenizer, mesh, workdir: str, result: loop.TrainResult):
    """The fine-tuned model ``finetune.select`` reports: the last step's (``'last'``) or the best
    validation epoch's (``'best_val'``, from ``finetune/best_val``); with what was selected:
    ``{'select', 'selected_step', 'val': {'split', 'records', 'accuracy'} or None}``."""
    select = config.finetune.get("select", "last")
    split = validation_split(config)
    model = result.model()
    if select == "best_val":  # check_finetune_selection: there is a validation split
        step, value = val_keeper(config, data, tokenizer, mesh, workdir).restore_into(model)
    else:
        step = result.step
        value = logged_value(os.path.join(workdir, "finetune"), VAL_METRIC, step) if split is not None else None
    val = {"split": split, "records": len(data[split]), "accuracy": value} if split is not None else None
    return model, {"select": select, "selected_step": int(step), "val": val}


def summary_table(summary: dict[str, Any]) -> str:
    """The paper's three DNA metrics plus the baselines, as a Markdown table."""
    rank = summary.get("probes", {}).get("knn", {}).get("rank", "genus")
    finetuned = summary.get("finetune", {})
    which = ", best-val epoch" if finetuned.get("select") == "best_val" else ""
    rows = [
        (f"Fine-tuned species accuracy (test{which})", finetuned.get("accuracy")),
        (f"Fine-tuned species accuracy (val{which})", (finetuned.get("val") or {}).get("accuracy")),
        ("Linear probe species accuracy (test)", summary.get("probes", {}).get("linear", {}).get("accuracy")),
        (f"1-NN {rank} accuracy, unseen species (pretrained)", summary.get("probes", {}).get("knn", {}).get("accuracy")),
        (f"1-NN {rank} accuracy, unseen species (random init)",
         summary.get("probes", {}).get("knn_random_init", {}).get("accuracy")),
        (f"1-NN {rank} accuracy, unseen species (k-mer counts, k={summary.get('probes', {}).get('kmer_baseline', {}).get('k')})",
         summary.get("probes", {}).get("kmer_baseline", {}).get("accuracy")),
    ]
    lines = ["| metric | % |", "|---|---:|"]
    for name, value in rows:
        if value is not None:
            lines.append(f"| {name} | {100 * value:.2f} |")
    return "\n".join(lines)


def stage_curves(stage_dir: str) -> dict[str, tuple[list[int], list[float]]]:
    """The curves :func:`plot_curves` draws for one stage, ``name -> (steps, values)`` from its
    ``metrics.jsonl``: ``loss`` and (when logged) the training ``accuracy`` of the log steps, and
    ``val accuracy`` of the evaluation steps (fine-tuning: each epoch end; the last record of a
    step a resumed run logged twice)."""
    records = read_metrics(stage_dir)
    train = [r for r in records if "loss" in r and "step" in r]
    curves = {"loss": ([r["step"] for r in train], [r["loss"] for r in train])}
    if train and "accuracy" in train[0]:
        curves["accuracy"] = ([r["step"] for r in train], [r.get("accuracy") for r in train])
    val = {r["step"]: r[VAL_METRIC] for r in records if VAL_METRIC in r and "step" in r}
    if val:
        curves["val accuracy"] = (sorted(val), [val[s] for s in sorted(val)])
    return curves


def plot_curves(workdir: str) -> str | None:
    """Training loss (and accuracy) per stage from the stages' ``metrics.jsonl``, with the
    fine-tuning validation accuracy per epoch (:func:`stage_curves`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in ("pretrain", "finetune") if os.path.exists(os.path.join(workdir, s, "metrics.jsonl"))]
    if not stages:
        return None
    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.5), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        curves = stage_curves(os.path.join(workdir, stage))
        ax.plot(*curves["loss"], label="loss")
        ax.set_xlabel("step")
        ax.set_title(stage)
        if "accuracy" in curves or "val accuracy" in curves:
            ax2 = ax.twinx()
            if "accuracy" in curves:
                ax2.plot(*curves["accuracy"], color="tab:orange", label="accuracy")
            if "val accuracy" in curves:
                ax2.plot(*curves["val accuracy"], color="tab:green", marker="o", label="val accuracy")
                ax2.legend(loc="lower right", fontsize="small")
            ax2.set_ylabel("accuracy")
        ax.set_ylabel("loss")
    fig.tight_layout()
    path = os.path.join(workdir, "training_curves.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Pretrain → fine-tune → probes (``config.stages``); returns and writes the summary."""
    t_start = time.perf_counter()
    wanted = _check_stages(config)
    model_cfg = kmer_bert.config_from(config.model)
    mesh = mesh_lib.make_mesh(config.mesh)
    for stage in ("pretrain", "finetune"):  # fail on config errors before any compute
        if stage in wanted:
            loop.validate_config(stages.stage_config(config, config[stage]), steps_per_epoch=1)
    mesh_lib.validate_batch(config.probe.eval_batch_size, mesh)
    for field in ("knn_rank", "linear_rank"):
        if config.probe[field] not in schema.LABEL_COLUMNS:
            raise ValueError(f"config.probe.{field}={config.probe[field]!r}; valid: {', '.join(schema.LABEL_COLUMNS)}")
    head_init = config.finetune.get("head_init", "random")
    if head_init not in HEAD_INITS:
        raise ValueError(f"unknown config.finetune.head_init {head_init!r}; valid: {', '.join(HEAD_INITS)}")
    check_finetune_selection(config)
    os.makedirs(workdir, exist_ok=True)
    if config.probe.linear_recipe not in probes.LINEAR_RECIPES:
        raise ValueError(f"unknown config.probe.linear_recipe {config.probe.linear_recipe!r}; "
                         f"valid: {', '.join(probes.LINEAR_RECIPES)}")
    if config.finetune.get("pooling", "masked_mean") not in kmer_bert.POOLINGS:
        raise ValueError(f"unknown config.finetune.pooling {config.finetune.pooling!r}; "
                         f"valid: {', '.join(kmer_bert.POOLINGS)}")
    tokenizer = dna_lib.KmerTokenizer(model_cfg.k, max_nucleotides=config.data.max_nucleotides,
                                      strip_trailing_n=bool(config.data.strip_trailing_n))
    data = open_data(config)
    summary: dict[str, Any] = {"data": data.description, "model": config.model.variant, "k": model_cfg.k,
                               "model_config": config.model.to_dict(),
                               "dedup_barcodes": bool(config.data.dedup_barcodes),
                               "strip_trailing_n": bool(config.data.strip_trailing_n),
                               "split_sizes": data.sizes, "eval_sets": evaluated_sets(config, data)}
    logger.info("data %s: %s", data.description, summary["split_sizes"])
    check_batches_fit(config, data, wanted)

    encoder = None
    encoder_identity = ""
    head = None
    if "pretrain" in wanted:
        t0 = time.perf_counter()
        val = validation_split(config)
        validation = stages.mlm_validation(config.pretrain, data[val], tokenizer, seed=config.seed, mesh=mesh,
                                           rules=mesh_lib.normalize_rules(config.sharding_rules),
                                           batch_size=config.probe.eval_batch_size) if val else None
        result = stages.pretrain_mlm(config, config.pretrain, data, sources.pretrain_split(config.data), model_cfg,
                                     tokenizer, os.path.join(workdir, "pretrain"),
                                     worker_count=config.data.worker_count,
                                     evaluators=[validation] if validation else ())
        encoder = result.model().bert
        encoder_identity = result.fingerprint
        summary["pretrain"] = {"steps": result.step, "seconds": time.perf_counter() - t0,
                               "run_identity": result.fingerprint}
    if "probes" in wanted:
        if encoder is None:
            logger.warning("probes without pretraining: probing a random-init encoder")
            encoder = kmer_bert.KmerBert(model_cfg, rngs=nnx.Rngs(config.seed))
        t0 = time.perf_counter()
        summary["probes"] = run_probes(config, data, model_cfg, tokenizer, encoder, mesh)
        head = summary["probes"]["linear"].pop("head")
        if config.probe.linear_rank != "species":  # the fine-tuning head classifies species
            head = None
        summary["probes"]["seconds"] = time.perf_counter() - t0
    if "finetune" in wanted:
        t0 = time.perf_counter()
        if head_init == "random":
            head = None
        elif head is None:
            if encoder is None:
                raise ValueError("finetune.head_init='linear_probe' needs the pretrain stage (or a pretrained encoder)")
            head = probe_head(config, data, tokenizer, encoder, mesh)
        result = finetune(config, data, model_cfg, tokenizer, encoder, workdir, head=head,
                          encoder_identity=encoder_identity, mesh=mesh)
        model, selected = selected_model(config, data, tokenizer, mesh, workdir, result)
        summary["finetune"] = {**finetune_accuracy(config, model, data, tokenizer, mesh),
                               "head_init": head_init, "steps": result.step, **selected,
                               "seconds": time.perf_counter() - t0, "run_identity": result.fingerprint}
    summary["seconds"] = time.perf_counter() - t_start
    table = summary_table(summary)
    print(table, flush=True)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=float)
    with open(os.path.join(workdir, "summary.md"), "w") as f:
        f.write(table + "\n")
    plot_curves(workdir)
    return summary
