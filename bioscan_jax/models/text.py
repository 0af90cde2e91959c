"""Taxonomy-text tower: a small BERT (``bert-small`` shape) over word-piece ids (Flax NNX).

Same embeddings and post-LN encoder as HF ``BertModel`` (so ``prajjwal1/bert-small`` style
checkpoints load with :mod:`bioscan_jax.convert.hf_bert`); the output is the masked mean of the
last hidden layer. Returns ``(pooled [B, D] float32, aux)`` with ``aux['hidden']`` [B, T, D].
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from bioscan_jax.models import layers

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class TextConfig(layers.BertConfig):
    """The taxonomy-text tower: a BERT (:class:`~bioscan_jax.models.layers.BertConfig`) with
    bert-small's sizes and WordPiece vocabulary by default."""

    vocab_size: int | None = 30522
    hidden_size: int = 512
    num_layers: int = 4
    num_heads: int = 8
    intermediate_size: int = 2048


VARIANTS: dict[str, dict[str, Any]] = {
    "bert-small": dict(hidden_size=512, num_layers=4, num_heads=8, intermediate_size=2048),
    "bert-mini": dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024),
    "tiny": dict(vocab_size=1000, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=256),
}


def get_variant(name: str, **overrides) -> TextConfig:
    if name not in VARIANTS:
        raise ValueError(f"unknown text variant {name!r}; valid variants: {sorted(VARIANTS)}")
    return TextConfig(**{**VARIANTS[name], **overrides})


class TextEncoder(layers.BertEncoder):
    """``embeddings`` → ``encoder`` → masked mean (:class:`~bioscan_jax.models.layers.BertEncoder`,
    as :class:`~bioscan_jax.models.kmer_bert.KmerBert`). Returns ``(pooled [B, D], aux)``: the
    tower's feature."""

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        *,
        token_type_ids: Array | None = None,
        deterministic: bool | None = None,
    ) -> tuple[Array, dict[str, Any]]:
        _, aux = self.encode(input_ids, attention_mask, token_type_ids=token_type_ids, deterministic=deterministic)
        return aux["pooled"], aux
