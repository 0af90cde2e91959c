"""CLIBD towers: image, DNA and taxonomy-text encoders projected into one shared space (Flax NNX).

Each tower is an encoder, a pooling and a linear projection to ``embed_dim``, followed by L2
normalisation (as in BIOSCAN-CLIBD):

========= =========================================== ============================== =============
modality  encoder                                     pooled feature                 batch keys
========= =========================================== ============================== =============
image     :class:`~bioscan_jax.models.vit.ViT`        CLS token after the final norm ``image``
dna       :class:`~bioscan_jax.models.kmer_bert.      masked mean of the last        ``dna_ids``,
          KmerBert` (BarcodeBERT)                     hidden layer                   ``dna_attention_mask``
text      :class:`~bioscan_jax.models.text.           masked mean of the last        ``text_ids``,
          TextEncoder` (taxonomy string)              hidden layer                   ``text_attention_mask``
========= =========================================== ============================== =============

:class:`ClibdModel` holds any subset of the towers (at least one; the contrastive loss needs
two) and the logit scale ``log_scale`` (init ``log(1/0.07)``; an ``nnx.Param`` when learnable,
a :class:`FixedLogScale` variable — never optimised — otherwise). Calling it on a batch returns
``(features, aux)``: ``features[modality]`` is ``[B, embed_dim]`` float32 with unit L2 norm,
``aux[modality]`` the tower's encoder outputs (``pooled`` before the projection, ...).

Projection kernels carry logical axes ``('embed', None)``: the encoder width may be sharded
over ``fsdp``, the shared dimension is replicated.

Pretrained encoders are loaded into a built model with :func:`load_encoder_state` (an
``nnx.State`` of encoder parameters, e.g. a BarcodeBERT MLM checkpoint's ``bert``).

``ClibdConfig.tower_mode`` picks the pooling (:data:`TOWER_MODES`):

* ``'masked_mean'`` (ours, the tiny default): the table above;
* ``'reference'`` — CLIBD's own towers (bioscan-ml/clibd ``bioscanclip/model``): the DNA tower
  (``dna_encoder.py::CLIBDDNAEncoder``) prepends id 0 to the k-mer ids, runs BERT without an
  attention mask, applies the MLM transform (dense + GELU + LayerNorm, ``transform``) and a
  decoder Linear(hidden → embed_dim) (``projection``), then softmax over the output dimension and
  the mean over all tokens; the text tower (``language_encoder.py::CLIBDLanguageEncoder``) takes
  the mean of the last hidden layer over all positions, padding included (attention still masked),
  then ``proj``; the image tower is the same (timm's CLS token after the final norm, head as the
  projection; LayerNorm eps 1e-6 comes with the ViT config).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bioscan_jax.models import kmer_bert, layers, params, text, vit

Array = jax.Array

#: Modalities in canonical order.
MODALITIES: tuple[str, ...] = ("image", "dna", "text")
#: Batch keys each tower reads.
INPUT_KEYS: dict[str, tuple[str, ...]] = {
    "image": ("image",),
    "dna": ("dna_ids", "dna_attention_mask"),
    "text": ("text_ids", "text_attention_mask"),
}
#: Tower poolings (module docstring).
TOWER_MODES: tuple[str, ...] = ("masked_mean", "reference")
#: CLIP's initial logit scale, log(1 / 0.07).
INIT_LOG_SCALE: float = math.log(1 / 0.07)


@dataclasses.dataclass(frozen=True)
class ClibdConfig:
    """The towers (``None`` = modality disabled), the shared dimension and the logit scale."""

    image: vit.ViTConfig | None = None
    dna: kmer_bert.KmerBertConfig | None = None
    text: text.TextConfig | None = None
    embed_dim: int = 768
    init_log_scale: float = INIT_LOG_SCALE
    learnable_scale: bool = True
    param_dtype: Any = jnp.float32
    tower_mode: str = "masked_mean"

    def __post_init__(self):
        if self.tower_mode not in TOWER_MODES:
            raise ValueError(f"unknown tower_mode {self.tower_mode!r}; valid: {', '.join(TOWER_MODES)}")
        if not self.modalities:
            raise ValueError("a CLIBD model needs at least one tower (image, dna or text)")
        if self.embed_dim < 1:
            raise ValueError(f"embed_dim must be positive, got {self.embed_dim}")

    @property
    def modalities(self) -> tuple[str, ...]:
        """The enabled modalities, in canonical order."""
        return tuple(m for m in MODALITIES if getattr(self, m) is not None)


class FixedLogScale(nnx.Variable):
    """A logit scale that is not trained (kept out of the optimised ``nnx.Param`` set)."""


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    """``x / max(||x||, eps)`` along the last axis, in float32."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


def _projection(in_dim: int, embed_dim: int, param_dtype: Any, rngs: nnx.Rngs) -> layers.DenseGeneral:
    """A tower's projection with torch's ``nn.Linear`` default init, as CLIBD creates each: timm's
    ``reset_classifier(768)`` (image), ``nn.Linear(768, 768)`` in ``dna_encoder.py`` (DNA decoder),
    ``proj`` in ``language_encoder.py`` (text)."""
    kernel_init, bias_init = layers.torch_linear_inits(in_dim)
    return layers.DenseGeneral(in_dim, embed_dim, kernel_axes=("embed", None), kernel_init=kernel_init,
                               bias_init=bias_init, param_dtype=param_dtype, rngs=rngs)


class ImageTower(nnx.Module):
    """ViT → CLS token (after the final LayerNorm) → Linear → L2 normalisation."""

    def __init__(self, config: vit.ViTConfig, embed_dim: int, *, rngs: nnx.Rngs):
        if config.num_classes:
            raise ValueError("the image tower's ViT must have no classification head (num_classes=0)")
        self.encoder = vit.ViT(config, rngs=rngs)
        self.projection = _projection(config.hidden_size, embed_dim, config.param_dtype, rngs)

    def __call__(self, images: Array, *, deterministic: bool | None = None) -> tuple[Array, dict[str, Any]]:
        pooled, _ = self.encoder(images, deterministic=deterministic)
        return l2_normalize(self.projection(pooled)), {"pooled": pooled}


class MlmTransform(nnx.Module):
    """HF ``BertPredictionHeadTransform``: dense (hidden → hidden) → GELU (erf) → LayerNorm."""

    def __init__(self, config: kmer_bert.KmerBertConfig, *, rngs: nnx.Rngs):
        self.dense = layers.DenseGeneral(
            config.hidden_size, config.hidden_size, kernel_axes=("embed", None),
            kernel_init=nnx.initializers.normal(config.initializer_range), dtype=config.dtype,
            param_dtype=config.param_dtype, rngs=rngs)
        self.norm = layers.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=config.dtype,
                                     param_dtype=config.param_dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.norm(jax.nn.gelu(self.dense(x), approximate=False))


class DnaTower(nnx.Module):
    """BarcodeBERT → pooling (``mode``, module docstring) → Linear → L2 normalisation."""

    def __init__(self, config: kmer_bert.KmerBertConfig, embed_dim: int, *, mode: str = "masked_mean",
                 rngs: nnx.Rngs):
        self.mode = mode
        self.encoder = kmer_bert.KmerBert(config, rngs=rngs)
        self.transform = MlmTransform(config, rngs=rngs) if mode == "reference" else nnx.data(None)
        self.projection = _projection(config.hidden_size, embed_dim, config.param_dtype, rngs)

    def __call__(self, ids: Array, attention_mask: Array, *, deterministic: bool | None = None):
        if self.mode == "reference":
            # CLIBDDNAEncoder: [0, *ids] (dna_encoder.py::get_sequence_pipeline), no attention mask,
            # BERT MLM transform + decoder to embed_dim, softmax, mean over every token.
            ids = jnp.concatenate([jnp.zeros_like(ids[:, :1]), ids], axis=1)
            hidden, _ = self.encoder(ids, None, deterministic=deterministic)
            logits = self.projection(self.transform(hidden).astype(self.projection.kernel.dtype))
            pooled = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).mean(axis=1)
            return l2_normalize(pooled), {"pooled": hidden.astype(jnp.float32).mean(axis=1)}
        _, aux = self.encoder(ids, attention_mask, deterministic=deterministic)
        pooled = aux["pooled"]
        return l2_normalize(self.projection(pooled.astype(self.projection.kernel.dtype))), {"pooled": pooled}


class TextTower(nnx.Module):
    """Taxonomy-text BERT → mean of the last hidden layer (``mode``: over the attention mask, or
    over all positions as CLIBD) → Linear → L2 normalisation."""

    def __init__(self, config: text.TextConfig, embed_dim: int, *, mode: str = "masked_mean", rngs: nnx.Rngs):
        self.mode = mode
        self.encoder = text.TextEncoder(config, rngs=rngs)
        self.projection = _projection(config.hidden_size, embed_dim, config.param_dtype, rngs)

    def __call__(self, ids: Array, attention_mask: Array, *, deterministic: bool | None = None):
        pooled, aux = self.encoder(ids, attention_mask, deterministic=deterministic)
        if self.mode == "reference":  # CLIBDLanguageEncoder: last_hidden_state.mean(dim=1)
            pooled = aux["hidden"].astype(jnp.float32).mean(axis=1)
        return l2_normalize(self.projection(pooled.astype(self.projection.kernel.dtype))), {"pooled": pooled}


class ClibdModel(nnx.Module):
    """The CLIBD towers and the logit scale. ``ClibdModel(ClibdConfig(...), rngs=nnx.Rngs(0))``."""

    def __init__(self, config: ClibdConfig, *, rngs: nnx.Rngs):
        self.config = c = config
        self.image = ImageTower(c.image, c.embed_dim, rngs=rngs) if c.image is not None else nnx.data(None)
        mode = c.tower_mode
        self.dna = DnaTower(c.dna, c.embed_dim, mode=mode, rngs=rngs) if c.dna is not None else nnx.data(None)
        self.text = TextTower(c.text, c.embed_dim, mode=mode, rngs=rngs) if c.text is not None else nnx.data(None)
        scale = jnp.asarray(c.init_log_scale, jnp.float32)
        self.log_scale = nnx.Param(scale) if c.learnable_scale else FixedLogScale(scale)

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.config.modalities

    def embed(self, modality: str, batch: Mapping[str, Array], *, deterministic: bool | None = None):
        """``(features [B, embed_dim], aux)`` of one modality from its batch keys."""
        tower = getattr(self, modality, None) if modality in MODALITIES else None
        if tower is None:
            raise ValueError(f"modality {modality!r} is not enabled; enabled: {list(self.modalities)}")
        missing = [k for k in INPUT_KEYS[modality] if k not in batch]
        if missing:
            raise KeyError(f"batch has no {missing} for the {modality} tower (keys: {sorted(batch)})")
        return tower(*(batch[k] for k in INPUT_KEYS[modality]), deterministic=deterministic)

    def __call__(
        self,
        batch: Mapping[str, Array],
        *,
        modalities: Sequence[str] | None = None,
        deterministic: bool | None = None,
    ) -> tuple[dict[str, Array], dict[str, Any]]:
        """Features of ``modalities`` (default: every enabled tower) for a batch dict."""
        features, aux = {}, {}
        for m in self.modalities if modalities is None else modalities:
            features[m], aux[m] = self.embed(m, batch, deterministic=deterministic)
        return features, aux


def encoder_of(model: ClibdModel, modality: str) -> nnx.Module:
    """The encoder (without projection) of one tower, e.g. the ViT of the image tower."""
    tower = getattr(model, modality, None) if modality in MODALITIES else None
    if tower is None:
        raise ValueError(f"modality {modality!r} is not enabled; enabled: {list(model.modalities)}")
    return tower.encoder


def load_params(module: nnx.Module, state: nnx.State | Mapping[str, Any], what: str) -> None:
    """Copies ``state`` (an ``nnx.State`` or pure dict of ``module``'s ``nnx.Param``s) into
    ``module`` in place (:func:`bioscan_jax.models.params.copy_into`: layer layout matched, paths
    and shapes checked)."""
    params.copy_into(module, state, f"pretrained {what}")


def load_encoder_state(model: ClibdModel, modality: str, state: nnx.State | Mapping[str, Any]) -> None:
    """Copies pretrained encoder parameters (an ``nnx.State`` or pure dict of the encoder's
    ``nnx.Param``s, e.g. ``nnx.state(mlm_model.bert, nnx.Param)``) into a tower, in place.

    Shapes must match exactly; a mismatch raises ``ValueError`` listing the differing paths.
    """
    load_params(encoder_of(model, modality), state, f"{modality} encoder")


def load_dna_transform(model: ClibdModel, state: Mapping[str, Any]) -> None:
    """Copies a pretrained MLM transform (``{'dense': {kernel, bias}, 'norm': {scale, bias}}``,
    e.g. BarcodeBERT's ``cls.predictions.transform``) into a reference-mode DNA tower."""
    tower = getattr(model, "dna", None)
    if tower is None or tower.transform is None:
        raise ValueError("the model has no reference-mode DNA tower (tower_mode='reference') to take an MLM transform")
    load_params(tower.transform, state, "DNA MLM transform")


@functools.lru_cache(maxsize=None)
def aligned_features(modalities: tuple[str, ...]):
    """``(model, batch) -> [B, len(modalities) * embed_dim]``, the towers' aligned features
    side by side; one function per modality set, so repeated evaluations reuse one compiled
    forward (:func:`bioscan_jax.eval.embed.embed_batches`)."""

    def embed_fn(model, batch):
        features, _ = model(batch, modalities=modalities, deterministic=True)
        return jnp.concatenate([features[m] for m in modalities], axis=-1)

    return embed_fn
