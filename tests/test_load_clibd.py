"""A released CLIBD checkpoint (``best.pth``) through :func:`bioscan_jax.convert.clibd.load`.

The checkpoints here are written in exactly the reference layout: a ``SimpleCLIP``-shaped torch
module (bioscan-ml/clibd ``bioscanclip/model/simple_clip.py``) whose ``state_dict()`` is saved as
``scripts/train_cl.py`` does. The image tower is timm's ViT re-implemented below from timm's
``VisionTransformer`` (timm is not installed; the module attribute names give timm's keys) wrapped
as ``image_encoder.py::CLIBDImageEncoder`` (``_LoRA_qkv_timm`` on every block); the DNA and text
towers are transformers' ``BertForMaskedLM`` / ``BertModel`` wrapped as ``CLIBDDNAEncoder`` /
``CLIBDLanguageEncoder`` (``_LoRALayer`` on query and value where the reference adds LoRA). The
reference forwards are those modules' ``forward``s, written out from the reference code.
"""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pandas as pd
import pytest

from bioscan_jax.convert import clibd as clibd_ckpt
from bioscan_jax.convert.hf_bert import ConversionError
from bioscan_jax.data import dna as dna_lib

from test_load_barcodebert import v1_reference_ids  # noqa: E402  (CLIBD's get_sequence_pipeline ids)
from _references import perturb  # noqa: E402

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
nn = torch.nn
F = torch.nn.functional

# Small towers whose head counts are the paper's (ViT-B 12, BarcodeBERT 12, bert-small 8), so the
# file alone sizes them (load(path) without config).
K, EMBED, R = 4, 32, 4
IMG = dict(hidden=48, layers=2, heads=12, mlp=64, patch=8, size=32)
DNA = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=12, intermediate_size=64)
TXT = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=8, intermediate_size=64,
           max_position_embeddings=64)
WORDS = ["diptera", "cecidomyiidae", "not", "_", "classified", "hymenoptera", "aus", "bus", "##ae", "lepidoptera"]
TEXTS = ["Diptera Cecidomyiidae not_classified not_classified", "Hymenoptera Aus bus Aus bus",
         "Lepidoptera " * 12]


# ============================================================================= reference modules


class LoRAQkvTimm(nn.Module):
    """``image_encoder.py::_LoRA_qkv_timm``: the fused qkv Linear plus LoRA on q and v."""

    def __init__(self, qkv: nn.Linear, r: int):
        super().__init__()
        self.qkv = qkv
        d = qkv.in_features
        self.linear_a_q, self.linear_b_q = nn.Linear(d, r, bias=False), nn.Linear(r, d, bias=False)
        self.linear_a_v, self.linear_b_v = nn.Linear(d, r, bias=False), nn.Linear(r, d, bias=False)
        self.dim = d

    def forward(self, x):
        qkv = self.qkv(x)
        qkv[:, :, : self.dim] += self.linear_b_q(self.linear_a_q(x))
        qkv[:, :, -self.dim:] += self.linear_b_v(self.linear_a_v(x))
        return qkv


class TimmAttention(nn.Module):
    """timm ``vision_transformer.py::Attention`` (q_norm/k_norm Identity, fused sdpa)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class TimmMlp(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TimmBlock(nn.Module):
    """timm ``Block``: pre-LN, LayerNorm eps 1e-6, ls1/ls2/drop_path Identity."""

    def __init__(self, d: int, heads: int, mlp: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.attn = TimmAttention(d, heads)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = TimmMlp(d, mlp)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TimmViT(nn.Module):
    """timm ``VisionTransformer`` (``vit_base_patch16_224`` shape): ``forward_features`` (patch
    embed, CLS prepended, ``pos_embed`` added over CLS + patches, blocks, ``norm``) then
    ``forward_head`` (``global_pool='token'``: ``x[:, 0]``, fc_norm Identity, ``head``)."""

    def __init__(self, d, layers, heads, mlp, patch, size, num_classes):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, d, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, (size // patch) ** 2 + 1, d))
        self.blocks = nn.ModuleList(TimmBlock(d, heads, mlp) for _ in range(layers))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, num_classes)  # reset_classifier(num_classes=768)

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


class BertLoRALayer(nn.Module):
    """``dna_encoder.py::_LoRALayer`` / ``language_encoder.py::_LoRALayer``."""

    def __init__(self, w: nn.Linear, r: int):
        super().__init__()
        self.w = w
        self.w_a = nn.Linear(w.in_features, r, bias=False)
        self.w_b = nn.Linear(r, w.out_features, bias=False)

    def forward(self, x):
        return self.w(x) + self.w_b(self.w_a(x))


def _bert_lora(bert_encoder, r):
    """``CLIBDDNAEncoder`` / ``CLIBDLanguageEncoder.__init__`` with ``lora_layer=None``."""
    for layer in bert_encoder.layer:
        layer.attention.self.query = BertLoRALayer(layer.attention.self.query, r)
        layer.attention.self.value = BertLoRALayer(layer.attention.self.value, r)


class ImageEncoder(nn.Module):
    """``CLIBDImageEncoder`` (``lora_vit`` before the naming refactor)."""

    def __init__(self, old_names: bool):
        super().__init__()
        vit = TimmViT(IMG["hidden"], IMG["layers"], IMG["heads"], IMG["mlp"], IMG["patch"], IMG["size"], EMBED)
        for blk in vit.blocks:  # `if lora_layer:` -> every block, even with disable_lora (lora_layer=[])
            blk.attn.qkv = LoRAQkvTimm(blk.attn.qkv, R)
        self.attr = "lora_vit" if old_names else "base_image_encoder"
        setattr(self, self.attr, vit)

    def forward(self, x):
        return getattr(self, self.attr)(x)


class DnaEncoder(nn.Module):
    """``CLIBDDNAEncoder``: BertForMaskedLM, decoder replaced by Linear(hidden, 768)."""

    def __init__(self, old_names: bool, lora: bool):
        super().__init__()
        model = transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=4**K + 3, **DNA))
        if lora:
            _bert_lora(model.bert.encoder, R)
        model.cls.predictions.decoder = nn.Linear(model.cls.predictions.decoder.in_features, EMBED)
        self.attr = "lora_barcode_bert" if old_names else "base_dna_encoder"
        setattr(self, self.attr, model)

    def forward(self, sequence):
        return getattr(self, self.attr)(sequence).logits.softmax(dim=-1).mean(dim=1)


class LanguageEncoder(nn.Module):
    """``CLIBDLanguageEncoder``: BertModel (with its pooler) and ``proj``."""

    def __init__(self, vocab_size: int, old_names: bool, lora: bool):
        super().__init__()
        model = transformers.BertModel(transformers.BertConfig(vocab_size=vocab_size, **TXT))
        if lora:
            _bert_lora(model.encoder, R)
        self.attr = "lora_bert" if old_names else "base_language_encoder"
        setattr(self, self.attr, model)
        self.proj = nn.Linear(model.pooler.dense.out_features, EMBED)

    def forward(self, x):
        return self.proj(getattr(self, self.attr)(**x).last_hidden_state.mean(dim=1))


class SimpleCLIP(nn.Module):
    """``simple_clip.py::SimpleCLIP`` (no open_clip model, no logit bias)."""

    def __init__(self, vocab_size: int, *, old_names: bool, bert_lora: bool):
        super().__init__()
        self.image_encoder = ImageEncoder(old_names)
        self.dna_encoder = DnaEncoder(old_names, bert_lora)
        self.language_encoder = LanguageEncoder(vocab_size, old_names, bert_lora)
        self.logit_scale = nn.Parameter(torch.ones([]) * np.log(1 / 0.07))



def _write(tmp, name, *, old_names, bert_lora, seed):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (tmp / "vocab.txt").write_text("\n".join(vocab) + "\n")
    model = perturb(SimpleCLIP(len(vocab), old_names=old_names, bert_lora=bert_lora), seed)
    sd = model.state_dict()
    # transformers 4.29.2 (clibd's pin) saved BertEmbeddings.position_ids
    dna_root = "dna_encoder." + model.dna_encoder.attr + ".bert.embeddings."
    text_root = "language_encoder." + model.language_encoder.attr + ".embeddings."
    sd[dna_root + "position_ids"] = torch.arange(512)[None]
    sd[text_root + "position_ids"] = torch.arange(TXT["max_position_embeddings"])[None]
    torch.save(sd, tmp / name)
    return types.SimpleNamespace(path=tmp / name, torch=model, sd=sd, vocab=tmp / "vocab.txt")


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """The v1.0 layout (``disable_lora: true``): LoRA in the image tower only."""
    return _write(tmp_path_factory.mktemp("clibd_v1"), "best.pth", old_names=False, bert_lora=False, seed=0)


@pytest.fixture(scope="module")
def old_lora(tmp_path_factory):
    """A checkpoint of the LoRA configs from before the naming refactor: LoRA in every tower."""
    return _write(tmp_path_factory.mktemp("clibd_old"), "best.pth", old_names=True, bert_lora=True, seed=1)


@pytest.fixture(scope="module")
def barcodes(real_barcodes_path):
    seqs = [s.upper() for s in pd.read_csv(real_barcodes_path, sep="\t", dtype=str)["nucleotides"].dropna().head(6)]
    seqs[1] += "NNNN"
    seqs[2] = seqs[2][:400]
    seqs[3] = seqs[3] + "ACGT" * 20  # longer than 660 nt: cut
    return seqs


def _l2(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _check_towers(model, ckpt, barcodes):
    ref = ckpt.torch
    images = np.random.default_rng(0).random((3, IMG["size"], IMG["size"], 3)).astype(np.float32)
    tok = transformers.BertTokenizerFast(str(ckpt.vocab), do_lower_case=True)
    x = tok(TEXTS, padding="max_length", max_length=20, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref_image = ref.image_encoder(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
        ref_dna = ref.dna_encoder(torch.tensor([[0, *v1_reference_ids(s, K)] for s in barcodes])).numpy()
        ref_text = ref.language_encoder(dict(x)).numpy()
    ids, mask = dna_lib.KmerTokenizer(K)(barcodes)
    batch = {"image": images, "dna_ids": ids, "dna_attention_mask": mask,
             "text_ids": x["input_ids"].numpy(), "text_attention_mask": x["attention_mask"].numpy().astype(bool)}
    ours, _ = model(batch, deterministic=True)
    np.testing.assert_allclose(np.asarray(ours["image"]), _l2(ref_image), atol=1e-4)
    np.testing.assert_allclose(np.asarray(ours["dna"]), _l2(ref_dna), atol=1e-4)
    np.testing.assert_allclose(np.asarray(ours["text"]), _l2(ref_text), atol=1e-4)
    np.testing.assert_allclose(float(model.log_scale[...]), float(ref.logit_scale.detach()), rtol=1e-6)


# ============================================================================= tests


def test_released_layout_loads_all_three_towers(released, barcodes):
    sd = released.sd
    for key in ("image_encoder.base_image_encoder.blocks.0.attn.qkv.qkv.weight",  # the reference's key names
                "image_encoder.base_image_encoder.blocks.1.attn.qkv.linear_b_v.weight",
                "image_encoder.base_image_encoder.head.weight",
                "dna_encoder.base_dna_encoder.bert.encoder.layer.0.attention.self.query.weight",
                "dna_encoder.base_dna_encoder.cls.predictions.decoder.weight",
                "language_encoder.base_language_encoder.encoder.layer.1.attention.self.value.weight",
                "language_encoder.proj.weight", "logit_scale"):
        assert key in sd, key
    lora = sd["image_encoder.base_image_encoder.blocks.0.attn.qkv.linear_b_q.weight"] @ \
        sd["image_encoder.base_image_encoder.blocks.0.attn.qkv.linear_a_q.weight"]
    assert float(lora.abs().max()) > 0.05  # the merge matters

    model, report = clibd_ckpt.load_with_report(released.path)
    c = model.config
    assert c.tower_mode == "reference" and c.embed_dim == EMBED and c.modalities == ("image", "dna", "text")
    assert (c.image.hidden_size, c.image.num_layers, c.image.patch_size, c.image.image_size, c.image.mlp_dim,
            c.image.num_heads, c.image.layer_norm_eps) == (48, 2, 8, 32, 64, 12, 1e-6)
    assert (c.dna.k, c.dna.vocab_size, c.dna.num_layers, c.dna.num_heads) == (K, 4**K + 3, 2, 12)
    assert (c.text.vocab_size, c.text.max_position_embeddings, c.text.num_heads) == (5 + len(WORDS), 64, 8)
    assert len(report["lora_merged"]) == IMG["layers"]
    assert sorted(report["ignored"]) == [
        "dna_encoder.base_dna_encoder.bert.embeddings.position_ids",
        "dna_encoder.base_dna_encoder.cls.predictions.bias",
        "language_encoder.base_language_encoder.embeddings.position_ids",
        "language_encoder.base_language_encoder.pooler.dense.bias",
        "language_encoder.base_language_encoder.pooler.dense.weight"]
    _check_towers(model, released, barcodes)


def test_old_key_names_and_lora_in_every_tower(old_lora, barcodes):
    assert "dna_encoder.lora_barcode_bert.bert.encoder.layer.0.attention.self.query.w_a.weight" in old_lora.sd
    assert "image_encoder.lora_vit.blocks.0.attn.qkv.linear_a_v.weight" in old_lora.sd
    assert "language_encoder.lora_bert.encoder.layer.1.attention.self.value.w.bias" in old_lora.sd
    model, report = clibd_ckpt.load_with_report(old_lora.path)
    assert len(report["lora_merged"]) == IMG["layers"] + 2 * DNA["num_hidden_layers"] + 2 * TXT["num_hidden_layers"]
    _check_towers(model, old_lora, barcodes)


def test_renames_are_clibds_substring_replacements():
    old = {"image_encoder.lora_vit.blocks.0.norm1.weight": 1, "dna_encoder.lora_barcode_bert.bert.x": 2,
           "language_encoder.lora_bert.encoder.y": 3, "language_encoder.proj.weight": 4, "logit_scale": 5}
    assert clibd_ckpt.rename_keys(old) == {
        "image_encoder.base_image_encoder.blocks.0.norm1.weight": 1, "dna_encoder.base_dna_encoder.bert.x": 2,
        "language_encoder.base_language_encoder.encoder.y": 3, "language_encoder.proj.weight": 4, "logit_scale": 5}
    with pytest.raises(ConversionError, match="both become 'dna_encoder.base_dna_encoder.bert.x'"):
        clibd_ckpt.rename_keys({"dna_encoder.lora_barcode_bert.bert.x": 1, "dna_encoder.base_dna_encoder.bert.x": 2})


def test_lora_merge_adds_b_at_a_to_q_and_v_rows_only():
    rng = np.random.default_rng(0)
    d, r = 6, 2
    w = rng.normal(size=(3 * d, d)).astype(np.float32)
    parts = {f"linear_{ab}_{qv}": rng.normal(size=(r, d) if ab == "a" else (d, r)).astype(np.float32)
             for qv in "qv" for ab in "ab"}
    sd = {"b.attn.qkv.qkv.weight": w, "b.attn.qkv.qkv.bias": np.ones(3 * d, np.float32),
          **{f"b.attn.qkv.{n}.weight": v for n, v in parts.items()}}
    out, merged = clibd_ckpt.merge_lora(sd)
    assert merged == ["b.attn.qkv"] and sorted(out) == ["b.attn.qkv.bias", "b.attn.qkv.weight"]
    m = out["b.attn.qkv.weight"]
    np.testing.assert_allclose(m[:d], w[:d] + parts["linear_b_q"] @ parts["linear_a_q"], rtol=1e-6)
    np.testing.assert_array_equal(m[d:2 * d], w[d:2 * d])
    np.testing.assert_allclose(m[2 * d:], w[2 * d:] + parts["linear_b_v"] @ parts["linear_a_v"], rtol=1e-6)
    del sd["b.attn.qkv.linear_b_v.weight"]
    with pytest.raises(ConversionError, match=r"LoRA tensors missing: \['b.attn.qkv.linear_b_v.weight'\]"):
        clibd_ckpt.merge_lora(sd)


def test_shape_mismatch_names_the_tensor_and_both_shapes(released, tmp_path):
    sd = dict(released.sd)
    key = "image_encoder.base_image_encoder.blocks.1.mlp.fc1.weight"
    sd[key] = torch.zeros(80, IMG["hidden"])
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ConversionError, match=r"blocks\.1\.mlp\.fc1\.weight: checkpoint shape \(80, 48\) != "
                                              r"model shape \(64, 48\)"):
        clibd_ckpt.load(tmp_path / "bad.pth")
    # towers sized by a config that does not describe the file
    cfg = clibd_ckpt.config_from_tensors(clibd_ckpt.merge_lora(clibd_ckpt.read(released.path))[0])
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, intermediate_size=96))
    with pytest.raises(ConversionError, match=r"layer\.0\.intermediate\.dense\.weight: checkpoint shape \(64, 48\) "
                                              r"!= model shape \(96, 48\).*sized by the given config"):
        clibd_ckpt.load(released.path, cfg)


def test_unknown_layouts_and_leftover_tensors_name_the_keys(released, tmp_path):
    torch.save({"state_dict": {"a.b": torch.zeros(2)}, "epoch": 3}, tmp_path / "wrapped.pth")
    with pytest.raises(ConversionError, match=r"not a CLIBD checkpoint.*keys found: \['epoch', 'state_dict'\]"):
        clibd_ckpt.load(tmp_path / "wrapped.pth")
    torch.save({"open_clip_model.visual.proj": torch.zeros(2), "logit_scale": torch.tensor(1.0)}, tmp_path / "oc.pth")
    with pytest.raises(ConversionError, match=r"keys found: \['logit_scale', 'open_clip_model.visual.proj'\]"):
        clibd_ckpt.load(tmp_path / "oc.pth")
    torch.save({"image_encoder.mlp.0.weight": torch.zeros(4, 4), "logit_scale": torch.tensor(1.0)},
               tmp_path / "mlp.pth")  # simple_clip.py's MLPEncoder image tower
    with pytest.raises(ConversionError, match=r"image_encoder\.mlp\.0\.weight"):
        clibd_ckpt.load(tmp_path / "mlp.pth")
    sd = dict(released.sd)
    sd["dna_encoder.base_dna_encoder.bert.extra.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "extra.pth")
    with pytest.raises(ConversionError, match=r"tensors no tower consumes \(1\): "
                                              r"\['dna_encoder.base_dna_encoder.bert.extra.weight'\]"):
        clibd_ckpt.load(tmp_path / "extra.pth")


def test_load_towers_takes_a_best_pth_with_or_without_a_task_config(released):
    from bioscan_jax.tasks.clibd import training as clibd_train
    from configs import clibd as clibd_config
    from flax import nnx

    direct = nnx.state(clibd_ckpt.load(released.path), nnx.Param).to_pure_dict()
    c = clibd_config.get_config("tiny")  # a task config describing the file's towers
    c.model.embed_dim = EMBED
    c.data.image_size = IMG["size"]
    c.model.image = dict(variant="B/16", overrides=dict(patch_size=8, hidden_size=48, num_layers=2, num_heads=12,
                                                        mlp_dim=64, layer_norm_eps=1e-6))
    c.model.dna = dict(variant="tiny", overrides=dict(k=K, hidden_size=48, num_layers=2, num_heads=12,
                                                      intermediate_size=64, vocab_size=4**K + 3))
    c.model.text = dict(variant="bert-small", max_length=20, tokenizer="", overrides=dict(
        vocab_size=5 + len(WORDS), hidden_size=48, num_layers=2, num_heads=8, intermediate_size=64,
        max_position_embeddings=64))
    for model in (clibd_train.load_towers(str(released.path)), clibd_train.load_towers(str(released.path), c)):
        assert model.config.tower_mode == "reference"
        got = nnx.state(model, nnx.Param).to_pure_dict()
        for a, b in zip(jax_leaves(direct), jax_leaves(got)):
            np.testing.assert_array_equal(a, b)


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_paper_towers_are_those_of_configs_clibd_paper():
    from bioscan_jax.tasks.clibd import training as clibd_train
    from configs import clibd as clibd_config

    import dataclasses

    def architecture(cfg):  # remat and scan_layers say how the step runs, not what the towers are
        plain = {m: dataclasses.replace(getattr(cfg, m), remat=False, scan_layers=False) for m in ("image", "dna", "text")}
        return dataclasses.replace(cfg, **plain)

    paper = clibd_train.model_config(clibd_config.get_config("paper"))
    assert all(getattr(paper, m).remat and getattr(paper, m).scan_layers for m in ("image", "dna", "text"))
    assert architecture(clibd_ckpt.paper_config()) == architecture(paper)


def test_embed_images_with_a_released_checkpoint(released, tmp_path):
    """``bioscan-jax embed --images``: every image gets a row and a status; a good image's row is
    the image tower's feature of CLIBD's evaluation view; unreadable ones are NaN, not dropped."""
    import io

    from PIL import Image

    from bioscan_jax import cli
    from bioscan_jax.convert import clibd as clibd_checkpoint
    from bioscan_jax.data import images as images_lib

    folder = tmp_path / "specimens"
    (folder / "plate1").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a", "b", "plate1/c"):
        buf = io.BytesIO()
        Image.fromarray((rng.random((40, 52, 3)) * 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        (folder / f"{name}.jpg").write_bytes(buf.getvalue())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    out = tmp_path / "images.npz"
    assert cli.main(["embed", "--images", "--quiet", "--model", str(released.path), "--input", str(folder),
                     "--out", str(out)]) == 0
    got = np.load(out)
    assert got["ids"].tolist() == ["a", "b", "broken", "plate1/c"]
    assert got["status"].tolist() == ["ok", "ok", "cannot decode image", "ok"]
    assert np.isnan(got["embeddings"][2]).all()
    model = clibd_checkpoint.load(released.path)
    size = model.config.image.image_size
    views = np.stack([images_lib.eval_image((folder / f"{n}.jpg").read_bytes(), resize=round(size * 256 / 224),
                                            crop=size) for n in ("a", "b", "plate1/c")])
    want, _ = model.embed("image", {"image": views}, deterministic=True)
    np.testing.assert_allclose(got["embeddings"][[0, 1, 3]], np.asarray(want), rtol=1e-5, atol=1e-5)

    listing = tmp_path / "list.csv"
    listing.write_text("id,path\nx,specimens/a.jpg\ny,specimens/missing.jpg\n")
    assert cli.main(["embed", "--images", "--quiet", "--model", str(released.path), "--input", str(listing),
                     "--out", str(tmp_path / "list.npz")]) == 0
    listed = np.load(tmp_path / "list.npz")
    assert listed["status"].tolist() == ["ok", "no such file"]
    np.testing.assert_allclose(listed["embeddings"][0], got["embeddings"][0], rtol=1e-5, atol=1e-5)
    assert cli.main(["embed", "--images", "--model", "kmer:4", "--input", str(folder), "--out", str(out)]) == 1


def test_identify_images_with_a_released_checkpoint_equals_the_reference_towers_search(released, barcodes, tmp_path):
    """``identify --images`` with a released ``best.pth`` against a DNA library predicts what a
    nearest-neighbour search gives on the reference PyTorch towers' embeddings (image tower on
    CLIBD's evaluation view, DNA tower on CLIBD's v1 ids with the 0 prepended)."""
    import io

    from PIL import Image

    from bioscan_jax import cli
    from bioscan_jax.data import images as images_lib

    ranks = ("order", "family", "genus", "species")
    library = tmp_path / "library.fasta"
    library.write_text("".join(
        f">ref{i}|order=O{i % 2}|family=F{i % 3}|genus=G{i}|species=G{i} sp{i}\n{s}\n" for i, s in enumerate(barcodes)))
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(5):
        buf = io.BytesIO()
        Image.fromarray((rng.random((44, 50, 3)) * 255).astype(np.uint8)).save(buf, "JPEG", quality=92)
        (folder / f"p{i}.jpg").write_bytes(buf.getvalue())
    out = tmp_path / "pred.tsv"
    assert cli.main(["identify", "--images", "--quiet", "--model", str(released.path), "--reference", str(library),
                     "--min-length", "0", "--input", str(folder), "--out", str(out)]) == 0
    pred = pd.read_csv(out, sep="\t", dtype=str, keep_default_na=False).set_index("id")

    ref = released.torch
    size = IMG["size"]
    views = np.stack([images_lib.eval_image((folder / f"p{i}.jpg").read_bytes(), resize=round(size * 256 / 224),
                                            crop=size) for i in range(5)])
    with torch.no_grad():
        img = _l2(ref.image_encoder(torch.from_numpy(views.transpose(0, 3, 1, 2))).numpy())
        dna = _l2(ref.dna_encoder(torch.tensor([[0, *v1_reference_ids(s[:660], K)] for s in barcodes])).numpy())
    nearest = np.argmax(img @ dna.T, axis=1)
    for i, j in enumerate(nearest):
        row = pred.loc[f"p{i}"]
        assert row["status"] == "ok" and row["nearest_id"] == f"ref{j}"
        assert [row[r] for r in ranks] == [f"O{j % 2}", f"F{j % 3}", f"G{j}", f"G{j} sp{j}"]
