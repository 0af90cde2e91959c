"""Run identity: a workdir reused with other data or settings is refused, unless told otherwise."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import ml_collections
import pytest

from bioscan_jax.train import run_identity

REPO = pathlib.Path(__file__).resolve().parents[1]


def stage_config(**train):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.train = {**dict(batch_size=16, steps=4, log_every=2, progress_bar=False, tensorboard=False), **train}
    c.optim = dict(lr=1e-3)
    c.checkpoint = dict(every=2, keep=3)
    return c


def with_checkpoint(workdir):
    os.makedirs(os.path.join(workdir, "checkpoints", "4"))
    return workdir


def test_fresh_workdir_records_the_identity(tmp_path):
    identity = run_identity.stage_identity(stage_config(), {"data": {"sha256": "a"}})
    digest = run_identity.check(str(tmp_path), identity)
    stored = run_identity.read(str(tmp_path))
    assert stored["fingerprint"] == digest and stored["identity"]["data"] == {"sha256": "a"}


def test_same_identity_resumes_and_cosmetic_fields_do_not_count(tmp_path):
    workdir = str(tmp_path)
    run_identity.check(workdir, run_identity.stage_identity(stage_config(), {"data": "a"}))
    with_checkpoint(workdir)
    other_layout = stage_config(tensorboard=True)
    other_layout.train.log_every = 1
    other_layout.mesh.fsdp = 2
    other_layout.checkpoint.every = 100
    run_identity.check(workdir, run_identity.stage_identity(other_layout, {"data": "a"}))  # no error


def test_other_data_is_refused_naming_what_differs_and_the_remedies(tmp_path):
    workdir = str(tmp_path)
    run_identity.check(workdir, run_identity.stage_identity(stage_config(), {"data": {"sha256": "aaa"}}))
    with_checkpoint(workdir)
    with pytest.raises(run_identity.RunIdentityError) as e:
        run_identity.check(workdir, run_identity.stage_identity(stage_config(), {"data": {"sha256": "bbb"}}))
    message = str(e.value)
    assert "\n" not in message
    assert 'data.sha256: "aaa" -> "bbb"' in message
    assert "--workdir" in message and "--config.resume=restart" in message and "--config.resume=force" in message


def test_other_training_settings_are_refused(tmp_path):
    workdir = str(tmp_path)
    run_identity.check(workdir, run_identity.stage_identity(stage_config(), None))
    with_checkpoint(workdir)
    changed = stage_config()
    changed.optim.lr = 1e-2
    with pytest.raises(run_identity.RunIdentityError, match="optim.lr: 0.001 -> 0.01"):
        run_identity.check(workdir, run_identity.stage_identity(changed, None))


def test_restart_deletes_the_old_run_and_force_continues_it(tmp_path):
    workdir = str(tmp_path)
    run_identity.check(workdir, run_identity.stage_identity(stage_config(), {"data": "a"}))
    with_checkpoint(workdir)
    pathlib.Path(workdir, "metrics.jsonl").write_text("{}\n")
    pathlib.Path(workdir, "notes.txt").write_text("mine")  # not a run file: kept
    new = run_identity.stage_identity(stage_config(), {"data": "b"})
    digest = run_identity.check(workdir, new, "force")
    assert run_identity.has_checkpoints(workdir)
    assert run_identity.read(workdir)["fingerprint"] == digest and run_identity.read(workdir)["forced_over"]
    old = run_identity.stage_identity(stage_config(), {"data": "a"})
    run_identity.check(workdir, old, "restart")
    assert not run_identity.has_checkpoints(workdir) and not os.path.exists(os.path.join(workdir, "metrics.jsonl"))
    assert os.path.exists(os.path.join(workdir, "notes.txt"))
    assert run_identity.read(workdir)["fingerprint"] == run_identity.fingerprint(old)


def test_checkpoints_without_an_identity_are_not_trusted(tmp_path):
    workdir = with_checkpoint(str(tmp_path))
    with pytest.raises(run_identity.RunIdentityError, match="no run_identity.json"):
        run_identity.check(workdir, run_identity.stage_identity(stage_config(), None))


def test_unknown_resume_mode():
    with pytest.raises(ValueError, match="unknown config.resume 'again'; valid: auto, restart, force"):
        run_identity.check("/nonexistent", {}, "again")


# ----------------------------------------------------------------------------- end to end

FLAGS = ["--config.stages=pretrain", "--config.pretrain.train.epochs=0", "--config.pretrain.train.steps=4",
         "--config.pretrain.train.batch_size=16", "--config.pretrain.train.log_every=1",
         "--config.pretrain.train.progress_bar=False", "--config.pretrain.train.tensorboard=False",
         "--config.data.unseen_fraction=0.25"]


def bold_run(path, workdir, *extra):
    out = subprocess.run(
        [sys.executable, "run.py", "--config=configs/barcodebert.py", "--config.data.source=bold",
         f"--config.data.path={path}", f"--workdir={workdir}", *FLAGS, *extra],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "TF_CPP_MIN_LOG_LEVEL": "3"})
    return out


def results(workdir):
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(workdir, "pretrain", "metrics.jsonl")) as f:
        losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    return {"losses": losses, "sizes": summary["split_sizes"], "identity": summary["pretrain"]["run_identity"]}


def test_workdir_reused_with_another_bold_file_is_refused_then_restarted(tmp_path, real_barcodes_path):
    """#13 item 1 end to end: file A, then file B in the same workdir (refused in < 10 s), then
    ``--config.resume=restart`` (a fresh run: the same metrics as B in an empty workdir)."""
    import pandas as pd

    frame = pd.read_csv(real_barcodes_path, sep="\t", dtype=str)
    species = sorted(frame["species_name"].unique())
    files = {}
    for name, picked in (("a", species[:12]), ("b", species[12:24])):
        files[name] = tmp_path / f"{name}.tsv"
        frame[frame["species_name"].isin(picked)].groupby("species_name").head(12).to_csv(
            files[name], sep="\t", index=False)
    workdir = tmp_path / "work"
    first = bold_run(files["a"], workdir)
    assert first.returncode == 0, first.stderr[-2000:]

    t0 = time.perf_counter()
    refused = bold_run(files["b"], workdir)
    elapsed = time.perf_counter() - t0
    assert refused.returncode == 1
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("run.py: ") and "holds checkpoints of a different run" in last, refused.stderr[-2000:]
    assert "data.sha256" in last and "--config.resume=restart" in last
    assert elapsed < 10, f"refusal took {elapsed:.1f} s"

    restarted = bold_run(files["b"], workdir, "--config.resume=restart")
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    fresh = bold_run(files["b"], tmp_path / "empty")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    again, fresh_b = results(workdir), results(tmp_path / "empty")
    assert len(again["losses"]) == 4 and again == fresh_b
