"""Numerical parity with the HF/PyTorch reference models (needs the ``torch`` extra).

Same weights (copied with our converters) → same outputs within 1e-4 in float32.
"""

import dataclasses

import numpy as np
import pytest

pytestmark = pytest.mark.torch

torch = pytest.importorskip("torch", reason="parity tests need torch (pip install 'bioscan-jax[torch]')")
transformers = pytest.importorskip(
    "transformers", reason="parity tests need transformers (pip install 'bioscan-jax[torch]')")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from bioscan_jax.convert import hf_bert, hf_vit  # noqa: E402
from bioscan_jax.models import kmer_bert as kb  # noqa: E402
from bioscan_jax.models import text, vit  # noqa: E402

ATOL = 1e-4


def _hf_bert_config(k=4, hidden=64, layers=2, heads=4, inter=128, **kw):
    return transformers.BertConfig(
        vocab_size=4**k + 2, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=inter, num_labels=4**k, pad_token_id=0, **kw)


def _our_bert_config(k=4, hidden=64, layers=2, heads=4, inter=128):
    return kb.KmerBertConfig(k=k, hidden_size=hidden, num_layers=layers, num_heads=heads, intermediate_size=inter)


def _tokens(k=4, batch=3, t=40, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, 4**k + 2, (batch, t))
    lengths = np.array([t, t * 2 // 3, 5])[:batch]
    mask = np.arange(t)[None] < lengths[:, None]
    ids[0, ::7] = 0  # [MASK] tokens
    ids[1, 3] = 1  # [UNK]
    ids = np.where(mask, ids, 0)
    return ids, mask


def _hf_bert_outputs(hf, ids, mask):
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)),
                  output_hidden_states=True)


def _mlm_pair(seed=0, **kw):
    torch.manual_seed(seed)
    hf = transformers.BertForTokenClassification(_hf_bert_config(**kw)).eval()
    ours = kb.KmerBertForMLM(_our_bert_config(**kw), rngs=nnx.Rngs(seed))
    return hf, ours


@nnx.jit
def _fwd(model, *args):
    return model(*args, deterministic=True)


def test_bert_token_classification_parity():
    hf, ours = _mlm_pair()
    report = hf_bert.load_hf_bert(ours, hf.state_dict())
    assert not report["unexpected"]
    np.testing.assert_array_equal(ours.bert.embeddings.word.embedding[...][0], 0.0)  # HF padding row
    ids, mask = _tokens()
    ref = _hf_bert_outputs(hf, ids, mask)
    logits, aux = _fwd(ours, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(logits), ref.logits.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(aux["hidden"]), ref.hidden_states[-1].numpy(), atol=ATOL, rtol=0)


def test_bert_model_parity_pooled_and_export():
    torch.manual_seed(1)
    hf = transformers.BertModel(_hf_bert_config()).eval()
    ours = kb.KmerBert(_our_bert_config(), rngs=nnx.Rngs(0))
    report = hf_bert.load_hf_bert(ours, hf.state_dict())
    assert any("pooler" in k for k in report["ignored"])
    ids, mask = _tokens(seed=1)
    with torch.no_grad():
        last = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64))).last_hidden_state
    m = torch.tensor(mask, dtype=torch.float32)[..., None]
    ref_pooled = ((last * m).sum(1) / m.sum(1)).numpy()
    hidden, aux = _fwd(ours, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(hidden), last.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(aux["pooled"]), ref_pooled, atol=ATOL, rtol=0)
    # export back: identical tensors (BertModel keys, pooler aside)
    exported = hf_bert.export_hf_bert(ours)
    sd = {k: v.numpy() for k, v in hf.state_dict().items() if not k.startswith("pooler.")}
    sd = {k: v for k, v in sd.items() if not k.endswith(("position_ids", "token_type_ids"))}
    assert set(exported) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(exported[k], sd[k], err_msg=k)


def test_bert_realistic_size_parity():
    """BarcodeBERT 4-4-4 shape (hidden 768, 4 layers) on full-length k=4 inputs."""
    kw = dict(k=4, hidden=768, layers=4, heads=4, inter=3072)
    hf, ours = _mlm_pair(seed=2, **kw)
    hf_bert.load_hf_bert(ours, hf.state_dict())
    ids, mask = _tokens(k=4, batch=2, t=165, seed=2)
    ref = _hf_bert_outputs(hf, ids, mask)
    logits, aux = _fwd(ours, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(logits), ref.logits.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(aux["hidden"]), ref.hidden_states[-1].numpy(), atol=ATOL, rtol=0)


def test_padding_row_gets_no_gradient_in_both():
    """HF's nn.Embedding(padding_idx=0) and ours agree: no gradient reaches the [MASK] row."""
    hf, ours = _mlm_pair(seed=3)
    hf_bert.load_hf_bert(ours, hf.state_dict())
    ids, mask = _tokens(seed=3)
    hf.train(False)
    out = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)))
    (out.logits**2).mean().backward()
    g_ref = hf.bert.embeddings.word_embeddings.weight.grad.numpy()

    def loss(m):
        return jnp.mean(m(jnp.asarray(ids), jnp.asarray(mask), deterministic=True)[0] ** 2)

    g = np.asarray(nnx.jit(nnx.grad(loss))(ours)["bert"]["embeddings"]["word"]["embedding"][...])
    np.testing.assert_array_equal(g_ref[0], 0.0)
    np.testing.assert_array_equal(g[0], 0.0)
    np.testing.assert_allclose(g, g_ref, atol=1e-6)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_bert_checkpoint_file_round_trip(tmp_path, fmt):
    hf, ours = _mlm_pair(seed=4)
    if fmt == "safetensors":
        hf.save_pretrained(tmp_path)
        path = tmp_path / "model.safetensors"
    else:  # transformers >= 5 always writes safetensors; write the legacy file directly
        path = tmp_path / "pytorch_model.bin"
        torch.save(hf.state_dict(), path)
    assert path.exists()
    hf_bert.load_hf_bert(ours, tmp_path)  # directory
    ours2 = kb.KmerBertForMLM(_our_bert_config(), rngs=nnx.Rngs(9))
    hf_bert.load_hf_bert(ours2, path)  # file
    ids, mask = _tokens(seed=4)
    ref = _hf_bert_outputs(hf, ids, mask).logits.numpy()
    for m in (ours, ours2):
        np.testing.assert_allclose(np.asarray(_fwd(m, jnp.asarray(ids), jnp.asarray(mask))[0]), ref, atol=ATOL, rtol=0)
    exported = hf_bert.export_hf_bert(ours)
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    assert set(exported) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(exported[k], sd[k], err_msg=k)
    # and back into torch
    hf2 = transformers.BertForTokenClassification(_hf_bert_config()).eval()
    hf2.load_state_dict(hf_bert.to_torch_state_dict(exported), strict=True)
    np.testing.assert_allclose(_hf_bert_outputs(hf2, ids, mask).logits.numpy(), ref, atol=1e-6)


def test_barcodebert_style_prefixes_and_errors():
    hf, ours = _mlm_pair(seed=5)
    sd = hf.state_dict()
    wrapped = {"model": {"module." + k: v for k, v in sd.items()}, "epoch": 3}
    hf_bert.load_hf_bert(ours, wrapped)
    np.testing.assert_array_equal(np.asarray(ours.classifier.kernel[...]), sd["classifier.weight"].numpy().T)
    # the encoder alone: the MLM head is skipped and reported
    enc = kb.KmerBert(_our_bert_config(), rngs=nnx.Rngs(0))
    report = hf_bert.load_hf_bert(enc, wrapped)
    assert "module.classifier.weight" in report["ignored"] and not report["unexpected"]
    # a classifier with a different label count keeps its fresh head but loads the encoder
    clf = kb.KmerBertClassifier(_our_bert_config(), 5, rngs=nnx.Rngs(0))
    report = hf_bert.load_hf_bert(clf, sd, strict=False)
    assert "classifier.weight" in report["unexpected"]
    with pytest.raises(hf_bert.ConversionError, match="unexpected keys.*classifier.weight"):
        hf_bert.load_hf_bert(clf, sd)
    # missing and unexpected keys are listed
    broken = {k: v for k, v in sd.items() if "layer.1.output.dense" not in k}
    broken["bert.extra.weight"] = torch.zeros(3)
    with pytest.raises(hf_bert.ConversionError) as err:
        hf_bert.load_hf_bert(ours, broken)
    msg = str(err.value)
    assert "bert.encoder.layer.1.output.dense.weight" in msg and "bert.extra.weight" in msg
    # wrong shapes name the key
    small = kb.KmerBertForMLM(_our_bert_config(hidden=32, inter=64), rngs=nnx.Rngs(0))
    with pytest.raises(hf_bert.ConversionError, match="word_embeddings.*shape"):
        hf_bert.load_hf_bert(small, sd)


def test_text_tower_bert_small_layout():
    cfg = transformers.BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128)
    torch.manual_seed(6)
    hf = transformers.BertModel(cfg).eval()
    with torch.no_grad():  # a pretrained [PAD] row need not be zero: the forward must still read it
        hf.embeddings.word_embeddings.weight[0] = 0.5
    ours = text.TextEncoder(text.get_variant("tiny", vocab_size=500, hidden_size=64, intermediate_size=128,
                                             num_heads=4), rngs=nnx.Rngs(0))
    hf_bert.load_hf_bert(ours, hf.state_dict())
    ids = np.random.default_rng(6).integers(1, 500, (2, 20))
    mask = np.arange(20)[None] < np.array([[20], [9]])
    ids = np.where(mask, ids, 0)
    with torch.no_grad():
        last = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64))).last_hidden_state
    m = torch.tensor(mask, dtype=torch.float32)[..., None]
    pooled, aux = _fwd(ours, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(aux["hidden"]), last.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(pooled), ((last * m).sum(1) / m.sum(1)).numpy(), atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------- ViT


def _vit_pair(seed=0, **kw):
    hcfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=128, **kw)
    torch.manual_seed(seed)
    hf = transformers.ViTModel(hcfg).eval()
    ours = vit.ViT(vit.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_layers=2, num_heads=4,
                                 mlp_dim=128), rngs=nnx.Rngs(seed))
    return hf, ours


def _images(seed=0, n=2, size=32):
    return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def test_vit_parity():
    hf, ours = _vit_pair()
    report = hf_vit.load_hf_vit(ours, hf.state_dict())  # in-memory (transformers >= 5) layout
    assert not report["unexpected"]
    x = _images()
    with torch.no_grad():
        ref = hf(pixel_values=torch.tensor(x.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
    feat, aux = _fwd(ours, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(aux["hidden"]), ref, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(feat), ref[:, 0], atol=ATOL, rtol=0)


def test_vit_file_round_trip_and_timm_mapping(tmp_path):
    hf, ours = _vit_pair(seed=1)
    hf.save_pretrained(tmp_path)  # hub layout on disk
    hf_vit.load_hf_vit(ours, tmp_path)
    x = _images(seed=1)
    with torch.no_grad():
        ref = hf(pixel_values=torch.tensor(x.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
    feat, _ = _fwd(ours, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(feat), ref[:, 0], atol=ATOL, rtol=0)
    # export (hub layout) loads into a fresh HF model
    hf2 = transformers.ViTModel(hf.config, add_pooling_layer=False).eval()
    exported = hf_vit.export_hf_vit(ours)
    hf2_sd = hf_vit.hf_canonical({k: v for k, v in hf2.state_dict().items()})
    assert set(exported) == set(hf2_sd)
    torch_path = tmp_path / "export" / "pytorch_model.bin"
    torch_path.parent.mkdir()
    torch.save(hf_bert.to_torch_state_dict(exported), torch_path)
    ours_bin = vit.ViT(ours.config, rngs=nnx.Rngs(5))
    hf_vit.load_hf_vit(ours_bin, torch_path)
    np.testing.assert_array_equal(np.asarray(_fwd(ours_bin, jnp.asarray(x))[0]), np.asarray(feat))
    # timm layout: export → convert back → same outputs; fused qkv is [q; k; v] rows
    timm_sd = hf_vit.export_timm_vit(ours)
    d = ours.config.hidden_size
    np.testing.assert_array_equal(timm_sd["blocks.0.attn.qkv.weight"][d:2 * d],
                                  exported["encoder.layer.0.attention.attention.key.weight"])
    np.testing.assert_array_equal(timm_sd["patch_embed.proj.weight"],
                                  exported["embeddings.patch_embeddings.projection.weight"])
    fresh = vit.ViT(ours.config, rngs=nnx.Rngs(7))
    hf_vit.load_timm_vit(fresh, {"state_dict": timm_sd})
    np.testing.assert_array_equal(np.asarray(_fwd(fresh, jnp.asarray(x))[0]), np.asarray(feat))


def test_vit_image_classification_head():
    hcfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=128, num_labels=7)
    torch.manual_seed(4)
    hf = transformers.ViTForImageClassification(hcfg).eval()
    ours = vit.ViT(vit.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_layers=2, num_heads=4,
                                 mlp_dim=128, num_classes=7), rngs=nnx.Rngs(0))
    assert not hf_vit.load_hf_vit(ours, hf.state_dict())["unexpected"]
    x = _images(seed=4)
    with torch.no_grad():
        ref = hf(pixel_values=torch.tensor(x.transpose(0, 3, 1, 2))).logits.numpy()
    np.testing.assert_allclose(np.asarray(_fwd(ours, jnp.asarray(x))[0]), ref, atol=ATOL, rtol=0)
    exported = hf_vit.export_hf_vit(ours, prefix="vit.")
    assert "classifier.weight" in exported and "vit.layernorm.weight" in exported
    headless = vit.ViT(dataclasses.replace(ours.config, num_classes=0), rngs=nnx.Rngs(1))
    assert set(hf_vit.load_hf_vit(headless, exported)["ignored"]) == {"classifier.weight", "classifier.bias"}


def test_vit_posemb_resampled_on_load():
    hf, _ = _vit_pair(seed=2)
    bigger = vit.ViT(vit.ViTConfig(image_size=48, patch_size=8, hidden_size=64, num_layers=2, num_heads=4,
                                   mlp_dim=128), rngs=nnx.Rngs(0))
    hf_vit.load_hf_vit(bigger, hf.state_dict())
    assert bigger.pos_embedding[...].shape == (1, 1 + 36, 64)
    np.testing.assert_allclose(np.asarray(bigger.pos_embedding[...][0, 0]),
                               hf.embeddings.position_embeddings[0, 0].detach().numpy(), atol=0)
    feat, _ = _fwd(bigger, jnp.asarray(_images(size=48)))
    assert feat.shape == (2, 64) and np.all(np.isfinite(np.asarray(feat)))
    with pytest.raises(hf_bert.ConversionError, match="resample=False"):
        hf_vit.load_hf_vit(bigger, hf.state_dict(), resample=False)


def test_timm_vit_parity():
    """A real timm VisionTransformer (when timm is installed) → load_timm_vit → same features."""
    timm = pytest.importorskip("timm", reason="timm not installed; the timm key mapping is covered above")
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(3)
    ref = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0,
                            num_classes=10).eval()
    cfg = vit.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_layers=2, num_heads=4, mlp_dim=128,
                        num_classes=10, layer_norm_eps=1e-6)
    ours = vit.ViT(cfg, rngs=nnx.Rngs(0))
    report = hf_vit.load_timm_vit(ours, ref.state_dict())
    assert not report["unexpected"], report["unexpected"]
    x = _images(seed=3)
    with torch.no_grad():
        tx = torch.tensor(x.transpose(0, 3, 1, 2))
        feats = ref.forward_features(tx).numpy()
        logits = ref(tx).numpy()
    out, aux = _fwd(ours, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(aux["hidden"]), feats, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(out), logits, atol=ATOL, rtol=0)
    exported = hf_vit.export_timm_vit(ours)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    assert set(exported) == set(sd), set(exported) ^ set(sd)
    # a feature tower without a head takes the same checkpoint; the head is reported as skipped
    tower = vit.ViT(dataclasses.replace(cfg, num_classes=0), rngs=nnx.Rngs(1))
    report = hf_vit.load_timm_vit(tower, ref.state_dict())
    assert set(report["ignored"]) == {"head.weight", "head.bias"}
    np.testing.assert_allclose(np.asarray(_fwd(tower, jnp.asarray(x))[0]), feats[:, 0], atol=ATOL, rtol=0)
    assert timm.__version__
