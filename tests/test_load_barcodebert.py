"""Released BarcodeBERT checkpoint formats through :func:`bioscan_jax.convert.barcodebert.load`.

Each test writes a checkpoint in the upstream layout with transformers (non-trivial weights),
and compares our embeddings of real barcodes with the reference forward, which is written out
here from the reference code (tokenisation, trailing N, pooling), not from ours.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os

import numpy as np
import pandas as pd
import pytest

from flax import nnx

from bioscan_jax.convert import barcodebert as bb_load
from bioscan_jax.convert.hf_bert import ConversionError

from _references import bioscan5m_tokens, perturb  # noqa: E402

pytestmark = pytest.mark.torch

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def barcodes(real_barcodes_path) -> list[str]:
    frame = pd.read_csv(real_barcodes_path, sep="\t", dtype=str)
    seqs = [s.upper() for s in frame["nucleotides"].dropna().head(12)]
    # trailing N of various lengths, an internal N run, one long and one short barcode
    seqs = [s + "N" * (3 * i) for i, s in enumerate(seqs)]
    seqs[2] = seqs[2][:200] + "NNNN" + seqs[2][204:]
    seqs[5] = seqs[5] + "ACGT" * 10
    seqs[7] = seqs[7][:300]
    return seqs



def _bert_config(vocab_size: int, **kw):
    base = dict(vocab_size=vocab_size, hidden_size=96, num_hidden_layers=2, num_attention_heads=12,
                intermediate_size=160, output_hidden_states=True)
    base.update(kw)
    return transformers.BertConfig(**base)


# ----------------------------------------------------------------------------- reference forwards


def v1_reference_ids(seq: str, k: int) -> list[int]:
    """CLIBD ``dna_encoder.py::get_sequence_pipeline`` / BarcodeBERT v1: ``PadSequence(660)`` (cut
    or right-pad with N), non-overlapping k-mers, torchtext vocab ``<MASK>, <CLS>, <UNK>`` + k-mers
    in product order, default ``<UNK>``."""
    vocab = {"".join(p): 3 + i for i, p in enumerate(itertools.product("ACGT", repeat=k))}
    s = seq[:660] + "N" * (660 - len(seq[:660]))
    return [vocab.get(s[i:i + k], 2) for i in range(0, len(s) - k + 1, k)]


def v1_reference_embedding(model, seqs, k) -> np.ndarray:
    """v1 probe: ``hidden_states[-1].mean(1)`` over all 660 // k tokens, no attention mask."""
    ids = torch.tensor([v1_reference_ids(s, k) for s in seqs])
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    return hidden.mean(1).numpy()


def bioscan5m_reference_embedding(model, seqs, k) -> np.ndarray:
    """``barcodebert/datasets.py::representations_from_df``: masked mean of the last layer."""
    toks = [bioscan5m_tokens(s, k) for s in seqs]
    ids = torch.tensor([t[0] for t in toks])
    att = torch.tensor([t[1] for t in toks])
    with torch.no_grad():
        hidden = model(ids, attention_mask=att, output_hidden_states=True).hidden_states[-1]
    return ((hidden * att.unsqueeze(-1)).sum(1) / att.sum(1, keepdim=True)).numpy()


def _ours(loaded, seqs) -> np.ndarray:
    ids, mask = loaded.tokenizer()(seqs)
    return np.asarray(loaded.embed(ids, mask))


# ----------------------------------------------------------------------------- formats


def test_v1_state_dict_of_ddp_bert_for_masked_lm(tmp_path, barcodes):
    k = 4
    model = perturb(transformers.BertForMaskedLM(_bert_config(4**k + 3)), 0)
    path = tmp_path / "new_model_4.pth"
    torch.save({"module." + key: v for key, v in model.state_dict().items()}, path)
    loaded = bb_load.load(path)
    assert loaded.format == "v1" and loaded.protocol == bb_load.V1_PROTOCOL
    assert (loaded.config.k, loaded.config.num_layers, loaded.config.num_heads) == (4, 2, 12)
    assert loaded.config.vocab_size == 4**k + 3
    np.testing.assert_allclose(_ours(loaded, barcodes), v1_reference_embedding(model, barcodes, k), atol=1e-4)
    assert any(key.startswith("cls.predictions") for key in loaded.head_tensors)


def test_v1_rows_are_moved_explicitly():
    table = np.arange(4**2 + 3)[:, None].astype(np.float32)  # row i holds i
    ours = bb_load.v1_rows_to_ours(table, 2)[:, 0]
    assert ours[0] == 0 and ours[1] == 2  # [MASK] <- <MASK>, [UNK] <- <UNK>
    assert ours[2:18].tolist() == list(range(3, 19))  # k-mers
    assert ours[18] == 1  # [CLS] <- <CLS>


def test_barcodebert_training_checkpoint_is_read_without_running_its_pickle(tmp_path, barcodes):
    k = 5
    cfg = _bert_config(4**k + 2, num_attention_heads=4, num_labels=4**k)
    model = perturb(transformers.BertForTokenClassification(cfg), 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-4, total_steps=10)
    marker = tmp_path / "executed"

    class Payload:  # a global that would run code if the file were unpickled normally
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ckpt = {
        "model": {"module." + key: v for key, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": {**scheduler.state_dict(), "anneal_func": math.cos, "payload": Payload()},
        "epoch": 3, "total_step": 30, "n_samples_seen": 480, "bert_config": cfg.to_dict(),
        "max_accuracy": 0.5, "best_epoch": 2, "config": argparse.Namespace(k_mer=k, n_layers=2, n_heads=4),
    }
    path = tmp_path / "checkpoint_pretraining.pt"
    torch.save(ckpt, path)
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)  # what a safe torch.load says of this file
    loaded = bb_load.load(path)
    assert not marker.exists()
    assert loaded.format == "training" and loaded.protocol == bb_load.BIOSCAN5M_PROTOCOL
    assert (loaded.config.k, loaded.config.num_heads, loaded.config.intermediate_size) == (5, 4, 160)
    np.testing.assert_allclose(_ours(loaded, barcodes), bioscan5m_reference_embedding(model, barcodes, k), atol=1e-4)


@pytest.mark.parametrize("arch", ["BertModel", "BertForMaskedLM", "BertForTokenClassification"])
def test_hugging_face_directory_sizes_come_from_config_json(tmp_path, barcodes, arch):
    k = 4
    cfg = _bert_config(4**k + 2, num_hidden_layers=3, num_attention_heads=6, num_labels=4**k)
    model = perturb(getattr(transformers, arch)(cfg), 2)
    model.save_pretrained(tmp_path / "hf")
    loaded = bb_load.load(tmp_path / "hf")
    assert loaded.format == "hf" and (loaded.config.num_layers, loaded.config.num_heads) == (3, 6)
    np.testing.assert_allclose(_ours(loaded, barcodes), bioscan5m_reference_embedding(model, barcodes, k), atol=1e-4)


@pytest.mark.parametrize("prefix", bb_load.CLIBD_DNA_PREFIXES)
def test_clibd_checkpoint_dna_tower(tmp_path, barcodes, prefix):
    k = 5
    dna = perturb(transformers.BertForMaskedLM(_bert_config(4**k + 3)), 3)
    sd = {prefix + key: v for key, v in dna.state_dict().items()}
    sd["image_encoder.base_image_encoder.cls_token"] = torch.zeros(1, 1, 8)
    sd["logit_scale"] = torch.tensor(2.659)
    torch.save(sd, tmp_path / "best.pth")
    loaded = bb_load.load(tmp_path / "best.pth")
    assert loaded.format == "clibd" and loaded.protocol == bb_load.V1_PROTOCOL
    np.testing.assert_allclose(_ours(loaded, barcodes), v1_reference_embedding(dna, barcodes, k), atol=1e-4)


# ----------------------------------------------------------------------------- bad input


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path):
    cfg = _bert_config(4**4 + 2, num_attention_heads=4)
    model = transformers.BertModel(cfg)
    sd = model.state_dict()
    sd["encoder.layer.1.intermediate.dense.weight"] = torch.zeros(100, 96)
    ckpt = {"model": sd, "bert_config": cfg.to_dict()}
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(ConversionError, match=r"encoder\.layer\.1\.intermediate\.dense\.weight.*\(100, 96\).*\(96, 160\)"):
        bb_load.load(tmp_path / "bad.pt")


def test_vocabulary_that_is_no_kmer_vocabulary_is_refused(tmp_path):
    model = transformers.BertModel(_bert_config(1000, num_attention_heads=4))
    torch.save(model.state_dict(), tmp_path / "odd.pth")
    with pytest.raises(ConversionError, match="1000 rows: neither 4\\*\\*k \\+ 2"):
        bb_load.load(tmp_path / "odd.pth")


def test_config_and_weights_that_disagree_are_refused(tmp_path):
    cfg = _bert_config(4**4 + 2, num_attention_heads=4)
    model = transformers.BertModel(cfg)
    ckpt = {"model": model.state_dict(), "bert_config": {**cfg.to_dict(), "num_hidden_layers": 3}}
    torch.save(ckpt, tmp_path / "three.pt")
    with pytest.raises(ConversionError, match="missing encoder keys.*encoder.layer.2"):
        bb_load.load(tmp_path / "three.pt")


def test_unknown_layout_names_the_keys_and_the_formats(tmp_path):
    torch.save({"weights": {"a.b": torch.zeros(2)}}, tmp_path / "x.pt")
    with pytest.raises(ConversionError, match=r"top-level keys \['weights'\]\. Known formats: hf, training, v1, clibd"):
        bb_load.load(tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        bb_load.load(tmp_path / "absent.pt")


def test_convert_writes_a_model_directory_that_is_itself_a_spec(tmp_path, barcodes):
    """``bioscan-jax convert``: a released v1 checkpoint → orbax + model.json; loading the
    directory gives the same embeddings with the same (v1) protocol, and a CLIBD config's DNA
    ``init`` reads it too."""
    from bioscan_jax import cli
    from bioscan_jax.eval import dna_embedder
    from bioscan_jax.tasks.clibd import training as clibd_train

    k = 4
    model = perturb(transformers.BertForMaskedLM(_bert_config(4**k + 3)), 3)
    path = tmp_path / "new_model_4.pth"
    torch.save({"module." + key: v for key, v in model.state_dict().items()}, path)
    out = tmp_path / "converted"
    assert cli.main(["convert", "--model", str(path), "--out", str(out)]) == 0
    assert (out / "model.json").exists() and (out / "checkpoints" / "0").is_dir()
    converted = dna_embedder.resolve(str(out)).loaded
    assert converted.protocol == bb_load.V1_PROTOCOL and converted.config == bb_load.load(path).config
    np.testing.assert_allclose(_ours(converted, barcodes), v1_reference_embedding(model, barcodes, k), atol=1e-4)
    state = clibd_train.dna_encoder_state(str(out), converted.config)
    ours = nnx.state(converted.model, nnx.Param).to_pure_dict()
    np.testing.assert_array_equal(state["encoder"]["embeddings"]["word"]["embedding"],
                                  ours["embeddings"]["word"]["embedding"])
    assert cli.main(["convert", "--model", str(path), "--out", str(out)]) == 1  # never over an existing model
    assert cli.main(["convert", "--model", "kmer:4", "--out", str(tmp_path / "k")]) == 1


def test_one_resolver_serves_the_cli_clibd_and_zsc(tmp_path, barcodes, monkeypatch):
    """The CLI's --model, CLIBD's model.dna.init and ZSC's weights='checkpoint' all find the
    encoder through convert.barcodebert.resolve: a released file and a converted directory give
    the same weights to each, and a missing path names the setting."""
    import ml_collections

    from bioscan_jax.eval import dna_embedder
    from bioscan_jax.models import kmer_bert
    from bioscan_jax.tasks.clibd import training as clibd_train
    from bioscan_jax.tasks.zsc import encoders as zsc_encoders

    calls = []
    real = bb_load.resolve
    monkeypatch.setattr(bb_load, "resolve", lambda *a, **kw: calls.append(kw.get("what")) or real(*a, **kw))
    k = 4
    model = perturb(transformers.BertForMaskedLM(_bert_config(4**k + 3)), 5)
    path = tmp_path / "released_4.pth"
    torch.save({"module." + key: v for key, v in model.state_dict().items()}, path)
    released = real(path)
    cli = dna_embedder.resolve(str(path)).loaded
    clibd = clibd_train.dna_encoder_state(str(path), released.config)
    m = ml_collections.ConfigDict(dict(weights="checkpoint", path=str(path), frames=1,
                                       **bb_load.config_to_json(released.config)))
    monkeypatch.setattr(kmer_bert, "config_from", lambda section: released.config)
    config = ml_collections.ConfigDict(dict(seed=0, data=dict(max_nucleotides=660)))
    zsc = zsc_encoders.dna_encoder("released", m, config, trained=None).model
    assert calls == ["model spec", "config.model.dna.init", "config.models.released.path"]
    want = nnx.state(released.model, nnx.Param).to_pure_dict()["embeddings"]["word"]["embedding"]
    for got in (nnx.state(cli.model, nnx.Param).to_pure_dict(), clibd["encoder"], nnx.state(zsc, nnx.Param).to_pure_dict()):
        np.testing.assert_array_equal(got["embeddings"]["word"]["embedding"], want)
    with pytest.raises(FileNotFoundError, match="config.model.dna.init '.*nowhere': no such file"):
        real(str(tmp_path / "nowhere"), what="config.model.dna.init")
