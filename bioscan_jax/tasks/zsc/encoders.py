"""The encoders of the zero-shot clustering benchmark (:mod:`bioscan_jax.tasks.zsc`).

* :func:`parse_specs` / :func:`check_model_config`: ``config.encoders``
  (``<modality>:<model>[+<model>]``) and the ``config.models`` entries they name, checked before
  anything runs;
* :func:`build_encoder`: the frozen model of one entry with its forward and eval batches
  (:class:`Encoder`): a ViT (random or imported HF / timm weights, :func:`image_encoder`), a
  BarcodeBERT (random, pretrained, restored or imported, :func:`dna_encoder`), k-mer frequencies
  (:class:`KmerProfile`) or one tower of a CLIBD model (:func:`clibd_encoder`).

Weights that come out of a training stage (``'pretrain'``: BarcodeBERT pretrained on the fly;
``'clibd'``: the CLIBD towers) are the task's to make (``eval`` does not import ``train``): it
passes them to :func:`build_encoder` as ``trained(kind) -> nnx.Module``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bioscan_jax.data import dna as dna_lib
from bioscan_jax.data import fields, pipeline, schema
from bioscan_jax.eval import clustering
from bioscan_jax.eval import embed as embed_lib
from bioscan_jax.models import kmer_bert, vit
from bioscan_jax import config_access
from bioscan_jax import sharding as mesh_lib

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
#: ``trained(kind)``: the model a training stage made, for ``'pretrain'`` weights (the
#: pretrained BarcodeBERT encoder) and ``'clibd'`` weights (the CLIBD towers).
Trained = Callable[[str], nnx.Module]


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


def dna_batches(k: int, max_nucleotides: int, stride: int | None = None, frames: int = 1) -> Callable:
    """Eval DNA batches for the ZSC protocol: k-mer tokens with trailing N stripped.

    ``frames > 1``: ``ids``/``attention_mask`` are ``[B, frames, T]``, the read tokenised after
    dropping its first 0, 1, ... ``frames - 1`` nucleotides (its reading frames).
    """
    # zs-ssl-clustering strips trailing N from every DNA encoder's input: the bioscan5m rule
    tokenizer = dna_lib.tokenizer_for("bioscan5m", k, stride=stride, max_nucleotides=max_nucleotides)
    barcode = fields.feature_name("dna_barcode")

    def reading_frames(batch):
        seqs = list(batch.pop(barcode))
        tokens = [(batch["ids"], batch["attention_mask"])]  # frame 0: the pipeline's tokens
        tokens += [tokenizer(seqs, offsets=np.full(len(seqs), f)) for f in range(1, frames)]
        batch["ids"] = np.stack([ids for ids, _ in tokens], axis=1)
        batch["attention_mask"] = np.stack([mask for _, mask in tokens], axis=1)
        return batch

    def make(source, batch_size):
        ds = pipeline.dna_pipeline(source, tokenizer=tokenizer, batch_size=mesh_lib.process_batch_size(batch_size),
                                   train=False, drop_remainder=False, shard="jax", num_epochs=1,
                                   keep=KEEP + ((barcode,) if frames > 1 else ()))
        return ds.map(reading_frames) if frames > 1 else ds

    return make


def image_batches(image_size: int) -> Callable:
    """Eval image batches for the ZSC protocol: Resize ``image_size`` → CenterCrop ``image_size``,
    values in [0, 1] (normalisation happens on the device, per encoder)."""

    def make(source, batch_size):
        return pipeline.image_pipeline(source, batch_size=mesh_lib.process_batch_size(batch_size), train=False,
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


def vit_config(m: Any) -> vit.ViTConfig:
    overrides = {**config_access.to_dict(m.overrides), "image_size": int(m.image_size) or 224}
    eps = float(m.layer_norm_eps) or (1e-6 if m.weights == "timm" else 1e-12)
    return vit.get_variant(m.variant or "B/16", **{"layer_norm_eps": eps, **overrides})


def image_encoder(name: str, m: Any, seed: int) -> Encoder:
    """Random-init or imported (HF / timm, converted on load) ViT."""
    cfg = vit_config(m)
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


def dna_encoder(name: str, m: Any, config, trained: Trained) -> Encoder:
    """Random-init, pretrained on the fly (``trained('pretrain')``), restored or converted (HF)
    BarcodeBERT."""
    if m.weights == "pretrain":
        model = trained("pretrain")
    elif m.weights == "checkpoint":
        from bioscan_jax.convert import barcodebert as bb_load

        model = bb_load.resolve(m.path, what=f"config.models.{name}.path", model_config=kmer_bert.config_from(m)).model
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


def clibd_encoder(name: str, m: Any, towers: nnx.Module, config) -> Encoder:
    """One tower of the CLIBD model ``towers``: its aligned (projected, L2-normalised) or encoder
    feature."""
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


def build_encoder(name: str, config, trained: Trained) -> Encoder:
    """The encoder of ``config.models[name]``; ``trained`` gives the weights a training stage makes."""
    m = config.models[name]
    if m.weights == "clibd":
        return clibd_encoder(name, m, trained("clibd"), config)
    if m.weights == "kmer":
        return kmer_encoder(m, config)
    if m.modality == "dna":
        return dna_encoder(name, m, config, trained)
    return image_encoder(name, m, config.seed)
