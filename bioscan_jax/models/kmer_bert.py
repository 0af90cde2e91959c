"""BarcodeBERT: a BERT encoder over non-overlapping DNA k-mers (Flax NNX).

Reproduces HF ``BertForTokenClassification`` as used by BarcodeBERT: vocabulary ``4**k + 2``
(``[MASK]`` = 0 = ``pad_token_id``, ``[UNK]`` = 1, then the k-mers), absolute positions, token
type 0, post-LN blocks with exact-erf GELU, LayerNorm eps 1e-12, and an MLM head that is
dropout + ``Linear(hidden → 4**k)`` without weight tying. The word-embedding row of ``[MASK]``
is zero at init and never receives a gradient (``nn.Embedding(padding_idx=0)`` in HF).

Modules are tree-shaped: ``KmerBertForMLM`` and ``KmerBertClassifier`` each own a ``bert``
(``KmerBert``) and a head, so pretrained encoder weights move between them with
:func:`copy_encoder` (``nnx.update(dst.bert, nnx.state(src.bert, nnx.Param))``).

Every model returns ``(output, aux)``; ``aux['hidden']`` is the last hidden layer [B, T, D] and
``aux['pooled']`` its masked mean over the attention mask [B, D] (float32).

Logical parameter axes: see :mod:`bioscan_jax.models.layers`; the MLM head kernel is
(embed, vocab) and the classifier kernel (embed, classes).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bioscan_jax.models import layers

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class KmerBertConfig:
    """Configuration of a k-mer BERT. ``vocab_size`` and ``num_labels`` default from ``k``."""

    k: int = 4
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    initializer_range: float = 0.02
    vocab_size: int | None = None  # default 4**k + 2
    num_labels: int | None = None  # MLM classes, default 4**k
    hidden_act: str = "gelu"  # exact erf, as HF "gelu"
    attention_impl: str = "einsum"  # or "xla" / "cudnn" (jax.nn.dot_product_attention when no attn dropout)
    dtype: Any = None  # compute dtype (None: float32 params → float32 compute)
    param_dtype: Any = jnp.float32
    remat: bool = False
    scan_layers: bool = False  # stacked blocks run with nnx.scan (layers.Encoder scan=True)

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.vocab_size is None:
            object.__setattr__(self, "vocab_size", 4**self.k + 2)
        if self.num_labels is None:
            object.__setattr__(self, "num_labels", 4**self.k)

    @property
    def max_tokens(self) -> int:
        """Tokens per 660-nt barcode with non-overlapping k-mers."""
        return 660 // self.k

    def replace(self, **overrides) -> "KmerBertConfig":
        """``dataclasses.replace`` that re-derives ``vocab_size``/``num_labels`` when ``k`` changes."""
        if "k" in overrides and overrides["k"] != self.k:
            overrides.setdefault("vocab_size", None)
            overrides.setdefault("num_labels", None)
        return dataclasses.replace(self, **overrides)

    def block_config(self) -> layers.BlockConfig:
        return layers.BlockConfig(
            dim=self.hidden_size,
            num_heads=self.num_heads,
            mlp_dim=self.intermediate_size,
            pre_norm=False,
            layer_norm_eps=self.layer_norm_eps,
            dropout=self.dropout_rate,
            attention_dropout=self.attention_dropout_rate,
            activation=self.hidden_act,
            attention_impl=self.attention_impl,
            initializer_range=self.initializer_range,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )


VARIANTS: dict[str, dict[str, Any]] = {
    # CPU-sized model for the embedded synthetic run and tests.
    "tiny": dict(k=4, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512),
    # BIOSCAN-5M paper model "Ours (8-4-4)".
    "paper": dict(k=8, hidden_size=768, num_layers=4, num_heads=4, intermediate_size=3072),
    "8_4_4": dict(k=8, hidden_size=768, num_layers=4, num_heads=4, intermediate_size=3072),
    # Original BarcodeBERT (Canadian invertebrates), k=4.
    "4_12_12": dict(k=4, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
    # Throughput benchmark model.
    "4_4_4": dict(k=4, hidden_size=768, num_layers=4, num_heads=4, intermediate_size=3072),
    # CLIBD DNA tower (k=5, 660 nt).
    "5_12_12": dict(k=5, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
}


def get_variant(name: str, **overrides) -> KmerBertConfig:
    """Named configuration with field overrides, e.g. ``get_variant('paper', dropout_rate=0.0)``."""
    if name not in VARIANTS:
        raise ValueError(f"unknown KmerBert variant {name!r}; valid variants: {sorted(VARIANTS)}")
    fields = {f.name for f in dataclasses.fields(KmerBertConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ValueError(f"unknown KmerBertConfig fields {bad}; valid fields: {sorted(fields)}")
    return KmerBertConfig(**{**VARIANTS[name], **overrides})


class KmerBert(nnx.Module):
    """Embeddings → post-LN encoder. Returns ``(last_hidden [B,T,D], aux)``."""

    def __init__(self, config: KmerBertConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config
        self.embeddings = layers.BertEmbeddings(
            c.vocab_size,
            c.hidden_size,
            max_position=c.max_position_embeddings,
            type_vocab_size=c.type_vocab_size,
            pad_token_id=c.pad_token_id,
            layer_norm_eps=c.layer_norm_eps,
            dropout=c.dropout_rate,
            initializer_range=c.initializer_range,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            rngs=rngs,
        )
        self.encoder = layers.Encoder(c.block_config(), c.num_layers, remat=c.remat, scan=c.scan_layers, rngs=rngs)

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        *,
        token_type_ids: Array | None = None,
        deterministic: bool | None = None,
        output_hidden_states: bool = False,
    ) -> tuple[Array, dict[str, Any]]:
        """``input_ids`` int [B, T]; ``attention_mask`` bool/int [B, T] (1 = real token)."""
        x = self.embeddings(input_ids, token_type_ids, deterministic=deterministic)
        if output_hidden_states:
            x, all_hidden = self.encoder(x, attention_mask, deterministic=deterministic, return_all=True)
        else:
            x = self.encoder(x, attention_mask, deterministic=deterministic)
        aux: dict[str, Any] = {"hidden": x, "pooled": layers.masked_mean(x, attention_mask)}
        if output_hidden_states:
            aux["hidden_states"] = all_hidden
        return x, aux


class KmerBertForMLM(nnx.Module):
    """``bert`` + dropout + ``classifier`` Linear(hidden → num_labels). Returns float32 logits."""

    def __init__(self, config: KmerBertConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.bert = KmerBert(config, rngs=rngs)
        self.dropout = layers.Dropout(config.dropout_rate, rngs=rngs)
        self.classifier = layers.DenseGeneral(
            config.hidden_size,
            config.num_labels,
            kernel_axes=("embed", "vocab"),
            kernel_init=nnx.initializers.normal(config.initializer_range),
            dtype=config.dtype,
            param_dtype=config.param_dtype,
            rngs=rngs,
        )

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        *,
        deterministic: bool | None = None,
        **kwargs,
    ) -> tuple[Array, dict[str, Any]]:
        x, aux = self.bert(input_ids, attention_mask, deterministic=deterministic, **kwargs)
        logits = self.classifier(self.dropout(x, deterministic=deterministic))
        return logits.astype(jnp.float32), aux


#: Pooling of :class:`KmerBertClassifier`: ``'mean'`` over all positions, padding included, as
#: BarcodeBERT's fine-tuning (``barcodebert/finetuning.py::ClassificationModel.forward``:
#: ``hidden_states[-1].mean(1)``), or ``'masked_mean'`` over the attention mask.
POOLINGS = ("mean", "masked_mean")


class KmerBertClassifier(nnx.Module):
    """``bert`` → mean of the last hidden layer (``pooling``: :data:`POOLINGS`) → (dropout) →
    ``head`` Linear(hidden → classes)."""

    def __init__(
        self,
        config: KmerBertConfig,
        num_classes: int,
        *,
        head_dropout: float = 0.0,
        pooling: str = "masked_mean",
        rngs: nnx.Rngs,
    ):
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; valid: {', '.join(POOLINGS)}")
        self.config = config
        self.num_classes = num_classes
        self.pooling = pooling
        self.bert = KmerBert(config, rngs=rngs)
        self.head_dropout = layers.Dropout(head_dropout, rngs=rngs)
        self.head = layers.DenseGeneral(
            config.hidden_size,
            num_classes,
            kernel_axes=("embed", "classes"),
            kernel_init=nnx.initializers.normal(config.initializer_range),
            param_dtype=config.param_dtype,
            rngs=rngs,
        )

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        *,
        deterministic: bool | None = None,
        **kwargs,
    ) -> tuple[Array, dict[str, Any]]:
        x, aux = self.bert(input_ids, attention_mask, deterministic=deterministic, **kwargs)
        pooled = aux["pooled"] if self.pooling == "masked_mean" else x.astype(jnp.float32).mean(axis=1)
        pooled = self.head_dropout(pooled, deterministic=deterministic)
        return self.head(pooled).astype(jnp.float32), aux


def copy_encoder(src: nnx.Module, dst: nnx.Module) -> None:
    """Copy the encoder parameters of ``src`` into ``dst`` in place.

    Either may be a ``KmerBert`` or any model with a ``.bert`` (``KmerBertForMLM``,
    ``KmerBertClassifier``); the configs must agree in shape. Heads are left untouched.
    """
    s = src.bert if hasattr(src, "bert") else src
    d = dst.bert if hasattr(dst, "bert") else dst
    src_state = nnx.state(s, nnx.Param)
    dst_state = nnx.state(d, nnx.Param)
    s_shapes = {path: jnp.shape(v) for path, v in nnx.to_flat_state(src_state)}
    d_shapes = {path: jnp.shape(v) for path, v in nnx.to_flat_state(dst_state)}
    if s_shapes != d_shapes:
        diff = sorted(
            ".".join(map(str, p)) for p in set(s_shapes) ^ set(d_shapes)
            | {p for p in set(s_shapes) & set(d_shapes) if s_shapes[p] != d_shapes[p]})
        raise ValueError(f"encoder parameters differ between source and destination: {diff[:10]}")
    nnx.update(d, src_state)
