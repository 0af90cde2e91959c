"""BIOSCAN-ZSC: zero-shot clustering of frozen image, DNA and image+DNA embeddings.

For every encoder spec of ``config.encoders`` (``<modality>:<model>[+<model>]``, see
``configs/zsc.py``) the records of ``config.data.split`` (test + test_unseen) are embedded, reduced
(UMAP to 50 dims by default), Ward-clustered into as many clusters as there are true species, and
the one clustering is scored with AMI and ARI at class … species and BIN, plus the silhouette
(:func:`bioscan_jax.eval.clustering.evaluate_clustering`). Image+DNA specs z-score each
modality per feature and concatenate (:func:`~bioscan_jax.eval.clustering.fuse_embeddings`).

Embeddings are computed once per model (jitted, batch-sharded over the mesh's data axes) and
written to ``workdir/embeddings/<split>__<model>.npz`` with the processids and label indices of
the records; later runs reuse them (clustering can be rerun with other settings without
re-embedding) unless ``config.embed.recompute`` is set, the model definition changed, or the
split's records differ (:func:`bioscan_jax.tasks.zsc.embedding_cache.cached_embeddings`).

The stages: check the specs and models (:mod:`bioscan_jax.tasks.zsc.encoders`) → open the split →
embed each model (or reuse its embeddings); a model whose weights come from a training stage
(:func:`pretrained_barcodebert`, :func:`clibd_towers`) trains or loads it here → score each spec
(:mod:`bioscan_jax.tasks.zsc.evaluation`) → write the table, plots and ``zsc.json``.

Bad input:

* a split with fewer than two species, or too few records for UMAP, stops the run before anything
  is embedded, with an error saying so;
* NaN/inf embeddings of one model do not stop the run: the spec(s) using that model get an
  ``error`` entry in ``zsc.json`` (naming the model and the number of bad rows), are shown as
  errors in the table and logged; the other specs are evaluated as usual.

Outputs in ``workdir``: ``zsc.json`` (settings, per-spec metrics, embedding files), ``zsc.md``
(the AMI table, also printed), ``plots/ami_by_rank.png`` and ``plots/umap_<spec>.png`` (2-D UMAP
coloured by order).
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
from bioscan_jax.data import fields, sources
from bioscan_jax.tasks.zsc import embedding_cache
from bioscan_jax.tasks.zsc import encoders as zsc_encoders
from bioscan_jax.tasks.zsc import evaluation as zsc_eval
from bioscan_jax.tasks.zsc.embedding_cache import fingerprint
from bioscan_jax.tasks.zsc.encoders import RANKS
from bioscan_jax.models import kmer_bert
from bioscan_jax import config_access, tasks
from bioscan_jax import sharding as mesh_lib
from bioscan_jax.train import stages

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- trained weights


def pretrained_barcodebert(config, workdir: str) -> nnx.Module:
    """BarcodeBERT pretrained (:func:`bioscan_jax.train.stages.pretrain_mlm`, as the barcodebert
    task does) on ``config.barcodebert.pretrain_split``.

    The run lives in ``workdir/models/barcodebert_<hash of the section>``: a later run with the
    same settings finds the final checkpoint there and does not train again.
    """
    section = config.barcodebert
    model_cfg = kmer_bert.config_from(section.model)
    run_dir = os.path.join(workdir, "models",
                           f"barcodebert_{fingerprint([config_access.to_dict(section), config.seed])}")
    tokenizer = dna_lib.tokenizer_for(section.model.tokenization, model_cfg.k,
                                      max_nucleotides=config.data.max_nucleotides)
    split = sources.pretrain_split(config.data, section.pretrain_split)
    data = stages.open_dna_split(config.data, split, seed=config.seed, dedup=section.dedup_barcodes)
    t0 = time.perf_counter()
    result = stages.pretrain_mlm(config, section.pretrain, data, split, model_cfg, tokenizer,
                                 os.path.join(run_dir, "pretrain"), worker_count=config.data.worker_count)
    logger.info("BarcodeBERT pretraining: %d steps (%d this run) in %.1fs, %s", result.step,
                result.step - result.start_step, time.perf_counter() - t0, run_dir)
    return result.model().bert


def clibd_workdir(config, workdir: str) -> str:
    """Where the CLIBD towers live: ``config.clibd_workdir`` or one per CLIBD config in the workdir."""
    return config.clibd_workdir or os.path.join(
        workdir, "models", f"clibd_{fingerprint([config_access.to_dict(config.clibd), config.seed])}")


def clibd_towers(config, workdir: str, cache: dict) -> nnx.Module:
    """The CLIBD model, once per run: loaded from ``config.clibd_workdir`` when one is given,
    else trained by the CLIBD task in this run's workdir (resumed, or returned at once when a
    previous run already finished it)."""
    if "clibd" not in cache:
        clibd = tasks.get("clibd")  # the CLIBD task's spec: its train and load, not its modules
        path = clibd_workdir(config, workdir)
        if config.clibd_workdir:
            cache["clibd"] = clibd.load(path, config.clibd)
            logger.info("loaded the CLIBD towers from %s", path)
        else:
            t0 = time.perf_counter()
            clibd_config = config.clibd.copy_and_resolve_references()
            clibd_config.resume = config.get("resume", "auto")  # --config.resume applies to every stage
            cache["clibd"], summary = clibd.train(clibd_config, path)
            logger.info("CLIBD training: %d steps in %.1fs, %s", summary["steps"], time.perf_counter() - t0, path)
    return cache["clibd"]


def trained_models(config, workdir: str) -> zsc_encoders.Trained:
    """``trained(kind)`` for :func:`bioscan_jax.tasks.zsc.encoders.build_encoder`: the pretrained
    BarcodeBERT (``'pretrain'``) or the CLIBD towers, trained or loaded once per run (``'clibd'``)."""
    cache: dict[str, Any] = {}

    def trained(kind: str) -> nnx.Module:
        if kind == "pretrain":
            return pretrained_barcodebert(config, workdir)
        return clibd_towers(config, workdir, cache)

    return trained


# ----------------------------------------------------------------------------- task


def open_data(config, names: list[str]) -> sources.Splits:
    """``config.data.split`` with the fields the models of ``names`` read (images only if one does)."""
    features = ["processid", "dna_barcode", "split", *RANKS]
    if any(config.models[n].modality == "image" for n in names):
        if config.data.source == "bold":
            raise ValueError("config.data.source='bold' has no images: evaluate DNA specs only")
        features.append(fields.IMAGE)
    return sources.open_splits(config.data, [config.data.split], features=features, seed=config.seed)


def check_config(config: ml_collections.ConfigDict) -> list[zsc_encoders.EncoderSpec]:
    """Every config error of the task, as one line, before any data is built (the encoder specs,
    each model they name, the embedding batch on the mesh); returns the parsed specs."""
    specs = zsc_encoders.parse_specs(config.encoders, config.models)
    for name in dict.fromkeys(n for s in specs for n in s.models):
        zsc_encoders.check_model_config(name, config.models[name])
    mesh_lib.validate_batch(int(config.embed.batch_size), mesh_lib.make_mesh(config.mesh))
    return specs


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Embed (or reuse embeddings) → reduce → Ward → AMI per rank, for every encoder spec."""
    t_start = time.perf_counter()
    specs = check_config(config)
    names = list(dict.fromkeys(n for s in specs for n in s.models))
    mesh = mesh_lib.make_mesh(config.mesh)
    os.makedirs(workdir, exist_ok=True)

    split = config.data.split
    data = open_data(config, names)
    records = data[split]
    processid, labels, partition = zsc_eval.split_records(records)
    if config.data.sort_by_processid:
        order = zsc_eval.processid_order(processid, partition, split)
        records = sources.Subset(records, order)
        processid, labels, partition = processid[order], {r: v[order] for r, v in labels.items()}, partition[order]
    n_species = zsc_eval.check_clusterable(labels, split, config)
    logger.info("%s %s: %d records, %d species", data.description, split, len(processid), n_species)

    trained = trained_models(config, workdir)
    embeddings: dict[str, dict[str, np.ndarray]] = {}
    embed_info: dict[str, dict[str, Any]] = {}
    for name in names:
        embeddings[name], embed_info[name] = embedding_cache.cached_embeddings(
            name, records, processid, config, workdir, mesh, trained)

    results = {s.name: zsc_eval.evaluate_spec(s, embeddings, labels, config, partition) for s in specs}
    table = zsc_eval.results_table(results)
    plots = zsc_eval.make_plots(specs, results, embeddings, labels, data.label_names, config, workdir, partition)
    errors = {k: v["error"] for k, v in results.items() if "error" in v}
    summary = {
        "data": data.description,
        "split": split,
        "n_records": int(len(processid)),
        "n_species": n_species,
        "cluster": config_access.to_dict(config.cluster),
        "seed": int(config.seed),
        "embeddings": embed_info,
        "results": results,
        "errors": errors,
        "table": table,
        "plots": plots,
        "seconds": time.perf_counter() - t_start,
    }
    print(table, flush=True)
    if errors:
        print(f"not clustered (bad embeddings): {errors}", flush=True)
    with open(os.path.join(workdir, "zsc.json"), "w") as f:
        json.dump(summary, f, indent=2, default=float)
    with open(os.path.join(workdir, "zsc.md"), "w") as f:
        f.write(table + "\n")
    return summary
