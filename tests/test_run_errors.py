"""run.py turns a bad --config flag into one line, before anything is computed."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args, message", [
    (["--config.data.finetune_splt=train"], "run.py: unknown config field 'finetune_splt'; did you mean 'finetune_split'?"),
    (["--config.nosuch.x=1"], "run.py: unknown config field 'nosuch'"),
    (["--config.probe.eval_batch_size=abc"], "invalid literal for int() with base 10: 'abc'"),
])
def test_bad_config_flags_give_one_line(args, message):
    out = subprocess.run([sys.executable, "run.py", "--config=configs/barcodebert.py", *args], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr


def test_unknown_variant_names_the_valid_ones():
    out = subprocess.run([sys.executable, "run.py", "--config=configs/barcodebert.py:hugee"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == ["run.py: Unknown variant 'hugee'; valid variants: tiny, paper, 4_12_12"]
