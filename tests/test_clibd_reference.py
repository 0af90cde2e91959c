"""CLIBD's reference towers from pretrained checkpoints written in the upstream formats.

The PyTorch side renders bioscan-ml/clibd's towers with transformers (``bioscanclip/model/
dna_encoder.py::CLIBDDNAEncoder``, ``language_encoder.py::CLIBDLanguageEncoder``,
``image_encoder.py::CLIBDImageEncoder`` on a timm-layout ViT, here HF ``ViTModel`` with timm's
LayerNorm eps 1e-6, the same network); ours load the files through the ``config.model.<m>.init``
paths of the CLIBD task and run in ``tower_mode='reference'``.
"""

from __future__ import annotations

import itertools
import types

import numpy as np
import pandas as pd
import pytest
from flax import nnx

from bioscan_jax.convert import hf_vit
from bioscan_jax.data import dna as dna_lib
from bioscan_jax.data import text as text_lib
from bioscan_jax.models import towers, vit
from bioscan_jax.tasks.clibd import training as clibd_train
from configs import clibd as clibd_config

from _references import perturb  # noqa: E402

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

K, HIDDEN, EMBED = 4, 48, 32
WORDS = ["diptera", "cecidomyiidae", "not_classified", "hymenoptera", "aus", "bus", "##ae", "##s", "lepidoptera"]



@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A v1 BarcodeBERT .pth, an HF text-BERT directory with vocab.txt, a timm-layout ViT."""
    tmp = tmp_path_factory.mktemp("clibd_ref")
    bert_cfg = dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=12, intermediate_size=64)
    dna = perturb(transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=4**K + 3, **bert_cfg)), 0)
    torch.save({"module." + k: v for k, v in dna.state_dict().items()}, tmp / "model_41.pth")

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (tmp / "bert").mkdir()
    (tmp / "bert" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    text = perturb(transformers.BertModel(transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64)), 1)
    text.save_pretrained(tmp / "bert")

    image = perturb(transformers.ViTModel(transformers.ViTConfig(
        hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
        patch_size=16, layer_norm_eps=1e-6), add_pooling_layer=False), 2)
    ours = vit.ViT(vit.get_variant("Ti/16", hidden_size=HIDDEN, num_layers=2, num_heads=4, mlp_dim=64,
                                   image_size=32, layer_norm_eps=1e-6), rngs=nnx.Rngs(0))
    hf_vit.load_hf_vit(ours, {k: v.numpy() for k, v in image.state_dict().items()}, strict=False)
    from safetensors.numpy import save_file

    save_file(hf_vit.export_timm_vit(ours), str(tmp / "vit_timm.safetensors"))
    return types.SimpleNamespace(dir=tmp, dna=dna, text=text, image=image)


def _config(files):
    c = clibd_config.get_config("tiny")
    c.model.tower_mode = "reference"
    c.model.embed_dim = EMBED
    c.model.dna = dict(variant="tiny", init=str(files.dir / "model_41.pth"),
                       overrides=dict(k=K, hidden_size=HIDDEN, num_layers=2, num_heads=12, intermediate_size=64,
                                      vocab_size=4**K + 3))
    c.model.text = dict(variant="tiny", max_length=20, tokenizer=str(files.dir / "bert"), init=str(files.dir / "bert"),
                        overrides=dict(hidden_size=HIDDEN, num_layers=2, num_heads=4, intermediate_size=64))
    c.model.image = dict(variant="Ti/16", init=str(files.dir / "vit_timm.safetensors"), init_format="timm",
                         overrides=dict(patch_size=16, hidden_size=HIDDEN, num_layers=2, num_heads=4, mlp_dim=64,
                                        layer_norm_eps=1e-6))
    c.data.image_size = 32
    return c


def _model(config):
    vocab = clibd_train.wordpiece_vocab(config)
    mcfg = clibd_train.model_config(config, text_vocab_size=len(vocab))
    setup = types.SimpleNamespace(model_config=mcfg)
    pretrained = clibd_train.pretrained_encoders(config, setup, workdir="")
    model = clibd_train.build_model(setup, pretrained, nnx.Rngs(0))
    model.eval()
    return model, vocab


def _l2(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_dna_tower_matches_clibd_dna_encoder(files, real_barcodes_path):
    model, _ = _model(_config(files))
    decoder = torch.nn.Linear(HIDDEN, EMBED)  # CLIBD replaces the MLM decoder with a new Linear
    perturb(decoder, 3)
    files.dna.cls.predictions.decoder = decoder
    tower = model.dna
    tower.projection.kernel[...] = decoder.weight.detach().numpy().T
    tower.projection.bias[...] = decoder.bias.detach().numpy()

    seqs = [s.upper() for s in pd.read_csv(real_barcodes_path, sep="\t", dtype=str)["nucleotides"].head(8)]
    seqs[1] += "NNNN"
    seqs[2] = seqs[2][:400]
    vocab = {"".join(p): 3 + i for i, p in enumerate(itertools.product("ACGT", repeat=K))}

    def pipeline(x):  # get_sequence_pipeline: [0, *vocab(tokenizer(pad(x)))], PadSequence(660)
        x = x[:660] + "N" * (660 - len(x[:660]))
        return [0, *(vocab.get(x[i:i + K], 2) for i in range(0, 660 - K + 1, K))]

    with torch.no_grad():
        ref = files.dna(torch.tensor([pipeline(s) for s in seqs])).logits.softmax(dim=-1).mean(dim=1).numpy()
    ids, mask = dna_lib.KmerTokenizer(K)(seqs)  # the CLIBD task's tokenizer: no stripping
    ours, _ = model.embed("dna", {"dna_ids": ids, "dna_attention_mask": mask}, deterministic=True)
    np.testing.assert_allclose(np.asarray(ours), _l2(ref), atol=1e-4)


def test_text_tower_matches_clibd_language_encoder(files):
    model, vocab = _model(_config(files))
    proj = perturb(torch.nn.Linear(HIDDEN, EMBED), 4)
    model.text.projection.kernel[...] = proj.weight.detach().numpy().T
    model.text.projection.bias[...] = proj.bias.detach().numpy()
    texts = ["Diptera Cecidomyiidae not_classified not_classified", "Hymenoptera Aus bus Aus bus",
             "Lepidoptera " * 12]
    tok = transformers.BertTokenizerFast(str(files.dir / "bert" / "vocab.txt"), do_lower_case=True)
    x = tok(texts, padding="max_length", max_length=20, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref = proj(files.text(**x).last_hidden_state.mean(dim=1)).numpy()
    ids, mask = vocab.encode(texts)
    np.testing.assert_array_equal(ids, x["input_ids"].numpy())
    np.testing.assert_array_equal(mask, x["attention_mask"].numpy().astype(bool))
    ours, _ = model.embed("text", {"text_ids": ids, "text_attention_mask": mask}, deterministic=True)
    np.testing.assert_allclose(np.asarray(ours), _l2(ref), atol=1e-4)


def test_image_tower_matches_a_timm_layout_vit_with_its_head(files):
    model, _ = _model(_config(files))
    head = perturb(torch.nn.Linear(HIDDEN, EMBED), 5)  # reset_classifier(num_classes=768)
    model.image.projection.kernel[...] = head.weight.detach().numpy().T
    model.image.projection.bias[...] = head.bias.detach().numpy()
    images = np.random.default_rng(0).random((3, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        cls = files.image(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))).last_hidden_state[:, 0]
        ref = head(cls).numpy()
    ours, _ = model.embed("image", {"image": images}, deterministic=True)
    np.testing.assert_allclose(np.asarray(ours), _l2(ref), atol=1e-4)


def test_paper_config_names_the_reference_weights():
    c = clibd_config.get_config("paper")
    assert c.model.tower_mode == "reference"
    assert c.model.image.init == "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k" and c.model.image.init_format == "timm"
    assert c.model.image.overrides.layer_norm_eps == 1e-6
    assert c.model.dna.init.endswith("model_41.pth") and c.model.dna.overrides.vocab_size == 4**5 + 3
    assert c.model.text.init == c.model.text.tokenizer == "prajjwal1/bert-small"
    assert clibd_config.get_config("tiny").model.tower_mode == "masked_mean"


def test_a_mismatched_dna_checkpoint_names_the_field(files):
    c = _config(files)
    c.model.dna.overrides.intermediate_size = 128
    with pytest.raises(ValueError, match="intermediate_size=64, the DNA tower intermediate_size=128"):
        _model(c)


def test_missing_weights_offline_say_what_to_place_where(files, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    c = _config(files)
    c.model.text.init = "no-such-owner/no-such-model"
    with pytest.raises(FileNotFoundError, match="huggingface-cli download no-such-owner/no-such-model"):
        _model(c)
    assert towers.TOWER_MODES == ("masked_mean", "reference") and text_lib.MAX_LENGTH == 20
