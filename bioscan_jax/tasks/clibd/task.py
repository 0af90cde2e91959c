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
   checkpoints, metrics) in ``workdir/train``; at each evaluation step (``train.eval_every``
   steps, or each epoch end when 0, and after the last step) the species macro top-1 retrieval
   of the validation queries (``eval.val_query_splits``, ``val`` / ``val_unseen``; ``''`` turns
   it off) goes to ``train/metrics.jsonl`` as ``val/<pair>/species_macro_top1_{seen,unseen,hm}``
   (:class:`bioscan_jax.tasks.clibd.evaluation.ValRetrieval`), and ``training_curves.png`` draws the
   loss and those curves;
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

The training side (config → towers, data setup, pretrained encoders, ``train_clibd``,
``load_towers``) lives in :mod:`bioscan_jax.tasks.clibd.training`, the evaluation in
:mod:`bioscan_jax.tasks.clibd.evaluation` and the report in :mod:`bioscan_jax.eval.report`; this module
runs the stages in order.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import ml_collections

from bioscan_jax.data import sources
from bioscan_jax.checkpoint import complete_steps
from bioscan_jax.tasks.clibd import evaluation as clibd_eval
from bioscan_jax.eval import evaluators as evaluators_lib
from bioscan_jax.eval import report as report_lib
from bioscan_jax.eval import retrieval
from bioscan_jax.tasks.clibd import training as clibd_train
from bioscan_jax.train import curves
from bioscan_jax.train.state import make_rngs

logger = logging.getLogger(__name__)

def _validation(config, setup, batches, workdir: str):
    """The validation retrieval and the keeper of its best model (``train/best_val``), cleared
    when training starts from step 0 (a fresh run keeps nothing of an earlier one)."""
    val = clibd_eval.ValRetrieval(config, setup, batches, steps_per_epoch=clibd_train.steps_per_epoch(config, setup))
    keeper = evaluators_lib.KeepBest(val, os.path.join(workdir, "train", clibd_train.BEST_VAL_DIR),
                                     metric=clibd_eval.OVERALL_METRIC)
    if config.get("resume", "auto") == "restart" or not complete_steps(os.path.join(workdir, "train", "checkpoints")):
        keeper.clear()
    return val, keeper


def _select(config, model, keeper, val) -> dict[str, Any]:
    """Loads the model the test evaluation reports into ``model``: with ``eval.select='best_val'``
    the best on validation by CLIBD's ``compute_overall_acc`` (``scripts/train_cl.py`` keeps
    ``best.pth`` so and ``inference_and_eval.py`` loads it), else the last step's."""
    select = str(config.eval.select)
    if select == "best_val" and keeper is not None and keeper.best(model) is not None:
        step, value = keeper.restore_into(model)
        return {"select": "best_val", "step": int(step), "epoch": val.epoch_of(step), "metric": keeper.metric,
                "value": float(value)}
    reason = ("config.eval.select='last'" if select == "last" else
              "no validation queries" if keeper is None else
              f"no validation after epoch {int(config.eval.eval_skip_epoch)} (config.eval.eval_skip_epoch)")
    if select == "best_val":
        logger.warning("CLIBD: the test evaluation uses the last step's model: %s", reason)
    return {"select": "last", "reason": reason}


def selection_note(selection: Mapping[str, Any]) -> str:
    """One line saying which model the tables are of."""
    if selection.get("select") == "best_val":
        return (f"Model: best on validation (epoch {selection['epoch']}, step {selection['step']}, "
                f"{selection['metric']} = {selection['value']:.4f}).")
    return f"Model: the last step's ({selection.get('reason', '')})."


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Baseline (optional) → training → retrieval evaluation → report; returns the summary.

    Routine INFO logs of the libraries (orbax, TFDS) are hidden unless ``config.quiet_logs`` is
    False."""
    if config.get("quiet_logs", True):
        with clibd_train.quiet_library_logs():
            return _run(config, workdir)
    return _run(config, workdir)


def _run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    t_start = time.perf_counter()
    clibd_train.check_config(config)
    os.makedirs(workdir, exist_ok=True)
    setup = clibd_train.prepare(config, workdir)
    mods = clibd_train.enabled_modalities(config)
    keys, queries = sources.retrieval_splits(config.eval)
    ranks = tuple(config.eval.ranks)
    summary: dict[str, Any] = {
        "data": setup.data.description, "modalities": list(mods),
        "split_sizes": {s: len(src) for s, src in setup.data.sources.items()},
        "n_train": len(setup.train_source), "n_train_without_dna": setup.n_train_without_dna,
    }
    logger.info("data %s: %s", setup.data.description, summary["split_sizes"])
    pretrained = clibd_train.pretrained_encoders(config, setup, workdir)
    validate = clibd_eval.VAL_QUERIES in sources.retrieval_query_fields(config.eval)
    batches = clibd_eval.EvalBatches(config, setup, sources.retrieval_eval_splits(config.eval), ranks,
                                     key_splits=keys)
    by_setting: dict[str, Any] = {}
    if config.eval.no_alignment:
        t0 = time.perf_counter()
        baseline = clibd_train.build_model(setup, pretrained, make_rngs(config.seed))
        by_setting[clibd_train.NO_ALIGNMENT] = clibd_eval.evaluate(config, baseline, setup, batches)
        summary["no_alignment_eval_seconds"] = time.perf_counter() - t0
        del baseline
    if not validate:
        logger.info("CLIBD training reports no validation retrieval: config.eval.val_query_splits is empty")
    val, keeper = _validation(config, setup, batches, workdir) if validate else (None, None)
    model, summary["train"] = clibd_train.train_clibd(config, workdir, setup=setup, pretrained=pretrained,
                                                      evaluators=[keeper] if keeper is not None else [])
    summary["model_selection"] = _select(config, model, keeper, val)
    t0 = time.perf_counter()
    by_setting[clibd_train.setting_name(mods)] = clibd_eval.evaluate(config, model, setup, batches)
    summary["eval_seconds"] = time.perf_counter() - t0
    summary["seconds"] = time.perf_counter() - t_start
    summary["species_macro_top1"] = {
        setting: {p: res[p]["report"].get("species", {}).get("macro_top1") for p in retrieval.pair_names(res)}
        for setting, res in by_setting.items()}
    text = report_lib.write_report(workdir, by_setting, ranks, {"key_splits": list(keys), "query_splits": list(queries),
                                                                "model_selection": summary["model_selection"],
                                                                "summary": summary})
    text += "\n\n" + selection_note(summary["model_selection"])
    curves.plot_curves(workdir, stages=("train",), val_metrics=val.curve_metrics() if val is not None else ())
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=float)
    print(text, flush=True)
    print(f"\nCLIBD run finished in {summary['seconds']:.0f} s; reports in {workdir}", flush=True)
    return summary
