"""The memory planner: CLI parsing, a sharded plan, CLIBD with remat, and the estimate checked
against a real step on the CPU (tiny configs, so the compiles stay short)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bioscan_jax import plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 64

RUNS = {
    # BarcodeBERT tiny on a 2-D mesh: parameters split over fsdp x tensor, batch over fsdp.
    "sharded": ["--config=configs/barcodebert.py", "--mesh=fsdp=4,tensor=2", "--accelerator=v5e",
                f"--config.pretrain.train.batch_size={BATCH}"],
    # The same step on one device, run for real: estimate vs peak resident memory.
    "measured": ["--config=configs/barcodebert.py", "--mesh=data=1", f"--config.pretrain.train.batch_size={BATCH}",
                 "--measure"],
    # The sharded run with the blocks stacked and scanned.
    "scan": ["--config=configs/barcodebert.py", "--mesh=fsdp=4,tensor=2", "--accelerator=v5e", "--scan",
             f"--config.pretrain.train.batch_size={BATCH}"],
    # CLIBD (tiny image and DNA towers) with remat on an fsdp mesh.
    "clibd": ["--config=configs/clibd.py", "--mesh=fsdp=2", "--remat", "--config.train.batch_size=16",
              "--config.model.modalities=image,dna"],
}


@pytest.fixture(scope="module")
def plans():
    """Run the planner CLI for every entry of RUNS (concurrently); parsed JSON by name."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    procs = {name: subprocess.Popen([sys.executable, "-m", "bioscan_jax.plan", *args, "--json"], cwd=ROOT, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, args in RUNS.items()}
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}: {stderr[-3000:]}"
        out[name] = json.loads(stdout.strip().splitlines()[-1])
    return out


def test_parse_mesh_and_overrides():
    assert plan.parse_mesh("fsdp=64") == {"data": 1, "fsdp": 64, "tensor": 1}
    assert plan.parse_mesh("data=2,fsdp=4,tensor=2") == {"data": 2, "fsdp": 4, "tensor": 2}
    with pytest.raises(ValueError, match="axes"):
        plan.parse_mesh("pipeline=4")
    with pytest.raises(ValueError, match=">= 1"):
        plan.parse_mesh("fsdp=0")


def test_config_flags_as_run_py_parses_them():
    path = os.path.join(ROOT, "configs", "barcodebert.py")
    config = plan.load_config([f"--config={path}:paper", "--config.pretrain.train.batch_size=8",
                               "--config.model.variant=tiny"])
    assert config.pretrain.train.batch_size == 8 and config.model.variant == "tiny"
    assert config.finetune.train.batch_size == plan.load_config([f"--config={path}:paper"]).finetune.train.batch_size
    with pytest.raises(ValueError, match="unknown config field|nope"):
        plan.load_config([f"--config={path}", "--config.pretrain.train.nope=1"])


def test_cli_rejects_bad_arguments():
    proc = subprocess.run([sys.executable, "-m", "bioscan_jax.plan", "--config=configs/barcodebert.py",
                           "--mesh=fsdp=2", "--accelerator=tpu9"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "--accelerator" in proc.stderr


def test_sharded_plan(plans):
    p = plans["sharded"]
    assert p["devices"] == 8 and p["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
    assert p["per_device_batch"] == BATCH / 4
    full = 4 * p["num_params"]  # float32
    assert p["params"] < full / 2, "parameters are not sharded"
    assert p["optimizer"] >= 2 * p["params"] * 0.9  # Adam: mu and nu mirror the parameter shards
    assert p["arguments"] >= p["params"] + p["optimizer"]
    assert p["peak"] >= p["arguments"] + p["temporaries"]
    assert p["aliased"] > 0, "the donated state should be updated in place"
    assert set(p["fits"]) == {"v5e"} and p["fits"]["v5e"]


def test_batch_sharding_shrinks_activations(plans):
    # 4 batch shards: per-device temporaries well below the one-device step's (activations are
    # kept batch-sharded between blocks; without that XLA may all-gather the batch under FSDP).
    assert plans["sharded"]["temporaries"] < 0.5 * plans["measured"]["temporaries"]


def test_estimate_matches_a_real_step(plans):
    p = plans["measured"]
    m = p["measured"]
    assert m["loss"] == m["loss"]  # finite step ran
    ratio = m["total_bytes"] / p["peak"]
    assert 0.75 <= ratio <= 1.25, (ratio, m, p["peak"])


def test_clibd_plan_with_remat(plans):
    p = plans["clibd"]
    assert p["task"] == "clibd" and p["devices"] == 2
    assert any("remat=True" in n for n in p["notes"])
    assert p["peak"] > 0 and all(p["fits"].values())


def test_scanned_blocks_shard_like_the_unrolled_ones(plans):
    scanned, unrolled = plans["scan"], plans["sharded"]
    assert any("scan_layers=True" in n for n in scanned["notes"])
    assert scanned["num_params"] == unrolled["num_params"]
    # The stacked axis is replicated ('layers' -> None): each block parameter keeps its shards.
    assert scanned["params"] == pytest.approx(unrolled["params"], rel=0.02)


@pytest.mark.parametrize("config_file, stage, key", [
    ("barcodebert", "pretrain", "ids"), ("barcodebert", "finetune", "label"), ("clibd", "train", "dna_ids")])
def test_the_planner_compiles_from_the_pipelines_batch_spec(config_file, stage, key):
    """The planner's batch is the pipeline's batch spec (tests/test_pipeline.py holds it equal to
    what the pipelines yield): with the spec as declared the step traces; with a key renamed (as a
    pipeline change would rename it) the planner's step fails, naming the key the model reads."""
    import importlib

    config = importlib.import_module(f"configs.{config_file}").get_config("tiny")
    (config[stage] if config_file == "barcodebert" else config).train.batch_size = 4
    spec = plan.step_spec(config, stage=stage, num_classes=10, text_vocab=50)
    mesh = {"data": 1, "fsdp": 1, "tensor": 1}
    setup, step, batch = plan.build(config, spec, mesh)
    assert set(batch) == set(spec.batch) and key in batch
    step.jitted.lower(setup.abstract_state, batch)
    spec.batch = {("renamed_" + k if k == key else k): v for k, v in spec.batch.items()}
    setup, step, batch = plan.build(config, spec, mesh)
    with pytest.raises(KeyError, match=key):
        step.jitted.lower(setup.abstract_state, batch)
