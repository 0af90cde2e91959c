"""BarcodeBERT: a BERT encoder over non-overlapping DNA k-mers (Flax NNX).

Reproduces HF ``BertForTokenClassification`` as used by BarcodeBERT: vocabulary ``4**k + 2``
(``[MASK]`` = 0 = ``pad_token_id``, ``[UNK]`` = 1, then the k-mers), absolute positions, token
type 0, post-LN blocks with exact-erf GELU, LayerNorm eps 1e-12, and an MLM head that is
dropout + ``Linear(hidden → 4**k)`` without weight tying. The word-embedding row of ``[MASK]``
is zero at init and never receives a gradient (``nn.Embedding(padding_idx=0)`` in HF).

Modules are tree-shaped: ``KmerBertForMLM`` and ``KmerBertClassifier`` each own a ``bert``
(``KmerBert``) and a head, so pretrained encoder weights move between them as the state of
``.bert`` (fine-tuning starts from ``nnx.state(pretrained.bert, nnx.Param)`` through the train
loop's ``warm_start``).

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
class KmerBertConfig(layers.BertConfig):
    """Configuration of a k-mer BERT (the BERT fields of :class:`~bioscan_jax.models.layers.BertConfig`
    and ``k``). ``vocab_size`` and ``num_labels`` default from ``k``."""

    k: int = 4
    num_labels: int | None = None  # MLM classes, default 4**k

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.vocab_size is None:  # default 4**k + 2
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



VARIANTS: dict[str, dict[str, Any]] = {
    # CPU-sized model for the embedded synthetic run and tests.
    "tiny": dict(k=4, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512),
    # BIOSCAN-5M paper model "Ours (8-4-4)".
    "paper": dict(k=8, hidden_size=768, num_layers=4, num_heads=4, intermediate_size=3072),
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


def config_from(section) -> KmerBertConfig:
    """The config of a model section of a task config: ``variant`` (default ``'tiny'``), optional
    ``remat`` / ``scan_layers`` and ``overrides`` (field -> value)."""
    overrides = dict(section.get("overrides", None) or {})
    for name in ("remat", "scan_layers"):
        if section.get(name, None) is not None:
            overrides[name] = bool(section.get(name))
    return get_variant(section.get("variant", None) or "tiny", **overrides)


class KmerBert(layers.BertEncoder):
    """Embeddings → post-LN encoder (:class:`~bioscan_jax.models.layers.BertEncoder`). Returns
    ``(last_hidden [B,T,D], aux)``."""

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
        return self.encode(input_ids, attention_mask, token_type_ids=token_type_ids, deterministic=deterministic,
                           return_all=output_hidden_states)


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
        # finetuning.py creates the head with nn.Linear after loading the encoder: torch's default init
        kernel_init, bias_init = layers.torch_linear_inits(config.hidden_size)
        self.head = layers.DenseGeneral(
            config.hidden_size,
            num_classes,
            kernel_axes=("embed", "classes"),
            kernel_init=kernel_init,
            bias_init=bias_init,
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


def pooled_embedding(model, batch):
    """Masked mean of the encoder's last hidden layer (the reference's probe embedding)."""
    encoder = model.bert if hasattr(model, "bert") else model
    return encoder(batch["ids"], batch["attention_mask"])[1]["pooled"]
