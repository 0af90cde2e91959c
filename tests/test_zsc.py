"""BIOSCAN-ZSC task: config variants, encoder specs, a tiny end-to-end run, embedding reuse,
determinism, imported weights and bad input."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from flax import nnx

from bioscan_jax.tasks.zsc import embedding_cache
from bioscan_jax.tasks.zsc import encoders as zsc_encoders
from bioscan_jax.tasks.zsc import evaluation as zsc_eval
from bioscan_jax.models import kmer_bert, vit
from bioscan_jax.tasks.zsc import task as zsc
from configs import zsc as zsc_configs

NUM_RECORDS = 600  # synthetic size: test + test_unseen = 39 records of 9 species
ALL_SPECS = ("dna:barcodebert_pretrained,dna:barcodebert_random,dna:kmer4_overlapping,image:vit_random,"
             "image:vit_clibd,image+dna:vit_random+barcodebert_pretrained")


def tiny_config(encoders: str = ALL_SPECS):
    """The tiny variant cut down to seconds: 600 records, PCA, a few training steps, small images."""
    c = zsc_configs.get_config()
    c.data.num_records = NUM_RECORDS
    c.encoders = encoders
    c.embed.batch_size = 32
    c.cluster.reduction = "pca"
    c.plots.umap_scatter = ""
    c.barcodebert.pretrain.train.steps = 4
    c.barcodebert.pretrain.train.batch_size = 16
    c.barcodebert.pretrain.train.log_every = 2
    c.barcodebert.pretrain.checkpoint.async_save = False
    c.clibd.model.modalities = "image,dna"
    c.clibd.data.image_size, c.clibd.data.resize = 32, 36
    c.clibd.model.image.overrides.num_layers = 1
    c.clibd.train.epochs = 0
    c.clibd.train.steps = 2
    c.clibd.train.batch_size = 16
    c.clibd.train.tensorboard = False
    c.clibd.checkpoint.async_save = False
    c.models.vit_random.image_size = 32
    c.models.vit_random.overrides.num_layers = 1
    return c


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One tiny run with every kind of spec; returns (workdir, summary)."""
    workdir = str(tmp_path_factory.mktemp("zsc"))
    return workdir, zsc.run(tiny_config(), workdir)


# ----------------------------------------------------------------------------- config


def test_config_variants():
    tiny = zsc_configs.get_config()
    assert tiny.task == "zsc" and tiny.variant == "tiny"
    assert tiny.data.builder_config == "synthetic" and tiny.data.split == "test+test_unseen"
    assert (tiny.cluster.reduction, tiny.cluster.n_components, tiny.cluster.n_neighbors,
            tiny.cluster.min_dist) == ("umap", 50, 30, 0.0)
    specs = zsc_encoders.parse_specs(tiny.encoders, tiny.models)
    assert {s.modality for s in specs} == {"dna", "image", "image+dna"}
    assert {tiny.models[n].weights for s in specs for n in s.models} >= {"pretrain", "random", "clibd"}
    for name in tiny.models:
        zsc_encoders.check_model_config(name, tiny.models[name])

    paper = zsc_configs.get_config("paper")
    assert paper.variant == "paper" and paper.data.builder_config == "cropped_256"
    specs = zsc_encoders.parse_specs(paper.encoders, paper.models)
    assert [s.name for s in specs] == ["dna:barcodebert", "image:vit_b16", "image+dna:vit_b16+barcodebert"]
    assert paper.models.vit_b16.normalize == "imagenet" and paper.models.vit_b16.variant == "B/16"
    assert paper.models.vit_b16.image_size == 224

    # The CLIBD towers train on the clustered dataset: its data fields follow ours.
    tiny.data.num_records = 1234
    assert tiny.clibd.data.num_records == 1234
    with pytest.raises(ValueError, match="Unknown variant"):
        zsc_configs.get_config("huge")


@pytest.mark.parametrize("encoders, match", [
    ("", "empty"),
    ("barcodebert_random", "<modality>:<model>"),
    ("audio:barcodebert_random", "<modality>:<model>"),
    ("dna:nope", "unknown model"),
    ("image:barcodebert_random", "needs models of modalities"),
    ("image+dna:vit_random+vit_clibd", "needs models of modalities"),
    ("dna:barcodebert_random+barcodebert_pretrained", "needs models of modalities"),
    ("dna:barcodebert_random,dna:barcodebert_random", "more than once"),
])
def test_bad_encoder_spec(encoders, match):
    c = zsc_configs.get_config()
    with pytest.raises(ValueError, match=match):
        zsc_encoders.parse_specs(encoders, c.models)


def test_spec_order_and_bad_model_entries():
    c = zsc_configs.get_config()
    (spec,) = zsc_encoders.parse_specs("image+dna:barcodebert_random+vit_random", c.models)
    assert spec.models == ("vit_random", "barcodebert_random")  # image first, then DNA
    with pytest.raises(ValueError, match="not available for image"):
        zsc_encoders.check_model_config("x", zsc_configs.model("image", "pretrain"))
    with pytest.raises(ValueError, match="needs config.models.x.path"):
        zsc_encoders.check_model_config("x", zsc_configs.model("image", "timm"))
    with pytest.raises(ValueError, match="normalize"):
        zsc_encoders.check_model_config("x", zsc_configs.model("image", "random", normalize="zscore"))


@pytest.mark.parametrize("stride", [0, 1])
def test_kmer_profile_encoder_equals_numpy_counts(stride):
    from bioscan_jax.data import dna as dna_lib
    from bioscan_jax import sharding as mesh_lib

    c = zsc_configs.get_config()
    m = zsc_configs.model("dna", "kmer", k=3, stride=stride)
    zsc_encoders.check_model_config("kmer", m)
    encoder = zsc_encoders.build_encoder("kmer", _with_model(c, "kmer", m), _no_training)
    seqs = ["ACGTACGTTGCANNACGT", "TTTTGGGGCCCCAAAANN", "ACGNNNNNNNNNNNNNNNNNNNN"]
    source = [{"processid": f"p{i}", "dna_barcode": s, **{r: 0 for r in zsc_encoders.RANKS}}
              for i, s in enumerate(seqs)]
    out = embedding_cache.embed_model(encoder, source, c, mesh_lib.make_mesh(c.mesh))
    ids, _ = dna_lib.KmerTokenizer(3, stride=stride or 3, strip_trailing_n=True)(seqs)
    counts = dna_lib.kmer_counts(ids, 3, dtype=np.float64)
    expected = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    np.testing.assert_allclose(out["embedding"], expected, atol=1e-6)
    assert out["embedding"].shape == (3, 64) and out["embedding"][1].sum() == pytest.approx(1.0)


def _with_model(c, name, m):
    c.models[name] = m
    return c


def _no_training(kind):
    raise AssertionError(f"this encoder needs no trained ({kind}) weights")


def test_reading_frames_average_the_embeddings_of_each_frame():
    from bioscan_jax.data import dna as dna_lib
    from bioscan_jax.models import kmer_bert
    from bioscan_jax import sharding as mesh_lib

    c = zsc_configs.get_config()
    m = zsc_configs.model("dna", "random", variant="tiny", overrides={"num_layers": 1}, frames=4)
    zsc_encoders.check_model_config("framed", m)
    encoder = zsc_encoders.build_encoder("framed", _with_model(c, "framed", m), _no_training)
    rng = np.random.default_rng(0)
    seqs = ["".join(rng.choice(list("ACGT"), size=n)) for n in (40, 57, 90)]
    source = [{"processid": f"p{i}", "dna_barcode": s, **{r: 0 for r in zsc_encoders.RANKS}}
              for i, s in enumerate(seqs)]
    out = embedding_cache.embed_model(encoder, source, c, mesh_lib.make_mesh(c.mesh))
    tok = dna_lib.KmerTokenizer(4, strip_trailing_n=True)
    per_frame = []
    for f in range(4):
        ids, mask = tok(seqs, offsets=np.full(3, f))
        per_frame.append(np.asarray(kmer_bert.pooled_embedding(encoder.model, {"ids": ids, "attention_mask": mask})))
    np.testing.assert_allclose(out["embedding"], np.mean(per_frame, axis=0), rtol=1e-5, atol=1e-5)
    assert not np.allclose(per_frame[0], per_frame[1], atol=1e-3)  # the frames really differ
    with pytest.raises(ValueError, match="reading frames"):
        zsc_encoders.check_model_config("x", zsc_configs.model("dna", "kmer", frames=4))


def test_kmer_encoder_rejects_bad_k():
    with pytest.raises(ValueError, match="1 <= k <= 8"):
        zsc_encoders.check_model_config("x", zsc_configs.model("dna", "kmer", k=9))
    with pytest.raises(ValueError, match="stride"):
        zsc_encoders.check_model_config("x", zsc_configs.model("dna", "kmer", k=4, stride=5))


def test_data_errors():
    c = zsc_configs.get_config()
    one_species = {"species": np.zeros(80, np.int64)}
    with pytest.raises(ValueError, match="at least two species"):
        zsc_eval.check_clusterable(one_species, "test", c)
    few = {"species": np.arange(40) % 10}
    with pytest.raises(ValueError, match="UMAP to 50 dims needs more than 51"):
        zsc_eval.check_clusterable(few, "test", c)
    c.cluster.reduction = "pca"
    assert zsc_eval.check_clusterable(few, "test", c) == 10


# ----------------------------------------------------------------------------- end to end


def test_end_to_end(first_run):
    workdir, summary = first_run
    with open(os.path.join(workdir, "zsc.json")) as f:
        saved = json.load(f)
    assert saved["n_records"] == summary["n_records"] and saved["n_species"] >= 2
    assert set(saved["results"]) == set(ALL_SPECS.split(","))
    for name, res in saved["results"].items():
        assert "error" not in res, res
        for rank in zsc_encoders.RANKS:
            assert -1.0 <= res[f"ami/{rank}"] <= 1.0, (name, rank)
        assert res["n_clusters"] == saved["n_species"]
    fused = saved["results"]["image+dna:vit_random+barcodebert_pretrained"]
    assert fused["n_features"] == (saved["embeddings"]["vit_random"]["dim"]
                                   + saved["embeddings"]["barcodebert_pretrained"]["dim"])
    for name, info in saved["embeddings"].items():
        assert not info["reused"]
        with np.load(info["path"]) as f:
            assert f["embedding"].shape == (saved["n_records"], info["dim"])
            assert set(zsc_encoders.RANKS) <= set(f.files) and "processid" in f.files
    assert os.path.exists(os.path.join(workdir, "plots", "ami_by_rank.png"))
    table = open(os.path.join(workdir, "zsc.md")).read()
    assert "AMI Species" in table and "vit_clibd" in table


def test_rerun_reuses_embeddings(first_run):
    workdir, first = first_run
    mtimes = {n: os.path.getmtime(i["path"]) for n, i in first["embeddings"].items()}
    again = zsc.run(tiny_config(), workdir)
    assert all(i["reused"] for i in again["embeddings"].values())
    assert {n: os.path.getmtime(i["path"]) for n, i in again["embeddings"].items()} == mtimes
    for name, res in first["results"].items():
        assert again["results"][name]["ami/species"] == res["ami/species"]


def test_same_seed_same_results(first_run, tmp_path):
    """A fresh run (pretraining included) reproduces the embeddings and scores exactly."""
    workdir, first = first_run
    spec = "dna:barcodebert_pretrained"
    fresh = zsc.run(tiny_config(spec), str(tmp_path))
    with np.load(first["embeddings"]["barcodebert_pretrained"]["path"]) as a, \
            np.load(fresh["embeddings"]["barcodebert_pretrained"]["path"]) as b:
        np.testing.assert_array_equal(a["embedding"], b["embedding"])
        np.testing.assert_array_equal(a["species"], b["species"])
    for key in ("ami/species", "ami/genus", "ari/species"):
        assert fresh["results"][spec][key] == first["results"][spec][key]


def test_nan_embeddings_reported_per_encoder(first_run, tmp_path):
    workdir, _ = first_run
    copy = str(tmp_path / "nan")
    shutil.copytree(workdir, copy)
    path = embedding_cache.embedding_path(copy, "test+test_unseen", "vit_random")
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["embedding"][[1, 5, 7]] = np.nan
    np.savez(path, **arrays)

    summary = zsc.run(tiny_config(), copy)
    assert summary["embeddings"]["vit_random"]["reused"]
    for name in ("image:vit_random", "image+dna:vit_random+barcodebert_pretrained"):
        err = summary["results"][name]["error"]
        assert "vit_random" in err and "3 of 39" in err and "NaN" in err
    assert "ami/species" in summary["results"]["dna:barcodebert_random"]
    with open(os.path.join(copy, "zsc.json")) as f:
        assert set(json.load(f)["errors"]) == {"image:vit_random", "image+dna:vit_random+barcodebert_pretrained"}


def test_restored_barcodebert_checkpoint_matches(first_run, tmp_path):
    """weights='checkpoint' restores the encoder the pretraining wrote (same embeddings)."""
    workdir, first = first_run
    (model_dir,) = [d for d in os.listdir(os.path.join(workdir, "models")) if d.startswith("barcodebert_")]
    c = tiny_config("dna:restored")
    c.models.restored = zsc_configs.model("dna", "checkpoint", variant="tiny",
                                          path=os.path.join(workdir, "models", model_dir))
    summary = zsc.run(c, str(tmp_path))
    with np.load(first["embeddings"]["barcodebert_pretrained"]["path"]) as a, \
            np.load(summary["embeddings"]["restored"]["path"]) as b:
        np.testing.assert_allclose(a["embedding"], b["embedding"], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- imported weights


def test_imported_vit_weights(tmp_path):
    """weights='hf' / 'timm' load a converted state dict: the same features as the source ViT."""
    from safetensors.numpy import save_file

    from bioscan_jax.convert import hf_vit

    src = vit.ViT(vit.get_variant("Ti/16", image_size=32, num_layers=1), rngs=nnx.Rngs(7))
    images = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
    want = np.asarray(src(images)[0])
    for weights, export, eps in (("hf", hf_vit.export_hf_vit, 1e-12), ("timm", hf_vit.export_timm_vit, 1e-6)):
        path = str(tmp_path / f"{weights}.safetensors")
        save_file(export(src), path)
        m = zsc_configs.model("image", weights, variant="Ti/16", overrides=dict(num_layers=1), path=path,
                              image_size=32, layer_norm_eps=1e-12)
        zsc_encoders.check_model_config("imported", m)
        enc = zsc_encoders.image_encoder("imported", m, seed=0)
        np.testing.assert_allclose(np.asarray(enc.model(images)[0]), want, rtol=1e-5, atol=1e-5)
        assert zsc_encoders.vit_config(zsc_configs.model("image", weights, variant="Ti/16")).layer_norm_eps == eps
    # ImageNet normalisation happens inside the embedding function.
    norm = zsc_encoders.vit_embed_fn("imagenet")
    x = np.full((1, 32, 32, 3), 0.485, np.float32)
    np.testing.assert_allclose(np.asarray(norm(lambda v: (v, {}), {"image": x}))[..., 0], 0.0, atol=1e-6)


def test_imported_barcodebert_weights(tmp_path):
    from safetensors.numpy import save_file

    from bioscan_jax.convert import hf_bert

    src = kmer_bert.KmerBertForMLM(kmer_bert.get_variant("tiny"), rngs=nnx.Rngs(3))
    path = str(tmp_path / "bert.safetensors")
    save_file(hf_bert.export_hf_bert(src), path)
    c = zsc_configs.get_config()
    m = zsc_configs.model("dna", "hf", variant="tiny", path=path)
    enc = zsc_encoders.dna_encoder("imported", m, c, _no_training)
    ids = np.random.default_rng(0).integers(2, 258, size=(2, 20)).astype(np.int32)
    mask = np.ones((2, 20), bool)
    src.eval()
    enc.model.eval()
    want = np.asarray(src.bert(ids, mask)[1]["pooled"])
    np.testing.assert_allclose(np.asarray(enc.embed_fn(enc.model, {"ids": ids, "attention_mask": mask})), want,
                               rtol=1e-5, atol=1e-5)


def test_processid_order_sorts_within_each_partition_in_the_named_order():
    from bioscan_jax.tasks.zsc import evaluation as zsc_eval

    processid = np.asarray(["B2", "A9", "C1", "A1", "B1"])
    partition = np.asarray(["test_unseen", "test", "test", "test_unseen", "test"])
    order = zsc_eval.processid_order(processid, partition, "test+test_unseen")
    assert processid[order].tolist() == ["A9", "B1", "C1", "A1", "B2"]


def test_per_rank_ami_of_single_modality_specs_also_comes_from_prenorm_none():
    """results-BIOSCAN5M.ipynb: the per-rank figures cluster with prenorm 'none', the species
    table with elementwise_zscore; single-modality specs report both, each named."""
    from bioscan_jax.tasks.zsc import evaluation as zsc_eval

    rng = np.random.default_rng(0)
    n, species = 120, 6
    y = np.repeat(np.arange(species), n // species)
    centres = rng.normal(size=(species, 8)) * np.linspace(0.2, 5.0, 8)  # feature scales differ: z-scoring matters
    emb = {m: {"embedding": (centres[y] + rng.normal(scale=0.8, size=(n, 8))).astype(np.float32)} for m in ("a", "b")}
    labels = {r: y.copy() for r in zsc_encoders.RANKS}
    partition = np.where(np.arange(n) % 3 == 0, "test_unseen", "test")
    config = zsc_configs.get_config("paper")
    config.cluster.reduction = "pca"
    config.cluster.n_components = 4
    single = zsc_encoders.EncoderSpec("dna:a", "dna", ("a",))
    fused = zsc_encoders.EncoderSpec("image+dna:b+a", "image+dna", ("b", "a"))
    res = zsc_eval.evaluate_spec(single, emb, labels, config, partition)
    assert res["per_rank/prenorm"] == "none"
    config_none = config.copy_and_resolve_references()
    config_none.cluster.prenorm = "none"
    plain = zsc_eval.evaluate_spec(single, emb, labels, config_none, partition)
    for rank in zsc_encoders.RANKS:
        assert res[f"per_rank/ami/{rank}"] == pytest.approx(plain[f"ami/{rank}"])
    assert "per_rank/prenorm" not in zsc_eval.evaluate_spec(fused, emb, labels, config, partition)
    table = zsc_eval.results_table({"dna:a": res})
    assert "prenorm 'none'" in table
