"""Does the train step fit the devices? run.py refuses, before the first step, a step whose planned
peak exceeds the device memory (one line naming the setting to change); a batch that does not
divide over the mesh names the nearest valid batch; pretrained weights load into scanned encoders
(what lets the paper configs turn scan_layers on)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from bioscan_jax import sharding as mesh_lib
from bioscan_jax.models import kmer_bert, layers, towers
from bioscan_jax.train import loop

REPO = pathlib.Path(__file__).resolve().parents[1]
GiB = 1024**3


def _run_py(args, env_extra, timeout=600):
    env = dict(os.environ, BIOSCAN_JAX_COMPILATION_CACHE="off", **env_extra)
    return subprocess.run([sys.executable, "run.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_run_py_refuses_a_step_over_the_device_memory_in_one_line(tmp_path):
    out = _run_py(["--config=configs/barcodebert.py", f"--workdir={tmp_path}", "--config.stages=pretrain",
                   "--config.pretrain.train.steps=2", "--config.pretrain.train.epochs=0"],
                  {loop.DEVICE_MEMORY_ENV: "0.001"})
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("run.py: the train step of ") and "GiB per device" in last, out.stderr[-3000:]
    assert f"{loop.DEVICE_MEMORY_ENV}=0.001" in last
    assert "set remat=True and scan_layers=True on the encoders bert.encoder" in last
    assert not (tmp_path / "pretrain" / "checkpoints").exists() or not any((tmp_path / "pretrain" / "checkpoints").iterdir())


def test_run_py_names_the_nearest_valid_batch_of_a_paper_config():
    out = _run_py(["--config=configs/barcodebert.py:paper", "--config.mesh.data=1", "--config.mesh.fsdp=8",
                   "--config.pretrain.train.batch_size=100"],
                  {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("run.py: config.pretrain.train.batch_size=100 is not divisible"), out.stderr[-3000:]
    assert "mesh data=1, fsdp=8, tensor=1" in lines[-1] and "the nearest valid batch is 96" in lines[-1]


def test_validate_batch_names_the_mesh_and_the_nearest_valid_batch():
    with pytest.raises(ValueError) as e:
        mesh_lib.validate_batch(2000, {"data": 1, "fsdp": 64, "tensor": 1})
    text = str(e.value)
    assert "\n" not in text and "config.train.batch_size=2000" in text and "mesh data=1, fsdp=64, tensor=1" in text
    assert "the nearest valid batch is 1984 (multiples of 64: 1984, 2048)" in text
    with pytest.raises(ValueError, match=r"multiple of 32: the nearest is 64"):
        mesh_lib.validate_batch(72, {"data": 1, "fsdp": 8, "tensor": 1}, accum_steps=4)  # microbatch 18
    assert [mesh_lib.nearest_multiple(b, 8) for b in (1, 4, 5, 12, 100)] == [8, 8, 8, 8, 96]


def test_fit_advice_names_one_setting():
    common = dict(batch=2000, accum=1, batch_shards=8)
    assert "remat=True and scan_layers=True on the encoders image.encoder" in loop.fit_advice(
        100 * GiB, GiB, 72 * GiB, encoders=["image.encoder"], **common)
    assert "config.train.accum_steps to 2 " in loop.fit_advice(100 * GiB, GiB, 72 * GiB, encoders=[], **common)
    assert "config.mesh.fsdp" in loop.fit_advice(100 * GiB, 80 * GiB, 72 * GiB, encoders=[], **common)
    assert "lower config.train.batch_size" in loop.fit_advice(100 * GiB, GiB, 72 * GiB, encoders=[], batch=8, accum=1,
                                                                batch_shards=8)


def test_device_memory_override_and_bad_values(monkeypatch):
    monkeypatch.setenv(loop.DEVICE_MEMORY_ENV, "80")
    assert loop.device_memory() == (80 * GiB, f"{loop.DEVICE_MEMORY_ENV}=80")
    monkeypatch.setenv(loop.DEVICE_MEMORY_ENV, "lots")
    with pytest.raises(ValueError, match="expected a memory size per device in GiB"):
        loop.device_memory()
    monkeypatch.delenv(loop.DEVICE_MEMORY_ENV)
    if jax.default_backend() == "cpu":
        assert loop.device_memory()[0] is None  # the CPU reports no limit: the check is skipped


def _tiny(scan: bool) -> kmer_bert.KmerBertConfig:
    return kmer_bert.get_variant("tiny", scan_layers=scan)


def test_unrolled_weights_load_into_a_scanned_encoder_and_back():
    ids = np.random.default_rng(0).integers(2, 60, (2, 20)).astype(np.int32)
    mask = np.ones_like(ids, bool)
    unrolled = kmer_bert.KmerBert(_tiny(False), rngs=nnx.Rngs(0))
    scanned = kmer_bert.KmerBert(_tiny(True), rngs=nnx.Rngs(1))
    towers.load_params(scanned, nnx.state(unrolled, nnx.Param), "encoder")
    unrolled.eval(), scanned.eval()
    np.testing.assert_allclose(np.asarray(scanned(ids, mask)[0]), np.asarray(unrolled(ids, mask)[0]), atol=1e-5)
    back = kmer_bert.KmerBert(_tiny(False), rngs=nnx.Rngs(2))
    towers.load_params(back, nnx.state(scanned, nnx.Param), "encoder")
    back.eval()
    np.testing.assert_allclose(np.asarray(back(ids, mask)[0]), np.asarray(unrolled(ids, mask)[0]), atol=1e-5)


def test_match_layer_layout_leaves_other_entries_alone():
    like = {"encoder": {"layers": {"w": np.zeros((3, 2))}}, "head": {"b": np.zeros(2)}}
    pure = {"encoder": {"layers": {i: {"w": np.full(2, i)} for i in range(3)}}, "head": {"b": np.ones(2)}}
    out = layers.match_layer_layout(pure, like)
    np.testing.assert_array_equal(out["encoder"]["layers"]["w"], [[0, 0], [1, 1], [2, 2]])
    assert out["head"]["b"] is pure["head"]["b"]
    again = layers.match_layer_layout(out, pure)
    np.testing.assert_array_equal(again["encoder"]["layers"][2]["w"], [2, 2])


def test_the_paper_configs_scanned_towers_take_unrolled_pretrained_weights(tmp_path):
    """CLIBD paper turns remat + scan_layers on (to fit 80 GiB on fsdp=8) while its pretrained
    encoders come unrolled from the converters: they load into the stacked layers, by
    ``build_model`` and by the train loop's warm start, to the same numbers."""
    import types

    from safetensors.numpy import save_file

    from bioscan_jax.convert import hf_vit
    from bioscan_jax.models import vit
    from bioscan_jax.tasks.clibd import training as clibd_train
    from bioscan_jax.train import optim, state as state_lib
    from configs import clibd as clibd_config

    shape = dict(patch_size=16, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64, layer_norm_eps=1e-6)
    source = vit.ViT(vit.get_variant("Ti/16", image_size=32, **shape), rngs=nnx.Rngs(0))
    save_file(hf_vit.export_timm_vit(source), str(tmp_path / "vit.safetensors"))
    built = []
    for fit in ({}, dict(remat=True, scan_layers=True)):
        c = clibd_config.get_config("tiny")
        c.model.modalities = "image,dna"
        c.model.image = dict(variant="Ti/16", init=str(tmp_path / "vit.safetensors"), init_format="timm",
                             overrides=dict(**shape, **fit))
        c.data.image_size = 32
        setup = types.SimpleNamespace(model_config=clibd_train.model_config(c))
        pretrained = clibd_train.pretrained_encoders(c, setup, workdir="")
        built.append((setup, pretrained, clibd_train.build_model(setup, pretrained, nnx.Rngs(0))))
    (_, _, unrolled), (scanned_setup, pretrained, scanned) = built
    assert towers.encoder_of(scanned, "image").encoder.scan
    nnx.update(scanned.image.projection, nnx.state(unrolled.image.projection))
    images = np.random.default_rng(0).random((2, 32, 32, 3)).astype(np.float32)
    unrolled.eval(), scanned.eval()
    a, _ = unrolled.embed("image", {"image": images}, deterministic=True)
    b, _ = scanned.embed("image", {"image": images}, deterministic=True)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)

    # the train loop's path: warm start of a scanned model's state from the unrolled encoder
    tx, _ = optim.make_optimizer(clibd_config.get_config("tiny").optim, total_steps=10, global_batch=8)
    factory = clibd_train.model_factory(scanned_setup.model_config)
    setup = state_lib.abstract_train_state(factory, tx, mesh_lib.make_mesh({"data": 1}, jax.devices()[:1]))
    st = state_lib.warm_start(setup, state_lib.init_train_state(setup, factory, tx), clibd_train.warm_start(pretrained))
    warm = towers.encoder_of(setup.merge(st), "image").encoder
    want = layers.layer_params(towers.encoder_of(unrolled, "image").encoder)
    for got, expected in zip(layers.layer_params(warm), want):
        jax.tree.map(np.testing.assert_array_equal, got, expected)
