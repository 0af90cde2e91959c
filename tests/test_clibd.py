"""CLIBD: towers, loss wiring, the end-to-end task on a small synthetic dataset, bad input."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import optax
import numpy as np
import pytest
from flax import nnx

from bioscan_jax.data import schema
from bioscan_jax.data import sources
from bioscan_jax.models import kmer_bert, text, towers, vit
from bioscan_jax import sharding as mesh_lib
from bioscan_jax.train import optim
from bioscan_jax.train.state import create_train_state
from bioscan_jax.train.step import make_train_step
from configs import clibd as clibd_configs

B, IMG, DIM = 6, 32, 16
VOCAB = 40


def tiny_towers(modalities=("image", "dna", "text"), learnable_scale=True) -> towers.ClibdConfig:
    return towers.ClibdConfig(
        image=vit.get_variant("Ti/16", image_size=IMG, hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64)
        if "image" in modalities else None,
        dna=kmer_bert.get_variant("tiny", k=6, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
        if "dna" in modalities else None,
        text=text.get_variant("tiny", vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
        if "text" in modalities else None,
        embed_dim=DIM, learnable_scale=learnable_scale)


def random_batch(seed=0, n=B):
    rng = np.random.default_rng(seed)
    t = 660 // 6
    mask = np.ones((n, t), bool)
    mask[:, 100:] = False
    text_mask = np.zeros((n, 20), bool)
    text_mask[:, :6] = True
    return {
        "image": rng.random((n, IMG, IMG, 3), dtype=np.float32),
        "dna_ids": rng.integers(2, 4**6 + 2, (n, t)).astype(np.int32),
        "dna_attention_mask": mask,
        "text_ids": np.where(text_mask, rng.integers(5, VOCAB, (n, 20)), 0).astype(np.int32),
        "text_attention_mask": text_mask,
    }


# -- towers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("modalities", [("image", "dna", "text"), ("image", "dna"), ("image", "text"), ("dna",)])
def test_towers_shapes_norms_and_subsets(modalities):
    model = towers.ClibdModel(tiny_towers(modalities), rngs=nnx.Rngs(0))
    features, aux = nnx.jit(lambda m, batch: m(batch, deterministic=True))(model, random_batch())
    assert sorted(features) == sorted(modalities)
    for m, f in features.items():
        assert f.shape == (B, DIM) and f.dtype == jnp.float32
        np.testing.assert_allclose(np.linalg.norm(np.asarray(f), axis=-1), 1.0, rtol=1e-5)
        assert "pooled" in aux[m]
    np.testing.assert_allclose(float(model.log_scale[...]), np.log(1 / 0.07), rtol=1e-6)
    missing = next(m for m in towers.MODALITIES if m not in modalities) if len(modalities) < 3 else None
    if missing:
        with pytest.raises(ValueError, match="not enabled"):
            model(random_batch(), modalities=(missing,))


def test_tower_pooling_ignores_padding():
    model = towers.ClibdModel(tiny_towers(("dna", "text")), rngs=nnx.Rngs(0))
    batch = random_batch()
    changed = dict(batch)
    changed["dna_ids"] = batch["dna_ids"].copy()
    changed["dna_ids"][:, 105:] = 1  # beyond the attention mask
    forward = nnx.jit(lambda m, x: m(x, deterministic=True)[0])
    a, b = forward(model, batch), forward(model, changed)
    np.testing.assert_allclose(np.asarray(a["dna"]), np.asarray(b["dna"]), atol=1e-5)


def test_fixed_scale_is_not_a_param_and_configs_reject_bad_input():
    model = towers.ClibdModel(tiny_towers(learnable_scale=False), rngs=nnx.Rngs(0))
    assert isinstance(model.log_scale, towers.FixedLogScale)
    params = nnx.state(model, nnx.Param).to_pure_dict()
    assert "log_scale" not in params
    with pytest.raises(ValueError, match="at least one tower"):
        towers.ClibdConfig()
    with pytest.raises(KeyError, match="dna_ids"):
        model({"image": random_batch()["image"]}, modalities=("dna",))


def test_load_encoder_state_copies_and_checks_shapes():
    model = towers.ClibdModel(tiny_towers(), rngs=nnx.Rngs(0))
    source = kmer_bert.KmerBert(tiny_towers().dna, rngs=nnx.Rngs(7))
    towers.load_encoder_state(model, "dna", nnx.state(source, nnx.Param))
    np.testing.assert_array_equal(np.asarray(model.dna.encoder.embeddings.word.embedding[...]),
                                  np.asarray(source.embeddings.word.embedding[...]))
    other = kmer_bert.KmerBert(kmer_bert.get_variant("tiny", k=6, hidden_size=48, num_layers=1, num_heads=2,
                                                     intermediate_size=64), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="does not match"):
        towers.load_encoder_state(model, "dna", nnx.state(other, nnx.Param))


# -- loss wiring -------------------------------------------------------------------------------


def test_contrastive_step_decreases_loss():
    from bioscan_jax.tasks.clibd import training as clibd_train

    config = clibd_configs.get_config()
    config.loss.positives = "species"
    mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    tx, schedule = optim.make_optimizer({"lr": 3e-3, "lr_ref_batch": 0, "schedule": "constant"},
                                        total_steps=10, global_batch=8)
    setup, state = create_train_state(lambda r: towers.ClibdModel(tiny_towers(), rngs=r), tx, mesh,
                                      mesh_lib.DEFAULT_SHARDING_RULES)
    step = make_train_step(setup, clibd_train.make_loss_fn(config), tx, schedule=schedule)
    batch = random_batch(n=8)
    batch["label_species"] = np.array([0, 0, 1, 2, 3, 4, -1, -1], np.int32)
    batch = mesh_lib.to_global_batch(batch, mesh)
    losses = []
    for _ in range(6):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert set(metrics) >= {"loss", "logit_scale", "acc/image_to_dna", "loss/text_to_dna"}
    assert losses[-1] < losses[0] - 0.1, losses


# -- the task end to end -----------------------------------------------------------------------


def small_config(data_dir: str, **eval_overrides):
    c = clibd_configs.get_config()
    c.data.data_dir = data_dir
    c.data.num_records = 200
    c.data.image_size, c.data.resize = 32, 36
    c.model.embed_dim = DIM
    c.model.image.overrides = dict(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64)
    c.model.dna.overrides = dict(k=6, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    c.model.text.overrides = dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    c.train.batch_size, c.train.steps, c.train.epochs, c.train.tensorboard = 16, 2, 0, False
    c.eval.batch_size = 32
    c.eval.eval_skip_epoch = -1  # scripts/train_cl.py's default: every epoch end (this run is < 1 epoch)
    c.eval.update(eval_overrides)
    return c


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from bioscan_jax.tasks.clibd import task as clibd

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    workdir = str(tmp_path_factory.mktemp("clibd"))
    config = small_config(data_dir)
    summary = clibd.run(config, workdir)
    return config, workdir, summary


def test_run_writes_report_with_all_pairs_ranks_and_both_settings(tiny_run, capsys):
    config, workdir, summary = tiny_run
    with open(os.path.join(workdir, "retrieval.json")) as f:
        report = json.load(f)
    assert list(report["settings"]) == ["No alignment", "I+D+T"]
    for results in report["settings"].values():
        assert results["skipped_pairs"] == []
        for pair in ("dna_to_dna", "image_to_image", "image_to_dna"):
            for which in ("seen", "unseen"):
                assert set(schema.EVAL_RANKS) <= set(results[pair][which])
            for rank in schema.EVAL_RANKS:
                cell = results[pair]["report"][rank]["macro_top1"]
                assert set(cell) == {"seen", "unseen", "hm"}
                assert all(0.0 <= v <= 1.0 for v in cell.values())
            assert set(results[pair]["report"]["species"]) >= {"micro_top1", "macro_top3", "macro_top5"}
        assert set(results["excluded"]) == {"train", "key_unseen", "test", "test_unseen"}
    for name in ("retrieval.md", "summary.json", "retrieval_species.png", "text_vocab.json"):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert summary["train"]["steps"] == 2
    assert "No alignment" in open(os.path.join(workdir, "retrieval.md")).read()


def test_validation_retrieval_is_logged_during_training_and_never_on_test(tiny_run):
    from bioscan_jax.tasks.clibd import evaluation as clibd_eval
    from bioscan_jax.tasks.clibd import training as clibd_train
    from bioscan_jax.train.metrics import read_metrics

    config, workdir, summary = tiny_run
    val = [r for r in read_metrics(os.path.join(workdir, "train")) if "val/dna_to_dna/species_macro_top1_hm" in r]
    assert [r["step"] for r in val] == [summary["train"]["steps"]]  # the last step (eval_every=0, < 1 epoch)
    for pair in ("dna_to_dna", "image_to_image", "image_to_dna"):
        for which in ("seen", "unseen", "hm"):
            assert 0.0 <= val[0][f"val/{pair}/species_macro_top1_{which}"] <= 1.0
    assert os.path.exists(os.path.join(workdir, "training_curves.png"))

    # The evaluator reports what evaluate() gives on val / val_unseen for the same model.
    setup = clibd_train.prepare(config, workdir)
    model = clibd_train.load_towers(workdir)
    batches = clibd_eval.EvalBatches(config, setup, sources.retrieval_eval_splits(config.eval, ["val_query_splits"]),
                                     tuple(config.eval.ranks))
    direct = clibd_eval.evaluate(config, model, setup, batches, queries="val_query_splits")
    logged = clibd_eval.ValRetrieval(config, setup, batches, steps_per_epoch=100).run(model, 0)
    assert logged["val/dna_to_dna/species_macro_top1_unseen"] == pytest.approx(
        direct["dna_to_dna"]["report"]["species"]["macro_top1"]["unseen"])
    assert set(direct["excluded"]) == {"train", "key_unseen", "val", "val_unseen"}

    bad = config.copy_and_resolve_references()
    bad.eval.val_query_splits = ("val", "test_unseen")
    with pytest.raises(ValueError, match="test split"):
        clibd_eval.ValRetrieval(bad, setup, batches, steps_per_epoch=100)

    # The test tables are of the best-on-validation model, and retrieval.json names its epoch.
    with open(os.path.join(workdir, "retrieval.json")) as f:
        selection = json.load(f)["model_selection"]
    assert selection == {"select": "best_val", "step": 2, "epoch": 0, "metric": "val/overall_acc",
                         "value": pytest.approx(val[0]["val/overall_acc"])}
    # scripts/train_cl.py evaluates 0-based epoch e only when e > eval_skip_epoch
    skipping = config.copy_and_resolve_references()
    skipping.eval.eval_skip_epoch = 10
    spe = clibd_eval.ValRetrieval(skipping, setup, batches, steps_per_epoch=5)
    assert spe.run(model, 55) == {} and spe.epoch_of(55) == 10 and spe.epoch_of(60) == 11
    assert clibd_eval.OVERALL_METRIC in spe.run(model, 60)


def test_no_alignment_flag_and_load_towers(tiny_run):
    from bioscan_jax.tasks.clibd import task as clibd
    from bioscan_jax.tasks.clibd import training as clibd_train

    config, workdir, _ = tiny_run
    config = config.copy_and_resolve_references()
    config.eval.no_alignment = False
    clibd.run(config, workdir)  # training is complete: resumes at the last step, evaluates once
    with open(os.path.join(workdir, "retrieval.json")) as f:
        assert list(json.load(f)["settings"]) == ["I+D+T"]

    model = clibd_train.load_towers(workdir)
    trained, _ = clibd_train.train_clibd(config, workdir)
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(trained, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert model.modalities == ("image", "dna", "text")


def test_bad_records_are_counted_and_empty_keys_named(tiny_run):
    from bioscan_jax.tasks.clibd import evaluation as clibd_eval
    from bioscan_jax.tasks.clibd import training as clibd_train

    config, workdir, _ = tiny_run
    setup = clibd_train.prepare(config, workdir)
    splits = {s: [dict(r) for r in setup.data[s]] for s in ("train", "key_unseen", "test", "test_unseen")}
    splits["test"][0]["image"] = b"not a jpeg"
    splits["test"][1]["dna_barcode"] = ""
    splits["train"][0]["dna_barcode"] = ""
    setup.data = sources.Splits(splits, setup.data.label_names, "hand-made")
    model = towers.ClibdModel(setup.model_config, rngs=nnx.Rngs(0))
    results = clibd_eval.evaluate(config, model, setup)
    assert results["excluded"]["test"]["n_image_failed"] == 1
    assert results["excluded"]["test"]["n_without_dna"] == 1
    assert results["excluded"]["train"]["n_without_dna"] == 1
    assert results["image_to_image"]["seen"]["n_queries_nan"] == 1
    assert results["dna_to_dna"]["seen"]["n_queries_nan"] == 1
    assert results["dna_to_dna"]["seen"]["n_keys_nan"] == 1
    assert results["image_to_dna"]["seen"]["n_keys_nan"] == 1

    setup.data = sources.Splits({**splits, "key_unseen": []}, setup.data.label_names, "hand-made")
    with pytest.raises(ValueError, match="key_unseen"):
        clibd_eval.evaluate(config, model, setup)


def test_training_records_without_dna_are_left_out_and_counted():
    from bioscan_jax.tasks.clibd import training as clibd_train

    records = [{"dna_barcode": "ACGT" * 20}, {"dna_barcode": ""}, {"dna_barcode": "ACGT" * 20}]
    kept, missing = clibd_train.records_with_dna(records)
    assert missing == 1 and len(kept) == 2 and all(r["dna_barcode"] for r in kept)


def test_config_variants():
    tiny = clibd_configs.get_config()
    paper = clibd_configs.get_config("paper")
    assert tiny.data.builder_config == "synthetic" and paper.data.builder_config == "cropped_256"
    assert paper.model.dna.variant == "5_12_12" and paper.model.image.variant == "B/16"
    assert paper.model.text.variant == "bert-small" and paper.train.bf16
    assert paper.train.batch_size == 2000 and paper.train.epochs == 20
    assert optim.peak_lr(paper.optim, paper.train.batch_size) == pytest.approx(2e-4)
    from bioscan_jax.tasks.clibd import training as clibd_train

    cfg = clibd_train.model_config(paper, text_vocab_size=100)
    assert cfg.image.image_size == 224 and cfg.dna.k == 5 and cfg.dna.num_layers == 12 and cfg.embed_dim == 768
    assert cfg.text.hidden_size == 512 and cfg.text.vocab_size == 100
    tiny.model.modalities = "image"
    with pytest.raises(ValueError, match="at least two"):
        clibd_train.enabled_modalities(tiny)


def test_dna_encoder_init_from_a_workdir(tiny_run):
    from bioscan_jax.tasks.clibd import training as clibd_train

    config, workdir, _ = tiny_run
    trained = clibd_train.load_towers(workdir)
    config = config.copy_and_resolve_references()
    config.model.dna.init = workdir  # any run dir with a DNA encoder: BarcodeBERT or CLIBD
    setup = clibd_train.prepare(config, workdir)
    pretrained = clibd_train.pretrained_encoders(config, setup, workdir)
    model = clibd_train.build_model(setup, pretrained, nnx.Rngs(123))
    for a, b in zip(jax.tree.leaves(nnx.state(model.dna.encoder, nnx.Param)),
                    jax.tree.leaves(nnx.state(trained.dna.encoder, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # Training gets them as the loop's warm start, placed into the sharded state after the init ...
    from bioscan_jax.train import state as state_lib

    tx = optax.adamw(1e-3)
    train_setup, state = state_lib.create_train_state(clibd_train.model_factory(setup.model_config), tx, setup.mesh)
    state = state_lib.warm_start(train_setup, state, clibd_train.warm_start(pretrained))
    want = nnx.state(trained.dna.encoder, nnx.Param).to_pure_dict()
    for a, b in zip(jax.tree.leaves(state["params"]["dna"]["encoder"]), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # ... so the jitted init carries no parameter-sized constant (it would hold the encoder's weights).
    text = jax.jit(lambda: nnx.state(clibd_train.model_factory(setup.model_config)(nnx.Rngs(0)))).lower().as_text()
    assert _largest_constant_bytes(text) < 1 << 20
    baked = jax.jit(lambda: nnx.state(clibd_train.build_model(setup, pretrained, nnx.Rngs(0)))).lower().as_text()
    assert _largest_constant_bytes(baked) >= 32 * 32 * 4  # the check sees weights when they are baked in


def _largest_constant_bytes(hlo_text: str) -> int:
    """The size of the largest ``stablehlo.constant`` of a lowered program."""
    import re

    sizes = {"f32": 4, "i32": 4, "ui32": 4, "bf16": 2, "f16": 2, "i64": 8, "f64": 8, "i1": 1, "i8": 1, "ui8": 1}
    largest = 0
    for shape in re.findall(r"stablehlo\.constant dense<[^>]*> : tensor<([^>]*)>", hlo_text):
        *dims, dtype = shape.split("x")
        n = 1
        for d in dims:
            n *= int(d)
        largest = max(largest, n * sizes.get(dtype, 4))
    return largest
