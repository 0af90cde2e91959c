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
from flax import nnx

from bioscan_jax.data import dna as dna_lib
from bioscan_jax.data import schema, sources
from bioscan_jax.eval import evaluators, probes
from bioscan_jax.tasks.barcodebert import evaluation as dna_probes
from bioscan_jax.tasks.barcodebert.finetune import finetune_species
from bioscan_jax.tasks.barcodebert.evaluation import validation_split
from bioscan_jax.models import kmer_bert
from bioscan_jax.train import curves, loop, stages
from bioscan_jax import sharding as mesh_lib
from bioscan_jax.checkpoint import complete_steps
from bioscan_jax.train.metrics import logged_value

logger = logging.getLogger(__name__)

STAGES = ("pretrain", "finetune", "probes")
#: ``finetune.head_init``: a random classifier head (the reference) or the species linear probe
#: of the frozen pretrained encoder (LP-FT: Kumar et al., ICLR 2022).
HEAD_INITS = ("random", "linear_probe")


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
    features = tuple(dict.fromkeys((*stages.DNA_FEATURES, schema.FIRST_OF_BARCODE, *dna_probes.label_ranks(config))))
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


def finetune(config, data: sources.Splits, model_cfg, tokenizer, encoder: nnx.Module | None, workdir: str,
             head: probes.LinearHead | None = None, encoder_identity: str = "", mesh=None):
    """Species fine-tuning on ``data.finetune_split`` (:func:`bioscan_jax.tasks.barcodebert.finetune.finetune_species`),
    starting from ``encoder`` (if given) and from ``head`` (a linear probe of the frozen encoder,
    for ``finetune.head_init='linear_probe'``) or a random head. ``encoder_identity`` (the
    pretraining run's fingerprint) is part of this stage's run identity.

    At each epoch end and after the last step the species accuracy on :func:`validation_split`
    goes to ``finetune/metrics.jsonl`` as ``val/accuracy`` (:func:`dna_probes.val_keeper`; it reads the model
    only: the training batches, RNG and result are those of a run without it); the parameters of
    the best epoch are kept in ``finetune/best_val``, cleared when the stage starts from step 0."""
    mesh = mesh_lib.make_mesh(config.mesh) if mesh is None else mesh
    keeper = dna_probes.val_keeper(config, data, tokenizer, mesh, workdir)
    stage_dir = os.path.join(workdir, "finetune")
    if keeper is None:
        logger.info("fine-tuning reports no validation accuracy: %s", dna_probes.no_validation_reason(config))
    elif config.get("resume", "auto") == "restart" or not complete_steps(os.path.join(stage_dir, "checkpoints")):
        keeper.clear()  # a run from step 0 keeps nothing of an earlier one
    # val_split decides which parameters best_val/ keeps, so it is part of the identity; select is
    # not: it changes neither the training nor what is kept, only which kept parameters are reported.
    return finetune_species(
        config, config.finetune, data, config.data.finetune_split, model_cfg, tokenizer, stage_dir,
        encoder=encoder, encoder_identity=encoder_identity,
        head=None if head is None else {"kernel": head.kernel, "bias": head.bias},
        head_identity={k: config.probe[k] for k in dna_probes.LINEAR_PROBE_FIELDS},
        worker_count=config.data.worker_count, evaluators=[keeper] if keeper is not None else (),
        val_split=validation_split(config) or "")


def selected_model(config, data, tokenizer, mesh, workdir: str, result: loop.TrainResult):
    """The fine-tuned model ``finetune.select`` reports: the last step's (``'last'``) or the best
    validation epoch's (``'best_val'``, from ``finetune/best_val``); with what was selected:
    ``{'select', 'selected_step', 'val': {'split', 'records', 'accuracy'} or None}``."""
    select = config.finetune.get("select", "last")
    split = validation_split(config)
    model = result.model()
    if select == "best_val":  # dna_probes.check_finetune_selection: there is a validation split
        step, value = dna_probes.val_keeper(config, data, tokenizer, mesh, workdir).restore_into(model)
    else:
        step = result.step
        value = logged_value(os.path.join(workdir, "finetune"), dna_probes.VAL_METRIC, step) if split is not None else None
    val = None
    if split is not None:  # scored again for its interval: the value logged at that step, with ci95 and n
        scored = evaluators.labelled_accuracy(*dna_probes.species_predictions(config, model, data[split], tokenizer,
                                                                              mesh))
        val = {"split": split, "records": len(data[split]), "accuracy": value, "ci95": scored["ci95"],
               "n": scored["n"]}
    return model, {"select": select, "selected_step": int(step), "val": val}


#: What the probed encoder is, as ``summary['probes']['encoder']`` and the 1-NN row's label: a run
#: without the pretrain stage probes a random-init encoder, and its table must not say "pretrained".
PRETRAINED = "pretrained"
NOT_PRETRAINED = "random init: no pretrain stage"


def summary_table(summary: dict[str, Any]) -> str:
    """The paper's three DNA metrics plus the baselines, as a Markdown table."""
    probed = summary.get("probes", {})
    rank = probed.get("knn", {}).get("rank", "genus")
    encoder = probed.get("encoder", PRETRAINED)
    not_pretrained = "" if encoder == PRETRAINED else f"; {encoder}"
    finetuned = summary.get("finetune", {})
    which = ", best-val epoch" if finetuned.get("select") == "best_val" else ""
    rows = [
        (f"Fine-tuned species accuracy (test{which})", finetuned),
        (f"Fine-tuned species accuracy (val{which})", finetuned.get("val") or {}),
        (f"Linear probe {probed.get('linear', {}).get('rank', 'species')} accuracy (test{not_pretrained})",
         probed.get("linear", {})),
        (f"1-NN {rank} accuracy, unseen species ({encoder})", probed.get("knn", {})),
        (f"1-NN {rank} accuracy, unseen species (random init)", probed.get("knn_random_init", {})),
        (f"1-NN {rank} accuracy, unseen species (k-mer counts, k={probed.get('kmer_baseline', {}).get('k')})",
         probed.get("kmer_baseline", {})),
    ]
    lines = ["| metric | % | 95% CI | n |", "|---|---:|---|---:|"]
    for name, entry in rows:
        if entry.get("accuracy") is None:
            continue
        ci = entry.get("ci95")
        interval = f"{100 * ci[0]:.1f}–{100 * ci[1]:.1f}" if ci else ""
        lines.append(f"| {name} | {100 * entry['accuracy']:.2f} | {interval} | {entry.get('n', '')} |")
    return "\n".join(lines)


def check_config(config: ml_collections.ConfigDict) -> list[str]:
    """Every config error of the task, as one line, before any data is built; returns the stages
    to run (``config.stages``)."""
    wanted = _check_stages(config)
    mesh = mesh_lib.make_mesh(config.mesh)
    for stage in ("pretrain", "finetune"):
        if stage in wanted:
            loop.validate_config(stages.stage_config(config, config[stage]), steps_per_epoch=1)
    mesh_lib.validate_batch(config.probe.eval_batch_size, mesh)
    for field in ("knn_rank", "linear_rank"):
        if config.probe[field] not in schema.LABEL_COLUMNS:
            raise ValueError(f"config.probe.{field}={config.probe[field]!r}; valid: {', '.join(schema.LABEL_COLUMNS)}")
    head_init = config.finetune.get("head_init", "random")
    if head_init not in HEAD_INITS:
        raise ValueError(f"unknown config.finetune.head_init {head_init!r}; valid: {', '.join(HEAD_INITS)}")
    if "finetune" in wanted and head_init == "linear_probe" and "pretrain" not in wanted:
        raise ValueError("finetune.head_init='linear_probe' needs the pretrain stage in config.stages "
                         "(fine-tuning starts from its encoder); add 'pretrain' (a finished pretraining in "
                         "the workdir is restored, not trained again)")
    dna_probes.check_finetune_selection(config)
    if config.probe.linear_recipe not in probes.LINEAR_RECIPES:
        raise ValueError(f"unknown config.probe.linear_recipe {config.probe.linear_recipe!r}; "
                         f"valid: {', '.join(probes.LINEAR_RECIPES)}")
    if config.finetune.get("pooling", "masked_mean") not in kmer_bert.POOLINGS:
        raise ValueError(f"unknown config.finetune.pooling {config.finetune.pooling!r}; "
                         f"valid: {', '.join(kmer_bert.POOLINGS)}")
    if config.model.tokenization not in dna_lib.TOKENIZATION_PROTOCOLS:
        raise ValueError(f"unknown config.model.tokenization {config.model.tokenization!r}; "
                         f"valid: {', '.join(dna_lib.TOKENIZATION_PROTOCOLS)}")
    return wanted


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Pretrain → probes → fine-tune (``config.stages``; fine-tuning can start its head from the
    probes' species linear probe); returns and writes the summary."""
    t_start = time.perf_counter()
    wanted = check_config(config)
    model_cfg = kmer_bert.config_from(config.model)
    mesh = mesh_lib.make_mesh(config.mesh)
    os.makedirs(workdir, exist_ok=True)
    tokenizer = dna_lib.tokenizer_for(config.model.tokenization, model_cfg.k,
                                      max_nucleotides=config.data.max_nucleotides)
    data = open_data(config)
    summary: dict[str, Any] = {"data": data.description, "model": config.model.variant, "k": model_cfg.k,
                               "model_config": config.model.to_dict(),
                               "dedup_barcodes": bool(config.data.dedup_barcodes),
                               "tokenization": str(config.model.tokenization),
                               "split_sizes": data.sizes, "eval_sets": evaluated_sets(config, data)}
    if data.import_report is not None:
        summary["import_report"] = data.import_report
    logger.info("data %s: %s", data.description, summary["split_sizes"])
    check_batches_fit(config, data, wanted)

    encoder, encoder_identity, head = None, "", None
    if "pretrain" in wanted:
        encoder, encoder_identity, summary["pretrain"] = _pretrain(config, data, model_cfg, tokenizer, mesh, workdir)
    if "probes" in wanted:
        summary["probes"], head = _probes(config, data, model_cfg, tokenizer, encoder, mesh)
    if "finetune" in wanted:
        summary["finetune"] = _finetune(config, data, model_cfg, tokenizer, encoder, encoder_identity, head, mesh,
                                        workdir)
    summary["seconds"] = time.perf_counter() - t_start
    _write_summary(summary, workdir)
    return summary


def _pretrain(config, data, model_cfg, tokenizer, mesh, workdir: str):
    """The MLM pretraining stage (with its validation loss): ``(encoder, run identity, summary)``."""
    t0 = time.perf_counter()
    val = validation_split(config)
    if val is None:
        logger.info("pretraining reports no validation loss: %s", dna_probes.no_validation_reason(config))
    validation = stages.mlm_validation(config.pretrain, data[val], tokenizer, seed=config.seed, mesh=mesh,
                                       rules=mesh_lib.normalize_rules(config.sharding_rules),
                                       batch_size=config.probe.eval_batch_size) if val else None
    result = stages.pretrain_mlm(config, config.pretrain, data, sources.pretrain_split(config.data), model_cfg,
                                 tokenizer, os.path.join(workdir, "pretrain"),
                                 worker_count=config.data.worker_count,
                                 evaluators=[validation] if validation else ())
    summary = {"steps": result.step, "seconds": time.perf_counter() - t0, "run_identity": result.fingerprint}
    return result.model().bert, result.fingerprint, summary


def _probes(config, data, model_cfg, tokenizer, encoder, mesh):
    """The linear and 1-NN probes of ``encoder`` (a random-init one, said so, when there is no
    pretraining): ``(summary, species head for LP-FT or None)``."""
    probed, probe_encoder = PRETRAINED, encoder
    if encoder is None:  # fine-tuning never starts from this one
        logger.warning("probes without the pretrain stage: probing a random-init encoder "
                       "(the pretrain checkpoints in the workdir are not read)")
        probed, probe_encoder = NOT_PRETRAINED, kmer_bert.KmerBert(model_cfg, rngs=nnx.Rngs(config.seed))
    t0 = time.perf_counter()
    summary = dna_probes.run_probes(config, data, model_cfg, tokenizer, probe_encoder, mesh)
    summary["encoder"] = probed
    head = summary["linear"].pop("head")
    if config.probe.linear_rank != "species" or encoder is None:  # a species head of the pretrained encoder
        head = None
    summary["seconds"] = time.perf_counter() - t0
    return summary, head


def _finetune(config, data, model_cfg, tokenizer, encoder, encoder_identity: str, head, mesh, workdir: str):
    """Species fine-tuning from ``encoder`` and the head ``finetune.head_init`` asks for; its summary."""
    t0 = time.perf_counter()
    head_init = config.finetune.get("head_init", "random")
    if head_init == "random":
        head = None
    elif head is None:  # encoder is the pretrained one: checked before any compute
        head = dna_probes.probe_head(config, data, tokenizer, encoder, mesh)
    result = finetune(config, data, model_cfg, tokenizer, encoder, workdir, head=head,
                      encoder_identity=encoder_identity, mesh=mesh)
    model, selected = selected_model(config, data, tokenizer, mesh, workdir, result)
    return {**dna_probes.finetune_accuracy(config, model, data, tokenizer, mesh),
            "head_init": head_init, "steps": result.step, **selected,
            "seconds": time.perf_counter() - t0, "run_identity": result.fingerprint}


def _write_summary(summary: dict[str, Any], workdir: str) -> None:
    table = summary_table(summary)
    print(table, flush=True)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=float)
    with open(os.path.join(workdir, "summary.md"), "w") as f:
        f.write(table + "\n")
    curves.plot_curves(workdir, ("pretrain", "finetune"), val_metric=dna_probes.VAL_METRIC)
