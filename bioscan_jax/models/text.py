"""Taxonomy-text tower: a small BERT (``bert-small`` shape) over word-piece ids (Flax NNX).

Same embeddings and post-LN encoder as HF ``BertModel`` (so ``prajjwal1/bert-small`` style
checkpoints load with :mod:`bioscan_jax.convert.hf_bert`); the output is the masked mean of the
last hidden layer. Returns ``(pooled [B, D] float32, aux)`` with ``aux['hidden']`` [B, T, D].
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx
import jax.numpy as jnp

from bioscan_jax.models import layers

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 30522
    hidden_size: int = 512
    num_layers: int = 4
    num_heads: int = 8
    intermediate_size: int = 2048
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    initializer_range: float = 0.02
    hidden_act: str = "gelu"
    attention_impl: str = "einsum"  # or "xla" / "cudnn" (jax.nn.dot_product_attention when no attn dropout)
    dtype: Any = None
    param_dtype: Any = jnp.float32
    remat: bool = False
    scan_layers: bool = False  # stacked blocks run with nnx.scan (layers.Encoder scan=True)

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
    "bert-small": dict(hidden_size=512, num_layers=4, num_heads=8, intermediate_size=2048),
    "bert-mini": dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024),
    "tiny": dict(vocab_size=1000, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=256),
}


def get_variant(name: str, **overrides) -> TextConfig:
    if name not in VARIANTS:
        raise ValueError(f"unknown text variant {name!r}; valid variants: {sorted(VARIANTS)}")
    return TextConfig(**{**VARIANTS[name], **overrides})


class TextEncoder(nnx.Module):
    """``embeddings`` → ``encoder`` → masked mean. Module layout matches :class:`KmerBert`."""

    def __init__(self, config: TextConfig, *, rngs: nnx.Rngs):
        self.config = c = config
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
    ) -> tuple[Array, dict[str, Any]]:
        x = self.embeddings(input_ids, token_type_ids, deterministic=deterministic)
        x = self.encoder(x, attention_mask, deterministic=deterministic)
        pooled = layers.masked_mean(x, attention_mask)
        return pooled, {"hidden": x, "pooled": pooled}
