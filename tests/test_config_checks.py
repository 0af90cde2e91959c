"""Config values are checked before any data are built, and every error names the full field path."""

from __future__ import annotations

import importlib
import math
import pathlib
import subprocess
import sys
import time

import pytest

from bioscan_jax import config_errors

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(module: str, variant: str | None = None, **values):
    config = importlib.import_module(f"configs.{module}").get_config(variant)
    for path, value in values.items():
        *head, last = path.split("__")
        section = config
        for name in head:
            section = section[name]
        section[last] = value
    return config


@pytest.mark.parametrize("module", ["barcodebert", "clibd", "zsc"])
def test_every_shipped_variant_passes(module):
    for variant in importlib.import_module(f"configs.{module}").VARIANTS:
        config_errors.check_config(_config(module, variant))


@pytest.mark.parametrize("module, field, value, message", [
    ("barcodebert", "pretrain__optim__lr", math.nan, "config.pretrain.optim.lr = nan: must be a finite number > 0"),
    ("barcodebert", "pretrain__optim__lr", math.inf, "config.pretrain.optim.lr = inf: must be a finite number > 0"),
    ("barcodebert", "finetune__optim__lr", 0.0, "config.finetune.optim.lr = 0.0: must be a finite number > 0"),
    ("barcodebert", "pretrain__optim__weight_decay", -0.1,
     "config.pretrain.optim.weight_decay = -0.1: must be a finite number >= 0"),
    ("barcodebert", "pretrain__optim__warmup_frac", 1.0,
     "config.pretrain.optim.warmup_frac = 1.0: must be a finite number in [0, 1)"),
    ("barcodebert", "pretrain__mask_prob", 1.5, "config.pretrain.mask_prob = 1.5: must be a finite number in [0, 1]"),
    ("barcodebert", "pretrain__mask_prob", math.nan, "config.pretrain.mask_prob = nan: must be a finite number in [0, 1]"),
    ("barcodebert", "pretrain__train__batch_size", 0,
     "config.pretrain.train.batch_size = 0: must be a positive integer"),
    ("barcodebert", "finetune__train__steps", -3, "config.finetune.train.steps = -3: must be an integer >= 0"),
    ("barcodebert", "probe__linear_lr", math.nan, "config.probe.linear_lr = nan: must be a finite number > 0"),
    ("clibd", "loss__init_log_scale", math.inf, "config.loss.init_log_scale = inf: must be a finite number"),
    ("clibd", "optim__lr", math.nan, "config.optim.lr = nan: must be a finite number > 0"),
    ("clibd", "dna_pretrain__train__batch_size", -64,
     "config.dna_pretrain.train.batch_size = -64: must be a positive integer"),
    ("zsc", "clibd__optim__b2", 1.0, "config.clibd.optim.b2 = 1.0: must be a finite number in [0, 1)"),
    ("zsc", "barcodebert__pretrain__optim__lr", math.nan,
     "config.barcodebert.pretrain.optim.lr = nan: must be a finite number > 0"),
])
def test_a_bad_value_is_one_line_naming_the_full_path_the_value_and_the_range(module, field, value, message):
    with pytest.raises(config_errors.ConfigValueError) as e:
        config_errors.check_config(_config(module, **{field: value}))
    assert str(e.value) == message


def test_several_bad_values_report_the_first_and_count_the_rest():
    config = _config("barcodebert", pretrain__optim__lr=math.nan, finetune__optim__lr=math.nan)
    assert sorted(config_errors.value_problems(config)) == [
        "config.finetune.optim.lr = nan: must be a finite number > 0",
        "config.pretrain.optim.lr = nan: must be a finite number > 0"]
    with pytest.raises(config_errors.ConfigValueError, match=r"must be a finite number > 0 \(and 1 more\)$"):
        config_errors.check_config(config)


@pytest.mark.parametrize("module, field, value, message", [
    ("barcodebert", "pretrain__train__accum_steps", 3,
     "config.pretrain.train.accum_steps=3 does not divide config.pretrain.train.batch_size=64"),
    ("barcodebert", "finetune__train__epochs", 0,
     "set config.finetune.train.steps (> 0) or config.finetune.train.epochs (> 0)"),
    ("barcodebert", "pretrain__optim__schedule", "linear", "config.pretrain.optim.schedule='linear' is unknown"),
    ("clibd", "dna_pretrain__train__log_every", 0, "config.dna_pretrain.train.log_every = 0: must be a positive integer"),
    ("zsc", "clibd__train__accum_steps", 3,
     "config.clibd.train.accum_steps=3 does not divide config.clibd.train.batch_size=128"),
])
def test_the_train_loop_checks_of_each_stage_name_the_full_path(module, field, value, message):
    with pytest.raises(config_errors.ConfigValueError) as e:
        config_errors.check_config(_config(module, **{field: value}))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_qualify_names_the_stage_and_the_mesh_owner():
    message = "config.train.batch_size=7 is not divisible by the batch shards data*fsdp=8; fix config.mesh.data"
    assert config_errors.qualify(message, "config.pretrain") == (
        "config.pretrain.train.batch_size=7 is not divisible by the batch shards data*fsdp=8; fix config.mesh.data")
    assert config_errors.qualify(message, "config.clibd", "config.clibd").endswith("fix config.clibd.mesh.data")


def test_a_stage_the_task_does_not_run_is_not_checked_for_its_structure():
    config = _config("barcodebert", pretrain__train__accum_steps=3, stages="finetune,probes")
    config_errors.check_config(config)  # pretraining is not run: its batch split does not matter
    with pytest.raises(config_errors.ConfigValueError, match=r"config\.pretrain\.optim\.lr = nan"):
        config_errors.check_config(_config("barcodebert", pretrain__optim__lr=math.nan, stages="finetune"))


def test_run_py_refuses_a_nan_learning_rate_in_seconds_before_any_data(tmp_path):
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "run.py", "--config=configs/barcodebert.py", "--config.pretrain.optim.lr=nan",
                          f"--workdir={tmp_path / 'work'}", f"--config.data.data_dir={tmp_path / 'tfds'}"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - t0
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1] == "run.py: config.pretrain.optim.lr = nan: must be a finite number > 0"
    assert seconds < 30
    assert not (tmp_path / "tfds").exists() and not (tmp_path / "work").exists()  # nothing built or written
