"""Layers the references create with torch's ``nn.Linear`` keep its default init:
weight and bias ``U(±1/sqrt(fan_in))`` (clibd dna_encoder.py / language_encoder.py / timm
reset_classifier; BarcodeBERT finetuning.py)."""

from __future__ import annotations

import numpy as np
from flax import nnx

from bioscan_jax.models import kmer_bert, text, towers, vit


def _assert_torch_linear(kernel, bias, fan_in):
    bound = 1.0 / np.sqrt(fan_in)
    for name, w in (("kernel", np.asarray(kernel)), ("bias", np.asarray(bias))):
        assert np.abs(w).max() <= bound, name
        # a uniform sample of this size reaches close to the bound and is not concentrated near 0
        assert np.abs(w).max() > 0.9 * bound, name
        assert abs(np.abs(w).mean() - bound / 2) < 0.15 * bound, name


def test_clibd_projections_use_torch_linear_default():
    cfg = towers.ClibdConfig(
        image=vit.get_variant("Ti/16", image_size=32, hidden_size=48, num_layers=1, num_heads=2, mlp_dim=64),
        dna=kmer_bert.get_variant("tiny", k=4, hidden_size=64, num_layers=1, num_heads=2, intermediate_size=64),
        text=text.get_variant("tiny", vocab_size=30, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
        embed_dim=96)
    model = towers.ClibdModel(cfg, rngs=nnx.Rngs(0))
    for tower, fan_in in ((model.image, 48), (model.dna, 64), (model.text, 32)):
        _assert_torch_linear(tower.projection.kernel[...], tower.projection.bias[...], fan_in)


def test_finetuning_head_uses_torch_linear_default():
    cfg = kmer_bert.get_variant("tiny", k=4, hidden_size=64, num_layers=1, num_heads=2, intermediate_size=64)
    model = kmer_bert.KmerBertClassifier(cfg, 300, rngs=nnx.Rngs(0))
    _assert_torch_linear(model.head.kernel[...], model.head.bias[...], 64)
