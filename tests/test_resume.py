"""Resume after a real kill, damaged checkpoints, and the non-finite-loss stop."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import _train_tiny as T
from bioscan_jax.train import loop
from bioscan_jax import sharding as mesh_lib
from bioscan_jax.checkpoint import Checkpointer, NoUsableCheckpointError
from bioscan_jax.train.metrics import read_metrics
from bioscan_jax.train.optim import make_optimizer
from bioscan_jax.train.state import abstract_train_state

# A failed tensorstore read (damaged checkpoint) can leave an asyncio callback behind: harmless.
pytestmark = [pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
              pytest.mark.slow]  # kill-and-resume runs in subprocesses

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent
STEPS = 8
KILL_AFTER = 4
BATCH = 8  # as in _resume_worker.py


def _flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def _worker_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), env.get("PYTHONPATH", "")])
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env.pop("XLA_FLAGS", None)
    return env


def _run_worker(workdir, steps, pause_after=None):
    args = [sys.executable, str(TESTS / "_resume_worker.py"), str(workdir), str(steps)]
    if pause_after is not None:
        args.append(str(pause_after))
    return subprocess.Popen(args, env=_worker_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _batches(workdir):
    with open(os.path.join(workdir, "batches.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_killed_run_resumes_to_the_same_result(tmp_path):
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    ref = _run_worker(ref_dir, STEPS)
    victim = _run_worker(run_dir, STEPS, pause_after=KILL_AFTER)
    # Wait until the step-KILL_AFTER checkpoint is complete and the run is inside step KILL_AFTER+1.
    marker, ckpt = run_dir / "paused", run_dir / "checkpoints" / str(KILL_AFTER)
    deadline = time.time() + 300
    while not (marker.exists() and ckpt.is_dir()):
        assert victim.poll() is None, victim.communicate()[1][-3000:]
        assert time.time() < deadline, "the run never reached the kill point"
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    assert not (run_dir / "params.npz").exists()
    killed_batches = _batches(run_dir)
    assert len(killed_batches) == KILL_AFTER

    resumed = _run_worker(run_dir, STEPS)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    out, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-3000:]

    result = json.loads((run_dir / "result.json").read_text())
    assert result == {"start": KILL_AFTER, "end": STEPS}
    ref_batches = _batches(ref_dir)
    assert len(ref_batches) == STEPS
    # Same batches: the grain iterator position was restored with the state.
    assert _batches(run_dir) == ref_batches
    # Same parameters (model RNG streams and optimizer state restored too).
    a, b = np.load(ref_dir / "params.npz"), np.load(run_dir / "params.npz")
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-7, err_msg=k)
    # Metrics continue in the same file: steps 2..8 logged once each after the resume.
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps[-2:] == [6, 8]


# -- damaged checkpoints -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A finished 6-step run with checkpoints 2, 4, 6, and its final parameters."""
    workdir = tmp_path_factory.mktemp("pristine")
    config = T.tiny_config(steps=6, batch_size=BATCH)
    result = loop.train(config, workdir, model_factory=T.model_factory(0.1), loss_fn=T.loss_fn,
                        data_iter_factory=T.data_iter_factory(BATCH))
    return workdir, config, _flat(result.state["params"])


def _abstract(config):
    mesh = mesh_lib.make_mesh(config.mesh)
    tx, _ = make_optimizer(config.optim, total_steps=config.train.steps, global_batch=config.train.batch_size)
    return abstract_train_state(T.model_factory(0.1), tx, mesh, config.sharding_rules, seed=config.seed)


def _truncate_arrays(step_dir):
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    assert files
    for p in files:
        with open(p, "r+b") as f:
            f.truncate(max(p.stat().st_size // 3, 1))


def _delete_metadata(step_dir):
    (step_dir / "state" / "_METADATA").unlink()
    for p in (step_dir / "state").rglob("manifest.ocdbt"):
        p.unlink()


def _delete_iterator_state(step_dir):
    for p in (step_dir / "data").glob("*.json"):
        p.unlink()


@pytest.mark.parametrize("damage", [_truncate_arrays, _delete_metadata, _delete_iterator_state])
def test_damaged_latest_checkpoint_is_skipped(pristine, tmp_path, caplog, damage):
    src, config, _ = pristine
    workdir = tmp_path / "run"
    shutil.copytree(src, workdir)
    damage(workdir / "checkpoints" / "6")
    setup = _abstract(config)
    it = T.RecordingIterator(iter(T.dataset(BATCH)))
    ckpt = Checkpointer(workdir / "checkpoints")
    with caplog.at_level(logging.WARNING, logger="bioscan_jax.checkpoint"):
        state, step = ckpt.restore(setup.abstract_state, it)
    ckpt.close()
    assert step == 4
    assert int(state["step"]) == 4
    assert any("checkpoints/6 cannot be restored" in r.getMessage() for r in caplog.records), caplog.text
    # Moved out of the way (kept for inspection), so step 6 can be written again.
    assert not (workdir / "checkpoints" / "6").exists()
    assert any(p.name.startswith("6-") for p in (workdir / "checkpoints.corrupt").iterdir())
    # The iterator continues after batch 4: its next batch is the 5th of a fresh pipeline.
    fresh = iter(T.dataset(BATCH))
    expected = [next(fresh) for _ in range(5)][-1]
    np.testing.assert_array_equal(next(it)["index"], expected["index"])


def test_resume_after_damage_reaches_the_same_parameters(pristine, tmp_path):
    src, config, final_params = pristine
    workdir = tmp_path / "run"
    shutil.copytree(src, workdir)
    _truncate_arrays(workdir / "checkpoints" / "6")
    result = loop.train(config, workdir, model_factory=T.model_factory(0.1), loss_fn=T.loss_fn,
                        data_iter_factory=T.data_iter_factory(BATCH))
    assert result.start_step == 4 and result.step == 6
    got = _flat(result.state["params"])
    for k, v in final_params.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-6, atol=1e-7, err_msg=k)
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4, 6]


def test_no_usable_checkpoint_raises_and_moves_nothing(pristine, tmp_path):
    src, config, _ = pristine
    workdir = tmp_path / "run"
    shutil.copytree(src, workdir)
    for s in (2, 4, 6):
        _delete_metadata(workdir / "checkpoints" / str(s))
    ckpt = Checkpointer(workdir / "checkpoints")
    with pytest.raises(NoUsableCheckpointError, match="none of the checkpoints"):
        ckpt.restore(_abstract(config).abstract_state)
    ckpt.close()
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4", "6"]


# -- non-finite loss ---------------------------------------------------------------------------


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    config = T.tiny_config(steps=10, batch_size=BATCH)
    config.train.log_every = 3
    config.checkpoint.every = 2
    with pytest.raises(loop.NonFiniteLossError, match="at step 5") as info:
        loop.train(config, tmp_path, model_factory=T.model_factory(0.0), loss_fn=T.loss_fn,
                   data_iter_factory=T.data_iter_factory(BATCH, poison_at=5))
    err = info.value
    assert err.step == 5 and err.last_checkpoint == 4 and np.isnan(err.loss)
    assert "last good checkpoint is step 4" in str(err)
    # Checked before the step-6 save: the bad state never reached disk.
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    records = read_metrics(tmp_path)
    assert records[-1]["step"] == 5 and records[-1]["event"] == "non_finite_loss"
    assert records[-1]["loss"] == "nan"


SIGNAL_STEPS = 12


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    ref_dir = tmp_path_factory.mktemp("uninterrupted")
    ref = _run_worker(ref_dir, SIGNAL_STEPS)
    out, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-3000:]
    return ref_dir


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_checkpoints_the_current_step_and_the_next_run_resumes_there(tmp_path, uninterrupted, sig):
    """#13 item 7: a real SIGINT/SIGTERM mid-run saves the step it stopped at (whether or not it
    is a checkpoint step), exits 128 + signal with one line, and the next run resumes there to
    the uninterrupted run's parameters and batches."""
    run_dir = tmp_path / "stopped"
    args = [sys.executable, str(TESTS / "_resume_worker.py"), str(run_dir), str(SIGNAL_STEPS), "-1", "0.4"]
    victim = subprocess.Popen(args, env=_worker_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    deadline = time.time() + 300
    while not ((run_dir / "batches.jsonl").exists() and len(_batches(run_dir)) >= 3):
        assert victim.poll() is None, victim.communicate()[1][-3000:]
        assert time.time() < deadline, "the run never started training"
        time.sleep(0.05)
    os.kill(victim.pid, sig)
    out, err = victim.communicate(timeout=120)
    assert victim.returncode == 128 + sig, err[-3000:]
    stopped_at = len(_batches(run_dir))
    assert 3 <= stopped_at < SIGNAL_STEPS
    name = signal.Signals(sig).name
    last = err.strip().splitlines()[-1]
    assert last == (f"stopped by {name} after step {stopped_at}: checkpoint {stopped_at} is in "
                    f"{run_dir}/checkpoints; run the same command again to resume"), err[-2000:]
    assert (run_dir / "checkpoints" / str(stopped_at)).is_dir()
    assert not list((run_dir / "checkpoints").glob("*tmp*"))
    assert not (run_dir / "params.npz").exists()

    resumed = _run_worker(run_dir, SIGNAL_STEPS)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert json.loads((run_dir / "result.json").read_text()) == {"start": stopped_at, "end": SIGNAL_STEPS}
    assert _batches(run_dir) == _batches(uninterrupted)
    a, b = np.load(uninterrupted / "params.npz"), np.load(run_dir / "params.npz")
    for k in a.files:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-7, err_msg=k)
