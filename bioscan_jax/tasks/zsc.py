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
split's records differ.

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

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from bioscan_jax.data import dna as dna_lib
from bioscan_jax.data import pipeline, schema, sources
from bioscan_jax.eval import clustering
from bioscan_jax.eval import clustering_plots
from bioscan_jax.eval import embed as embed_lib
from bioscan_jax.models import kmer_bert, vit
from bioscan_jax import config_access
from bioscan_jax import sharding as mesh_lib
from bioscan_jax.train import stages
from bioscan_jax.data import fields

logger = logging.getLogger(__name__)

#: Label columns stored with the embeddings and scored (class … species, BIN).
RANKS: tuple[str, ...] = clustering.PAPER_RANKS
#: Record fields kept beside each embedding.
KEEP: tuple[str, ...] = ("processid", *RANKS)
#: Spec modalities, and the model modalities each one needs (in this order).
SPEC_MODALITIES: dict[str, tuple[str, ...]] = {"image": ("image",), "dna": ("dna",), "image+dna": ("image", "dna")}
#: Where each modality's weights may come from.
WEIGHTS: dict[str, tuple[str, ...]] = {
    "dna": ("random", "pretrain", "checkpoint", "hf", "clibd", "kmer"),
    "image": ("random", "hf", "timm", "clibd"),
}
#: ImageNet RGB mean / std (for imported ImageNet weights).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None] = {
    "none": None,
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "bioscan": (schema.RGB_MEAN, schema.RGB_STD),
}


# ----------------------------------------------------------------------------- encoder specs


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """One evaluated entry: ``name`` as written, its modality and the models it fuses."""

    name: str
    modality: str
    models: tuple[str, ...]  # one per modality of SPEC_MODALITIES[modality], in that order


def parse_specs(encoders: str, models: Mapping[str, Any]) -> list[EncoderSpec]:
    """Parses ``config.encoders`` against ``config.models``; raises ``ValueError`` on any mistake."""
    items = [s.strip() for s in str(encoders).split(",") if s.strip()]
    if not items:
        raise ValueError("config.encoders is empty; give e.g. 'dna:barcodebert_pretrained,image:vit_random'")
    specs = []
    for item in items:
        modality, sep, rest = item.partition(":")
        if not sep or modality not in SPEC_MODALITIES:
            raise ValueError(f"encoder spec {item!r} must be '<modality>:<model>[+<model>]' with modality "
                             f"one of {list(SPEC_MODALITIES)}")
        names = tuple(n.strip() for n in rest.split("+"))
        unknown = [n for n in names if n not in models]
        if unknown or not all(names):
            raise ValueError(f"encoder spec {item!r} names unknown model(s) {unknown or [rest]}; "
                             f"defined in config.models: {sorted(models)}")
        have = tuple(models[n]["modality"] for n in names)
        want = SPEC_MODALITIES[modality]
        if sorted(have) != sorted(want):
            raise ValueError(f"encoder spec {item!r}: a {modality!r} spec needs models of modalities {list(want)}, "
                             f"got {dict(zip(names, have))}")
        ordered = tuple(next(n for n in names if models[n]["modality"] == m) for m in want)
        specs.append(EncoderSpec(item, modality, ordered))
    dupes = sorted({s.name for s in specs if [t.name for t in specs].count(s.name) > 1})
    if dupes:
        raise ValueError(f"config.encoders lists {dupes} more than once")
    return specs


def check_model_config(name: str, m: Any) -> None:
    """Validates one ``config.models`` entry (modality, weights, normalisation, path)."""
    if m.modality not in WEIGHTS:
        raise ValueError(f"config.models.{name}.modality={m.modality!r}; valid: {list(WEIGHTS)}")
    if m.weights not in WEIGHTS[m.modality]:
        raise ValueError(f"config.models.{name}.weights={m.weights!r} is not available for {m.modality} models; "
                         f"valid: {list(WEIGHTS[m.modality])}")
    if m.modality == "image" and m.normalize not in NORMALIZATIONS:
        raise ValueError(f"config.models.{name}.normalize={m.normalize!r}; valid: {list(NORMALIZATIONS)}")
    if m.weights in ("checkpoint", "hf", "timm") and not m.path:
        raise ValueError(f"config.models.{name}.weights={m.weights!r} needs config.models.{name}.path")
    if int(m.frames) < 1 or (int(m.frames) > 1 and (m.modality != "dna" or m.weights in ("kmer", "clibd"))):
        raise ValueError(f"config.models.{name}.frames={m.frames}: reading frames (> 1) are for BarcodeBERT "
                         f"encoders (dna; random, pretrain, checkpoint or hf weights); 1 = the protocol")
    if m.weights == "kmer" and not (1 <= int(m.k) <= 8 and 0 <= int(m.stride) <= int(m.k)):
        raise ValueError(f"config.models.{name}: k-mer counts need 1 <= k <= 8 and 0 <= stride <= k "
                         f"(0 = k), got k={m.k}, stride={m.stride}")
    if m.weights == "clibd" and m.feature not in ("projection", "encoder"):
        raise ValueError(f"config.models.{name}.feature={m.feature!r}; valid: 'projection', 'encoder'")


# ----------------------------------------------------------------------------- encoders


@dataclasses.dataclass
class Encoder:
    """A frozen model ready to embed: its forward and the batches it reads."""

    model: nnx.Module
    embed_fn: embed_lib.EmbedFn
    batches: Callable[[Sequence[Mapping[str, Any]], int], Any]  # (source, batch_size) -> iterable


def _fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able object (config sections)."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def dna_batches(k: int, max_nucleotides: int, stride: int | None = None, frames: int = 1) -> Callable:
    """Eval DNA batches for the ZSC protocol: k-mer tokens with trailing N stripped.

    ``frames > 1``: ``ids``/``attention_mask`` are ``[B, frames, T]``, the read tokenised after
    dropping its first 0, 1, ... ``frames - 1`` nucleotides (its reading frames).
    """
    tokenizer = dna_lib.KmerTokenizer(k, stride=stride, max_nucleotides=max_nucleotides, strip_trailing_n=True)
    barcode = fields.feature_name("dna_barcode")

    def reading_frames(batch):
        seqs = list(batch.pop(barcode))
        tokens = [(batch["ids"], batch["attention_mask"])]  # frame 0: the pipeline's tokens
        tokens += [tokenizer(seqs, offsets=np.full(len(seqs), f)) for f in range(1, frames)]
        batch["ids"] = np.stack([ids for ids, _ in tokens], axis=1)
        batch["attention_mask"] = np.stack([mask for _, mask in tokens], axis=1)
        return batch

    def make(source, batch_size):
        ds = pipeline.dna_pipeline(source, tokenizer=tokenizer, batch_size=batch_size // jax.process_count(),
                                   train=False, drop_remainder=False, shard="jax", num_epochs=1,
                                   keep=KEEP + ((barcode,) if frames > 1 else ()))
        return ds.map(reading_frames) if frames > 1 else ds

    return make


def image_batches(image_size: int) -> Callable:
    """Eval image batches for the ZSC protocol: Resize ``image_size`` → CenterCrop ``image_size``,
    values in [0, 1] (normalisation happens on the device, per encoder)."""

    def make(source, batch_size):
        return pipeline.image_pipeline(source, batch_size=batch_size // jax.process_count(), train=False,
                                       image_size=image_size, resize=image_size, normalize=False,
                                       drop_remainder=False, shard="jax", num_epochs=1, keep=KEEP)

    return make


def _normalizer(kind: str) -> Callable[[jax.Array], jax.Array]:
    stats = NORMALIZATIONS[kind]
    if stats is None:
        return lambda x: x
    mean, std = (jnp.asarray(s, jnp.float32) for s in stats)
    return lambda x: (x - mean) / std


def vit_embed_fn(normalize: str) -> embed_lib.EmbedFn:
    """The ViT's pooled feature (CLS token after the final norm) of normalised images."""
    norm = _normalizer(normalize)
    return lambda model, batch: model(norm(batch["image"]))[0]


def _vit_config(m: Any) -> vit.ViTConfig:
    overrides = {**config_access.to_dict(m.overrides), "image_size": int(m.image_size) or 224}
    eps = float(m.layer_norm_eps) or (1e-6 if m.weights == "timm" else 1e-12)
    return vit.get_variant(m.variant or "B/16", **{"layer_norm_eps": eps, **overrides})


def image_encoder(name: str, m: Any, seed: int) -> Encoder:
    """Random-init or imported (HF / timm, converted on load) ViT."""
    cfg = _vit_config(m)
    model = vit.ViT(cfg, rngs=nnx.Rngs(seed))
    if m.weights in ("hf", "timm"):
        from bioscan_jax.convert import hf_vit

        load = hf_vit.load_hf_vit if m.weights == "hf" else hf_vit.load_timm_vit
        report = load(model, m.path, strict=False)
        logger.info("%s: loaded %d tensors from %s (ignored %s)", name, len(report.get("loaded", [])), m.path,
                    report.get("unexpected", []) + report.get("ignored", []))
    return Encoder(model, vit_embed_fn(m.normalize), image_batches(cfg.image_size))


def dna_embed_fn(model, batch):
    """Masked mean of the last hidden layer over the (N-stripped) attention mask; with reading
    frames (``[B, F, T]`` tokens), the mean of the frames' embeddings."""
    ids, mask = batch["ids"], batch["attention_mask"]
    if ids.ndim == 2:
        return kmer_bert.pooled_embedding(model, batch)
    b, f, t = ids.shape
    pooled = kmer_bert.pooled_embedding(model, {"ids": ids.reshape(b * f, t), "attention_mask": mask.reshape(b * f, t)})
    return pooled.reshape(b, f, -1).mean(axis=1)


def pretrained_barcodebert(config, workdir: str) -> nnx.Module:
    """BarcodeBERT pretrained (:func:`bioscan_jax.train.stages.pretrain_mlm`, as the barcodebert
    task does) on ``config.barcodebert.pretrain_split``.

    The run lives in ``workdir/models/barcodebert_<hash of the section>``: a later run with the
    same settings finds the final checkpoint there and does not train again.
    """
    section = config.barcodebert
    model_cfg = kmer_bert.config_from(section.model)
    run_dir = os.path.join(workdir, "models", f"barcodebert_{_fingerprint([config_access.to_dict(section), config.seed])}")
    tokenizer = dna_lib.KmerTokenizer(model_cfg.k, max_nucleotides=config.data.max_nucleotides,
                                      strip_trailing_n=True)
    split = sources.pretrain_split(config.data, section.pretrain_split)
    data = stages.open_dna_split(config.data, split, seed=config.seed, dedup=section.dedup_barcodes)
    t0 = time.perf_counter()
    result = stages.pretrain_mlm(config, section.pretrain, data, split, model_cfg, tokenizer,
                                 os.path.join(run_dir, "pretrain"), worker_count=config.data.worker_count)
    logger.info("BarcodeBERT pretraining: %d steps (%d this run) in %.1fs, %s", result.step,
                result.step - result.start_step, time.perf_counter() - t0, run_dir)
    return result.model().bert


def dna_encoder(name: str, m: Any, config, workdir: str) -> Encoder:
    """Random-init, pretrained on the fly, restored or converted (HF) BarcodeBERT."""
    if m.weights == "pretrain":
        model = pretrained_barcodebert(config, workdir)
    elif m.weights == "checkpoint":
        from bioscan_jax.convert import barcodebert as bb_load

        model = bb_load.load_workdir(m.path, model_config=kmer_bert.config_from(m)).model
    else:
        model = kmer_bert.KmerBert(kmer_bert.config_from(m), rngs=nnx.Rngs(config.seed))
        if m.weights == "hf":
            from bioscan_jax.convert import hf_bert

            report = hf_bert.load_hf_bert(model, m.path, strict=False)
            logger.info("%s: loaded %d tensors from %s", name, len(report.get("loaded", [])), m.path)
    return Encoder(model, dna_embed_fn, dna_batches(model.config.k, config.data.max_nucleotides, frames=int(m.frames)))


class KmerProfile(nnx.Module):
    """The alignment-free reference as an encoder: the k-mer frequency vector of a read's valid
    tokens (no parameters). With stride-1 tokens it does not depend on where the read starts."""

    def __init__(self, k: int):
        self.k = k

    def __call__(self, ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        vocab = 4**self.k
        kmer = ids - dna_lib.NUM_SPECIAL
        valid = (kmer >= 0) & (kmer < vocab) & (attention_mask > 0)
        counts = jax.vmap(lambda i, v: jnp.zeros(vocab, jnp.float32).at[i].add(v))(
            jnp.where(valid, kmer, 0), valid.astype(jnp.float32))
        return counts / jnp.maximum(counts.sum(-1, keepdims=True), 1.0)


def kmer_encoder(m: Any, config) -> Encoder:
    """k-mer frequencies (``m.k``; ``m.stride`` 0 = k, non-overlapping like BarcodeBERT's tokens)."""
    k = int(m.k)
    return Encoder(KmerProfile(k), lambda model, batch: model(batch["ids"], batch["attention_mask"]),
                   dna_batches(k, config.data.max_nucleotides, stride=int(m.stride) or k))


def clibd_workdir(config, workdir: str) -> str:
    """Where the CLIBD towers live: ``config.clibd_workdir`` or one per CLIBD config in the workdir."""
    return config.clibd_workdir or os.path.join(
        workdir, "models", f"clibd_{_fingerprint([config_access.to_dict(config.clibd), config.seed])}")


def clibd_towers(config, workdir: str, cache: dict) -> nnx.Module:
    """The CLIBD model, once per run: loaded from ``config.clibd_workdir`` when one is given,
    else trained by the CLIBD task in this run's workdir (resumed, or returned at once when a
    previous run already finished it)."""
    if "clibd" not in cache:
        from bioscan_jax.train import clibd  # only when a CLIBD tower is used

        path = clibd_workdir(config, workdir)
        if config.clibd_workdir:
            cache["clibd"] = clibd.load_towers(path, config.clibd)
            logger.info("loaded the CLIBD towers from %s", path)
        else:
            t0 = time.perf_counter()
            clibd_config = config.clibd.copy_and_resolve_references()
            clibd_config.resume = config.get("resume", "auto")  # --config.resume applies to every stage
            cache["clibd"], summary = clibd.train_clibd(clibd_config, path)
            logger.info("CLIBD training: %d steps in %.1fs, %s", summary["steps"], time.perf_counter() - t0, path)
    return cache["clibd"]


def clibd_encoder(name: str, m: Any, config, workdir: str, cache: dict) -> Encoder:
    """One tower of the CLIBD model: its aligned (projected, L2-normalised) or encoder feature."""
    towers = clibd_towers(config, workdir, cache)
    if m.modality not in towers.modalities:
        raise ValueError(f"config.models.{name}: the CLIBD model has no {m.modality} tower "
                         f"(towers: {list(towers.modalities)})")
    use_projection = m.feature == "projection"
    if m.modality == "image":
        norm = _normalizer("bioscan" if config.clibd.data.normalize_images else "none")  # as CLIBD trained

        def embed_fn(model, batch):
            out, aux = model.embed("image", {"image": norm(batch["image"])})
            return out if use_projection else aux["pooled"]

        return Encoder(towers, embed_fn, image_batches(towers.config.image.image_size))

    def embed_fn(model, batch):
        out, aux = model.embed("dna", {"dna_ids": batch["ids"], "dna_attention_mask": batch["attention_mask"]})
        return out if use_projection else aux["pooled"]

    return Encoder(towers, embed_fn, dna_batches(towers.config.dna.k, config.data.max_nucleotides))


def build_encoder(name: str, config, workdir: str, cache: dict) -> Encoder:
    """The encoder of ``config.models[name]``."""
    m = config.models[name]
    if m.weights == "clibd":
        return clibd_encoder(name, m, config, workdir, cache)
    if m.weights == "kmer":
        return kmer_encoder(m, config)
    if m.modality == "dna":
        return dna_encoder(name, m, config, workdir)
    return image_encoder(name, m, config.seed)


def model_fingerprint(name: str, config) -> str:
    """What an embedding depends on besides the records: the model entry and its weights' source."""
    m = config.models[name]
    parts: list[Any] = [config_access.to_dict(m), config.seed, config.data.max_nucleotides]
    if m.weights == "pretrain":
        parts.append(config_access.to_dict(config.barcodebert))
    if m.weights == "clibd":
        parts.append([config_access.to_dict(config.clibd), config.clibd_workdir])
    return _fingerprint(parts)


# ----------------------------------------------------------------------------- embeddings


def place_on_mesh(model: nnx.Module, mesh, rules) -> None:
    """Puts the model's variables on the mesh (sharded by the logical-axis rules) in place."""
    state = nnx.state(model)
    shardings = mesh_lib.variable_shardings(state, mesh, mesh_lib.normalize_rules(rules))
    pure = jax.device_put(state.to_pure_dict(), shardings)
    state.replace_by_pure_dict(pure)
    nnx.update(model, state)


def embedding_path(workdir: str, split: str, name: str) -> str:
    return os.path.join(workdir, "embeddings", f"{split}__{name}.npz")


def save_embeddings(path: str, arrays: Mapping[str, np.ndarray], fingerprint: str) -> None:
    """Writes ``arrays`` (+ the fingerprint) to ``path`` atomically."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path[: -len(".npz")] + ".tmp.npz"
    np.savez(tmp, **arrays, fingerprint=np.asarray(fingerprint))
    os.replace(tmp, path)


def load_embeddings(path: str, fingerprint: str, processid: np.ndarray) -> dict[str, np.ndarray] | None:
    """The stored embeddings if they match the model (``fingerprint``) and the records, else None."""
    if not os.path.exists(path):
        return None
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    if str(arrays.pop("fingerprint", "")) != fingerprint:
        logger.info("%s was written for another model definition; re-embedding", path)
        return None
    if not np.array_equal(arrays.get("processid"), processid):
        logger.info("%s holds other records than the split; re-embedding", path)
        return None
    return arrays


def embed_model(encoder: Encoder, source, config, mesh) -> dict[str, np.ndarray]:
    """Embeds every record of ``source`` (in order) with ``encoder``; labels kept beside."""
    place_on_mesh(encoder.model, mesh, config.sharding_rules)
    batch_size = int(config.embed.batch_size)
    out = embed_lib.embed_batches(encoder.model, encoder.batches(source, batch_size), encoder.embed_fn,
                                  mesh=mesh, batch_size=batch_size, keep=KEEP)
    out["processid"] = out["processid"].astype(str)
    return out


# ----------------------------------------------------------------------------- data


def split_records(source) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """The processids, label indices (``RANKS``, -1 missing) and partition (the record's own
    split, e.g. ``test`` or ``test_unseen``) of a split expression, in source order."""
    view = source.select([*KEEP, "split"]) if hasattr(source, "select") else source
    rows = [view[i] for i in range(len(view))]
    processid = np.asarray([str(r["processid"]) for r in rows])
    labels = {rank: np.asarray([int(r[rank]) for r in rows], dtype=np.int64) for rank in RANKS}
    partition = np.asarray([str(r.get("split", "")) for r in rows])
    return processid, labels, partition


def check_clusterable(labels: Mapping[str, np.ndarray], split: str, config) -> int:
    """Raises ``ValueError`` when the split cannot be clustered as configured; returns #species."""
    n = len(labels["species"])
    k = clustering.num_species(labels["species"])
    labelled = int((labels["species"] >= 0).sum())
    if k < 2:
        raise ValueError(f"split {split!r} has {k} species among {labelled} species-labelled records "
                         f"({n} records): zero-shot clustering needs at least two species")
    if n < k:
        raise ValueError(f"split {split!r} has {n} records, fewer than the {k} clusters (one per species)")
    c = config.cluster
    if c.reduction == "umap" and n <= int(c.n_components) + 1:
        raise ValueError(f"split {split!r} has {n} records; UMAP to {c.n_components} dims needs more than "
                         f"{int(c.n_components) + 1}: use more records or config.cluster.reduction='pca'")
    if c.reduction not in clustering.REDUCTIONS:
        raise ValueError(f"config.cluster.reduction={c.reduction!r}; valid: {list(clustering.REDUCTIONS)}")
    if c.prenorm not in clustering.PRENORMS:
        raise ValueError(f"config.cluster.prenorm={c.prenorm!r}; valid: {list(clustering.PRENORMS)}")
    if c.missing_labels not in clustering.MISSING_LABEL_POLICIES:
        raise ValueError(f"config.cluster.missing_labels={c.missing_labels!r}; "
                         f"valid: {list(clustering.MISSING_LABEL_POLICIES)}")
    return k


# ----------------------------------------------------------------------------- evaluation


def spec_embeddings(spec: EncoderSpec, embeddings: Mapping[str, Mapping[str, np.ndarray]],
                    partition: np.ndarray | None = None, prenorm: str = "fused") -> np.ndarray:
    """The clustered features of a spec: its models' embeddings normalised as ``prenorm``
    (:data:`clustering.PRENORMS`; per ``partition`` for the reference's elementwise z-score) and
    concatenated."""
    return clustering.prenorm_embeddings({name: embeddings[name]["embedding"] for name in spec.models},
                                         partition, prenorm)


def evaluate_spec(spec: EncoderSpec, embeddings, labels, config, partition: np.ndarray | None = None
                  ) -> dict[str, Any]:
    """The clustering metrics of one spec, or ``{'error': ...}`` for bad (NaN/inf) embeddings."""
    c = config.cluster
    try:
        x = spec_embeddings(spec, embeddings, partition, c.prenorm)
        metrics = clustering.evaluate_clustering(
            x, labels, encoder=spec.name, reduction=c.reduction, n_components=int(c.n_components),
            n_neighbors=int(c.n_neighbors), min_dist=float(c.min_dist), seed=int(config.seed),
            silhouette_samples=int(c.silhouette_samples), missing=c.missing_labels)
    except ValueError as e:
        logger.error("%s: not clustered: %s", spec.name, e)
        return {"modality": spec.modality, "models": list(spec.models), "error": str(e)}
    return {"modality": spec.modality, "models": list(spec.models), **metrics}


def results_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table: encoder × modality → AMI (%) per rank, ARI (%) at species, silhouette."""
    ranks = [clustering_plots.rank_display_name(r) for r in RANKS]
    head = ["encoder", "modality", *[f"AMI {r}" for r in ranks], "ARI Species", "silhouette"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for name, res in results.items():
        encoder = "+".join(res["models"])
        if "error" in res:
            cells = ["error"] * (len(head) - 2)
        else:
            cells = [f"{100 * res[f'ami/{r}']:.1f}" for r in RANKS]
            cells += [f"{100 * res['ari/species']:.1f}", f"{res['silhouette']:.3f}"]
        lines.append("| " + " | ".join([encoder, res["modality"], *cells]) + " |")
    return "\n".join(lines)


def _slug(name: str) -> str:
    return name.replace(":", "__").replace("/", "_")


def make_plots(specs, results, embeddings, labels, label_names, config, workdir: str,
               partition: np.ndarray | None = None) -> list[str]:
    """AMI-by-rank lines for every clustered spec and a 2-D UMAP per chosen spec."""
    ok = {s.name: results[s.name] for s in specs if "error" not in results[s.name]}
    paths = []
    plot_dir = os.path.join(workdir, "plots")
    if ok and config.plots.ami_by_rank:
        paths.append(str(clustering_plots.plot_ami_by_rank(
            ok, os.path.join(plot_dir, "ami_by_rank.png"), title=f"BIOSCAN-ZSC, {config.data.split}")))
    wanted = str(config.plots.umap_scatter or "")
    chosen = list(ok) if wanted == "all" else [s.strip() for s in wanted.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in results]
    if unknown:
        logger.warning("config.plots.umap_scatter names specs that were not evaluated: %s", unknown)
    n = len(labels["order"])
    for spec in (s for s in specs if s.name in chosen and s.name in ok):
        paths.append(str(clustering_plots.plot_umap_scatter(
            spec_embeddings(spec, embeddings, partition, config.cluster.prenorm), labels["order"], os.path.join(plot_dir, f"umap_{_slug(spec.name)}.png"),
            order_names=label_names.get("order"), seed=int(config.seed),
            n_neighbors=min(int(config.cluster.n_neighbors), n - 1), title=spec.name, encoder=spec.name)))
    return paths


# ----------------------------------------------------------------------------- task


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Embed (or reuse embeddings) → reduce → Ward → AMI per rank, for every encoder spec."""
    t_start = time.perf_counter()
    specs = parse_specs(config.encoders, config.models)
    names = list(dict.fromkeys(n for s in specs for n in s.models))
    for name in names:
        check_model_config(name, config.models[name])
    mesh = mesh_lib.make_mesh(config.mesh)
    mesh_lib.validate_batch(int(config.embed.batch_size), mesh)
    os.makedirs(workdir, exist_ok=True)

    split = config.data.split
    features = ["processid", "dna_barcode", "split", *RANKS]
    if any(config.models[n].modality == "image" for n in names):
        if config.data.source == "bold":
            raise ValueError("config.data.source='bold' has no images: evaluate DNA specs only")
        features.append(fields.IMAGE)
    data = sources.open_splits(config.data, [split], features=features, seed=config.seed)
    processid, labels, partition = split_records(data[split])
    n_species = check_clusterable(labels, split, config)
    logger.info("%s %s: %d records, %d species", data.description, split, len(processid), n_species)

    embeddings: dict[str, dict[str, np.ndarray]] = {}
    embed_info: dict[str, dict[str, Any]] = {}
    cache: dict[str, Any] = {}
    for name in names:
        t0 = time.perf_counter()
        path = embedding_path(workdir, split, name)
        fingerprint = model_fingerprint(name, config)
        arrays = None if config.embed.recompute else load_embeddings(path, fingerprint, processid)
        reused = arrays is not None
        if not reused:
            encoder = build_encoder(name, config, workdir, cache)
            arrays = embed_model(encoder, data[split], config, mesh)
            if not np.array_equal(arrays["processid"], processid):
                raise RuntimeError(f"{name}: the embedding pipeline returned the records in another order")
            save_embeddings(path, arrays, fingerprint)
        embeddings[name] = arrays
        embed_info[name] = {"path": path, "reused": reused, "dim": int(arrays["embedding"].shape[1]),
                            "seconds": time.perf_counter() - t0}
        logger.info("%s: %s embeddings %s in %.1fs", name, "reused" if reused else "computed",
                    arrays["embedding"].shape, embed_info[name]["seconds"])

    results = {s.name: evaluate_spec(s, embeddings, labels, config, partition) for s in specs}
    table = results_table(results)
    plots = make_plots(specs, results, embeddings, labels, data.label_names, config, workdir, partition)
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
