"""CLIBD training: config → towers, the data it trains on, pretrained encoders, the contrastive
training stage (:func:`train_clibd`), and rebuilding trained towers (:func:`load_towers`).

The task (:mod:`bioscan_jax.tasks.clibd`) orchestrates these with the retrieval evaluation;
zero-shot clustering uses :func:`train_clibd` and :func:`load_towers` for its CLIBD encoders.
The reference: bioscan-ml/clibd (``bioclip/model/simple_clip.py``, ``scripts/train_cl.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from bioscan_jax.data import dna as dna_lib
from bioscan_jax.data import pipeline, schema, sources
from bioscan_jax.data import text as text_lib
from bioscan_jax.models import kmer_bert, towers, vit
from bioscan_jax.models import params as params_lib
from bioscan_jax.models import text as text_model
from bioscan_jax import checkpoint as checkpoint_lib
from bioscan_jax.train import loop, stages
from bioscan_jax import config_access
from bioscan_jax import sharding as mesh_lib
from bioscan_jax.train.contrastive import contrastive_loss
from bioscan_jax.data import fields

logger = logging.getLogger(__name__)

#: Record fields the CLIBD pipelines read.
FEATURES: tuple[str, ...] = (
    fields.IMAGE, "processid", "dna_barcode", *schema.EVAL_RANKS, "dna_bin",
    *(fields.name_feature(r) for r in schema.EVAL_RANKS),
)
#: One-letter names of the modalities in the alignment-setting label ("I+D+T").
MODALITY_LETTERS = {"image": "I", "dna": "D", "text": "T"}
NO_ALIGNMENT = "No alignment"
VOCAB_FILE = "text_vocab.json"


# ============================================================================= config → model


def enabled_modalities(config) -> tuple[str, ...]:
    """``config.model.modalities`` ("image,dna,text", any subset of two or more) in canonical order."""
    wanted = [m.strip() for m in str(config.model.modalities).split(",") if m.strip()]
    bad = [m for m in wanted if m not in towers.MODALITIES]
    if bad:
        raise ValueError(f"unknown config.model.modalities {bad}; valid: {', '.join(towers.MODALITIES)}")
    mods = tuple(m for m in towers.MODALITIES if m in wanted)
    if len(mods) < 2:
        raise ValueError(f"config.model.modalities needs at least two modalities to align, got {mods}")
    return mods


def setting_name(modalities: Sequence[str]) -> str:
    """The alignment-setting label of the paper's table, e.g. ``I+D+T``."""
    return "+".join(MODALITY_LETTERS[m] for m in towers.MODALITIES if m in modalities)


def model_config(config, *, text_vocab_size: int | None = None) -> towers.ClibdConfig:
    """The :class:`towers.ClibdConfig` of ``config.model`` (ViT image size = ``data.image_size``)."""
    mods = enabled_modalities(config)
    m = config.model
    image = dna = text = None
    if "image" in mods:
        image = vit.get_variant(m.image.variant, **{**config_access.overrides(m.image), "image_size": int(config.data.image_size)})
    if "dna" in mods:
        dna = kmer_bert.get_variant(m.dna.variant, **config_access.overrides(m.dna))
    if "text" in mods:
        over = config_access.overrides(m.text)
        if text_vocab_size is not None:
            over["vocab_size"] = int(text_vocab_size)
        text = text_model.get_variant(m.text.variant, **over)
    return towers.ClibdConfig(
        image=image, dna=dna, text=text, embed_dim=int(m.embed_dim),
        init_log_scale=float(config.loss.init_log_scale), learnable_scale=bool(config.loss.learnable_scale),
        tower_mode=str(m.get("tower_mode", "masked_mean")))


# ============================================================================= data


def _column(source: Sequence[Mapping[str, Any]], name: str) -> list[Any]:
    select = getattr(source, "select", None)
    view = select([name]) if select else source
    return [view[i][name] for i in range(len(view))]


def records_with_dna(source: Sequence[Mapping[str, Any]]) -> tuple[Sequence[Mapping[str, Any]], int]:
    """``(source restricted to records that have a DNA barcode, number left out)``."""
    barcodes = _column(source, "dna_barcode")
    keep = np.asarray([i for i, b in enumerate(barcodes) if b and str(b).strip()], dtype=np.int64)
    missing = len(source) - len(keep)
    if missing == 0:
        return source, 0
    if len(keep) == 0:
        raise ValueError("no training record has a DNA barcode")
    return sources.Subset(source, keep), missing


def wordpiece_vocab(config) -> text_lib.WordPieceVocab | None:
    """The WordPiece tokenizer ``config.model.text.tokenizer`` names (a ``vocab.txt``, a model
    directory holding one, or a hub id such as ``prajjwal1/bert-small``), or None for the word
    vocabulary of the training taxonomy."""
    spec = str(config.model.text.get("tokenizer", "") or "")
    if not spec:
        return None
    from bioscan_jax.convert import hub

    path = hub.resolve(spec if not hub.is_hub_id(spec) or ":" in spec else f"{spec}:vocab.txt",
                       what="config.model.text.tokenizer")
    if path.is_dir():
        path = path / "vocab.txt"
    if not path.exists():
        raise FileNotFoundError(f"config.model.text.tokenizer: no WordPiece vocabulary at {path}")
    return text_lib.WordPieceVocab(str(path), max_length=int(config.model.text.max_length))


def build_vocab(config, data: sources.Splits) -> text_lib.TaxonomyVocab:
    """Word vocabulary of the taxonomy text of ``data.vocab_split`` (CLIBD: the training split)."""
    source = data[config.data.vocab_split]
    names = [fields.name_feature(r) for r in schema.EVAL_RANKS]
    select = getattr(source, "select", None)
    view = select(names) if select else source
    records = [{n: view[i][n] for n in names} for i in range(len(view))]
    return text_lib.TaxonomyVocab.from_records(records, max_length=int(config.model.text.max_length))


@dataclasses.dataclass
class ClibdSetup:
    """What training and evaluation share: the opened splits, the training records (with DNA),
    the DNA tokenizer, the text vocabulary, the model config and the mesh."""

    data: sources.Splits
    train_source: Sequence[Mapping[str, Any]]
    n_train_without_dna: int
    tokenizer: dna_lib.KmerTokenizer
    vocab: text_lib.TaxonomyVocab
    model_config: towers.ClibdConfig
    mesh: jax.sharding.Mesh


def prepare(config, workdir: str | None = None, *, splits: Sequence[str] | None = None) -> ClibdSetup:
    """Opens the data and builds the tokenizer, vocabulary and model config (saves the vocab)."""
    d = config.data
    wanted = list(dict.fromkeys(splits if splits is not None
                                else (d.train_split, d.vocab_split, *sources.retrieval_eval_splits(config.eval))))
    data = sources.open_splits(d, wanted, features=FEATURES, seed=config.seed)
    mods = enabled_modalities(config)
    train_source, n_without_dna = None, 0
    if d.train_split in data.sources:
        train_source = data[d.train_split]
        if "dna" in mods:
            train_source, n_without_dna = records_with_dna(train_source)
            if n_without_dna:
                logger.warning("left out %d training records without a DNA barcode", n_without_dna)
    vocab_path = os.path.join(workdir, VOCAB_FILE) if workdir else None
    vocab = wordpiece_vocab(config)
    if vocab is None and vocab_path and os.path.exists(vocab_path):
        vocab = text_lib.TaxonomyVocab.load(vocab_path)  # a resumed run keeps its vocabulary
    elif vocab is None:
        vocab = build_vocab(config, data)
        if vocab_path:
            os.makedirs(workdir, exist_ok=True)
            vocab.save(vocab_path)
    mcfg = model_config(config, text_vocab_size=len(vocab))
    k = mcfg.dna.k if mcfg.dna is not None else kmer_bert.get_variant(config.model.dna.variant, **config_access.overrides(config.model.dna)).k
    tokenizer = dna_tokenizer(config, k)
    return ClibdSetup(data=data, train_source=train_source, n_train_without_dna=n_without_dna, tokenizer=tokenizer,
                     vocab=vocab, model_config=mcfg, mesh=mesh_lib.make_mesh(config.mesh))


def dna_tokenizer(config, k: int) -> dna_lib.KmerTokenizer:
    """The DNA tower's tokenizer: the model's tokenisation protocol (``model.dna.tokenization``)
    at ``data.max_nucleotides``; training, evaluation and ``bioscan-jax identify --images`` all
    take it from here."""
    return dna_lib.tokenizer_for(config.model.dna.tokenization, k, max_nucleotides=int(config.data.max_nucleotides))


def positive_label_ranks(config) -> tuple[str, ...]:
    """The label column whose equal values are positives of the contrastive loss
    (``loss.positives``), as the batches' ``label_ranks``: ``()`` when only the pair itself is."""
    positives = str(config.loss.positives or "")
    return (positives,) if positives else ()


def train_iterator(config, setup: ClibdSetup) -> Iterator[Mapping[str, np.ndarray]]:
    """The training batches: CLIBD augmentation, tokenised DNA, taxonomy text, positive labels."""
    d = config.data
    return iter(pipeline.clibd_pipeline(
        setup.train_source, tokenizer=setup.tokenizer, vocab=setup.vocab,
        batch_size=mesh_lib.process_batch_size(int(config.train.batch_size)), train=True, seed=config.seed,
        label_ranks=positive_label_ranks(config), dna_random_offset=bool(d.dna_random_offset),
        image_size=int(d.image_size), resize=int(d.resize), normalize=bool(d.normalize_images),
        worker_count=int(d.worker_count), read_threads=d.get("read_threads") or None,
        prefetch=d.get("prefetch") or None, reshuffle_each_epoch=bool(d.reshuffle_each_epoch)))


# ============================================================================= pretrained encoders


def _checkpoint_dir(path: str) -> str | None:
    """The orbax checkpoint directory under a BarcodeBERT/CLIBD workdir path, if any."""
    for candidate in (path, os.path.join(path, "checkpoints"), os.path.join(path, "pretrain", "checkpoints"),
                      os.path.join(path, "train", "checkpoints")):
        if checkpoint_lib.complete_steps(candidate):
            return candidate
    return None


@contextlib.contextmanager
def quiet_library_logs(level: int = logging.WARNING):
    """Raises the level of the ``absl`` logger (orbax, TFDS and XLA write their routine INFO lines
    there) for the duration; the project's own loggers are not affected."""
    absl_logger = logging.getLogger("absl")
    old = absl_logger.level
    absl_logger.setLevel(max(level, old))
    try:
        yield
    finally:
        absl_logger.setLevel(old)


def dna_encoder_state(path: str, cfg: kmer_bert.KmerBertConfig) -> dict[str, Any]:
    """DNA encoder parameters (and, when the checkpoint has one, its MLM transform as
    ``'transform'``) from a run of this project (BarcodeBERT: its ``bert``; CLIBD: its DNA tower's
    encoder) or a released BarcodeBERT checkpoint in any format
    (:func:`bioscan_jax.convert.barcodebert.resolve`)."""
    ckpt_dir = _checkpoint_dir(path)
    if ckpt_dir is not None:
        params = checkpoint_lib.restore_params(ckpt_dir)
        if "bert" in params:
            return {"encoder": params["bert"]}
        if isinstance(params.get("dna"), Mapping) and "encoder" in params["dna"]:
            return {"encoder": params["dna"]["encoder"]}
        return {"encoder": params}
    from bioscan_jax.convert import barcodebert as bb_load

    loaded = bb_load.resolve(path, what="config.model.dna.init", num_heads=cfg.num_heads)
    for field in ("k", "hidden_size", "num_layers", "intermediate_size", "vocab_size"):
        if getattr(loaded.config, field) != getattr(cfg, field):
            raise ValueError(f"config.model.dna.init {path}: the checkpoint has {field}={getattr(loaded.config, field)}, "
                             f"the DNA tower {field}={getattr(cfg, field)} (set config.model.dna.variant/overrides)")
    out = {"encoder": nnx.state(loaded.model, nnx.Param).to_pure_dict()}
    head = loaded.head_tensors
    t = "cls.predictions.transform."
    if t + "dense.weight" in head:
        out["transform"] = {"dense": {"kernel": head[t + "dense.weight"].T, "bias": head[t + "dense.bias"]},
                            "norm": {"scale": head[t + "LayerNorm.weight"], "bias": head[t + "LayerNorm.bias"]}}
    return out


def _mlm_pretrain(config, setup: ClibdSetup, workdir: str) -> dict[str, Any]:
    """BarcodeBERT masked-token pretraining of the DNA encoder (``config.dna_pretrain``)."""
    p = config.dna_pretrain
    data = stages.open_dna_split(config.data, p.split, seed=config.seed, dedup=p.dedup)
    source, missing = records_with_dna(data[p.split])
    if missing:
        logger.warning("DNA pretraining: left out %d records without a DNA barcode", missing)
    data.sources[p.split] = source
    t0 = time.perf_counter()
    result = stages.pretrain_mlm(config, p, data, p.split, setup.model_config.dna, setup.tokenizer,
                                 os.path.join(workdir, "dna_pretrain", "pretrain"),
                                 worker_count=int(config.data.worker_count))
    logger.info("DNA MLM pretraining: %d steps in %.0f s", result.step, time.perf_counter() - t0)
    return nnx.state(result.model().bert, nnx.Param).to_pure_dict()


def pretrained_encoders(config, setup: ClibdSetup, workdir: str) -> dict[str, dict[str, Any]]:
    """Pretrained encoder parameters by modality (pure dicts), from ``config.model.<m>.init``.

    * ``dna.init``: ``''`` (random), ``'mlm'`` (BarcodeBERT pretraining here first, see
      ``config.dna_pretrain``), or a path: a BarcodeBERT workdir / ``pretrain`` /
      ``pretrain/checkpoints`` directory (e.g. of ``run.py --config=configs/barcodebert.py``
      with the same model variant), or an HF BERT checkpoint;
    * ``image.init``: ``''`` or an HF ``ViTModel`` / timm ViT checkpoint (file or directory).
    """
    out: dict[str, dict[str, Any]] = {}
    mcfg = setup.model_config
    dna_init = str(config.model.dna.get("init", "") or "") if mcfg.dna is not None else ""
    if dna_init == "mlm":
        out["dna"] = _mlm_pretrain(config, setup, workdir)
    elif dna_init:
        state = dna_encoder_state(dna_init, mcfg.dna)
        out["dna"] = state["encoder"]
        if "transform" in state and mcfg.tower_mode == "reference":
            out["dna_transform"] = state["transform"]
    image_init = str(config.model.image.get("init", "") or "") if mcfg.image is not None else ""
    if image_init:
        from bioscan_jax.convert import hf_vit, hub

        # converters fill unrolled blocks; the tower may stack them (scan_layers): the warm start restacks
        encoder = vit.ViT(dataclasses.replace(mcfg.image, scan_layers=False, remat=False), rngs=nnx.Rngs(0))
        loader = hf_vit.load_timm_vit if config.model.image.get("init_format", "hf") == "timm" else hf_vit.load_hf_vit
        loader(encoder, str(hub.resolve(image_init, what="config.model.image.init")), strict=False)
        out["image"] = nnx.state(encoder, nnx.Param).to_pure_dict()
    text_init = str(config.model.text.get("init", "") or "") if mcfg.text is not None else ""
    if text_init:
        from bioscan_jax.convert import hf_bert, hub

        encoder = text_model.TextEncoder(dataclasses.replace(mcfg.text, scan_layers=False, remat=False), rngs=nnx.Rngs(0))
        hf_bert.load_hf_bert(encoder, str(hub.resolve(text_init, what="config.model.text.init")), strict=False)
        out["text"] = nnx.state(encoder, nnx.Param).to_pure_dict()
    return out


def model_factory(model_config: towers.ClibdConfig):
    """``rngs -> ClibdModel`` at its random init (the train loop's factory, and the memory
    planner's). The pretrained encoders come in through :func:`warm_start`, so the jitted init
    never carries them as constants."""

    def factory(rngs: nnx.Rngs) -> towers.ClibdModel:
        return towers.ClibdModel(model_config, rngs=rngs)

    return factory


def warm_start(pretrained: Mapping[str, Any]) -> dict[str, Any]:
    """The pretrained encoders (and a reference-mode DNA tower's MLM transform) as a sub-tree of
    the model's parameters, for the train loop's ``warm_start``."""
    tree: dict[str, Any] = {}
    for modality, state in pretrained.items():
        pure = params_lib.as_pure(state)
        tower, part = ("dna", "transform") if modality == "dna_transform" else (modality, "encoder")
        tree.setdefault(tower, {})[part] = pure
    return tree


def build_model(setup: ClibdSetup, pretrained: Mapping[str, Any], rngs: nnx.Rngs) -> towers.ClibdModel:
    """The model outside training (eagerly): random init with the pretrained encoders copied in,
    shapes checked (e.g. the "no alignment" baseline)."""
    model = model_factory(setup.model_config)(rngs)
    for modality, state in pretrained.items():
        if modality == "dna_transform":
            towers.load_dna_transform(model, state)
        else:
            towers.load_encoder_state(model, modality, state)
    return model


# ============================================================================= training


def make_loss_fn(config):
    """``(model, batch, *, train) -> (loss, metrics)``: InfoNCE over all ordered modality pairs."""
    label_key = [f"label_{rank}" for rank in positive_label_ranks(config)]
    chunk = int(config.loss.chunk_size or 0) or None
    learnable = bool(config.loss.learnable_scale)
    max_scale = float(config.loss.max_scale or 0) or None

    def loss_fn(model, batch, *, train: bool):
        del train
        features, _ = model(batch)
        labels = batch[label_key[0]] if label_key else None
        return contrastive_loss(features, model.log_scale[...], labels=labels, chunk_size=chunk,
                                trainable_scale=learnable, max_scale=max_scale)

    return loss_fn


def check_config(config) -> None:
    enabled_modalities(config)
    sources.retrieval_query_fields(config.eval)  # the validation queries are no test split
    positives = str(config.loss.positives or "")
    if positives and positives not in fields.INDEX_FEATURES:
        raise ValueError(f"config.loss.positives must be '' or a label column ({', '.join(fields.INDEX_FEATURES)}), "
                         f"got {positives!r}")
    if int(config.data.image_size) > int(config.data.resize):
        raise ValueError(f"config.data.image_size ({config.data.image_size}) must be <= config.data.resize "
                         f"({config.data.resize})")
    mesh_lib.validate_batch(int(config.eval.batch_size), mesh_lib.make_mesh(config.mesh))


#: ``config.data`` fields that say where the data lies or how fast it is read, not what it is.
DATA_LOCATION_FIELDS = ("data_dir", "manual_dir", "path", "verify_md5", "verify_images", "worker_count",
                        "read_threads", "prefetch")


def run_identity(config, setup: ClibdSetup, pretrained: Mapping[str, Any]) -> dict[str, Any]:
    """What contrastive training depends on beyond seed/train/optim: model (with its ``init``
    sources), loss, the data settings and content, the text vocabulary and the pretrained towers."""
    data = {k: v for k, v in config.data.to_dict().items() if k not in DATA_LOCATION_FIELDS}
    return {"model": config.model.to_dict(), "loss": config.loss.to_dict(),
            "data": {**data, **setup.data.identity, "train_records": len(setup.train_source)},
            "text_vocab_size": len(setup.vocab), "pretrained": sorted(pretrained),
            "dna_pretrain": config.dna_pretrain.to_dict() if "dna_pretrain" in config else None}


#: Where a run keeps its best-on-validation parameters, under ``train/``.
BEST_VAL_DIR = "best_val"


def steps_per_epoch(config, setup: ClibdSetup) -> int:
    """Training steps per epoch: the training records with DNA over the global batch (the
    remainder is dropped); a split smaller than one batch is an error naming it."""
    batch = int(config.train.batch_size)
    steps = len(setup.train_source) // batch
    if steps == 0:
        raise ValueError(f"training split {config.data.train_split!r} has {len(setup.train_source)} records with DNA, "
                         f"fewer than one batch of {batch}")
    return steps


def train_clibd(config, workdir: str, *, setup: ClibdSetup | None = None,
                pretrained: Mapping[str, Any] | None = None,
                evaluators: Sequence[loop.Evaluator] = ()) -> tuple[towers.ClibdModel, dict[str, Any]]:
    """Contrastive training of the CLIBD towers (resumes from ``workdir/train/checkpoints``).

    ``evaluators`` run at the loop's evaluation steps (the task passes the validation retrieval,
    :class:`bioscan_jax.tasks.clibd.evaluation.ValRetrieval`). Returns ``(trained model, summary)``; the
    summary holds the step count, time and data sizes.
    """
    check_config(config)
    setup = setup or prepare(config, workdir)
    if setup.train_source is None:
        raise ValueError(f"split {config.data.train_split!r} was not opened")
    if pretrained is None:
        pretrained = pretrained_encoders(config, setup, workdir)
    spe = steps_per_epoch(config, setup)
    loop.validate_config(config, steps_per_epoch=spe)
    t0 = time.perf_counter()
    result = loop.train(
        config, os.path.join(workdir, "train"), model_factory=model_factory(setup.model_config),
        warm_start=(lambda: warm_start(pretrained)) if pretrained else None,
        loss_fn=make_loss_fn(config), data_iter_factory=lambda: train_iterator(config, setup),
        steps_per_epoch=spe, identity=run_identity(config, setup, pretrained), evaluators=evaluators)
    summary = {"steps": result.step, "seconds": time.perf_counter() - t0, "n_train": len(setup.train_source),
               "run_identity": result.fingerprint,
               "n_train_without_dna": setup.n_train_without_dna, "steps_per_epoch": spe,
               "pretrained": sorted(pretrained)}
    return result.model(), summary


def saved_config(workdir: str) -> ml_collections.ConfigDict | None:
    """The config a CLIBD run directory was trained with (``train/config.json``), else ``None``."""
    path = os.path.join(workdir, "train", "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def load_towers(workdir: str, config=None, *, step: int | None = None) -> towers.ClibdModel:
    """The trained CLIBD model of a run directory and its saved text vocabulary; ``config``
    defaults to the run's saved ``config.json``. Without ``step``, the model the run reports: its
    best on validation (``train/best_val``) when ``eval.select='best_val'``, else the last
    checkpoint (``train/checkpoints``, or its ``step``).

    ``workdir`` may also be a released CLIBD checkpoint file (``best.pth``, or a hub file
    ``owner/name:path/best.pth``): :func:`bioscan_jax.convert.clibd.load` builds its towers in
    ``tower_mode='reference'``, sized by ``config.model`` when a config is given, else by the file."""
    from bioscan_jax.convert import hub

    if os.path.isfile(workdir) or (hub.is_hub_id(workdir) and ":" in workdir):
        from bioscan_jax.convert import clibd as clibd_checkpoint

        if step is not None:
            raise ValueError(f"step={step}: {workdir} is a checkpoint file, not a run directory")
        path = hub.resolve(workdir, what="CLIBD checkpoint")
        return clibd_checkpoint.load(path, model_config(config) if config is not None else None)
    if config is None:
        config = saved_config(workdir)
        if config is None:
            raise FileNotFoundError(f"{workdir}: not a CLIBD run directory (no train/config.json) "
                                    "nor a CLIBD checkpoint file")
    vocab = wordpiece_vocab(config) or text_lib.TaxonomyVocab.load(os.path.join(workdir, VOCAB_FILE))
    mcfg = model_config(config, text_vocab_size=len(vocab))
    best = os.path.join(workdir, "train", BEST_VAL_DIR)
    if step is None and str(config.eval.get("select", "last")) == "best_val" and checkpoint_lib.complete_steps(best):
        values = checkpoint_lib.restore_params(best)  # the model the run's retrieval.json reports
    else:
        values = checkpoint_lib.restore_params(os.path.join(workdir, "train", "checkpoints"), step)
    model = towers.ClibdModel(mcfg, rngs=nnx.Rngs(0))
    params_lib.copy_into(model, values, f"the CLIBD run {workdir}")
    return model


