"""Multi-process training on one machine: 2 processes × 4 fake CPU devices vs 1 process × 8.

The runs (``tests/_mp_worker.py`` under ``python -m bioscan_jax.launch``), shared by the tests:

1. ``die``: 2 processes start BarcodeBERT pretraining; process 1 exits with code 7 before step 3.
   The launcher must stop process 0 and exit with 7 at once.
2. ``train`` (2 processes, same directory): BarcodeBERT resumes from the last complete
   checkpoint and finishes 3 steps; CLIBD (tiny image + DNA towers) trains 3 steps; the encoder
   embeds a split (each process its shard, gathered); the checkpoint is restored on a
   ``fsdp=4 × tensor=2`` mesh.
3. ``train`` (1 process, 8 devices): the reference, fed the same global batches (it runs
   concurrently with 1 and 2).
4. ``mismatch``: the processes hold different configs and must refuse to start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from bioscan_jax import launch

pytestmark = pytest.mark.slow  # multi-process jobs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "_mp_worker.py")
STEPS = 3
RTOL = 1e-5


def _launch(args, out_dir, mode, *, env_extra=None, timeout=300):
    """Run the launcher; return (exit code, output lines with arrival times, seconds)."""
    env = dict(os.environ)
    # Fast CPU compiles (both runs use the same flags, so their numerics agree) and a compile
    # cache shared by the 2-process runs.
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(os.path.dirname(out_dir), "jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "bioscan_jax.launch", *args, "--", WORKER, out_dir, mode]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append((time.monotonic() - t0, line.rstrip("\n")))
    rc = proc.wait(timeout=timeout)
    return rc, lines, time.monotonic() - t0


def _text(lines):
    return "\n".join(line for _, line in lines)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mp") / "out")
    os.makedirs(out)
    two = ["--processes", "2", "--devices-per-process", "4", "--init-timeout", "60", "--heartbeat-timeout", "10"]
    result = {"out": out}
    ref = threading.Thread(target=lambda: result.setdefault(
        "ref", _launch(["--processes", "1", "--devices-per-process", "8"], out, "train")))
    ref.start()
    result["die"] = _launch(two, out, "die")
    result["multi"] = _launch(two, out, "train")
    ref.join()
    assert result["multi"][0] == 0, _text(result["multi"][1])[-6000:]
    assert result["ref"][0] == 0, _text(result["ref"][1])[-6000:]
    return result


def _load(out, run, name):
    path = os.path.join(out, run, name)
    if name.endswith(".json"):
        with open(path) as f:
            return json.load(f)
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _losses(out, run, task):
    """Loss per step from process 0's metrics.jsonl (the last record of a step wins: a resumed
    run logs again the steps after its checkpoint)."""
    by_step = {}
    with open(os.path.join(out, run, task, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "loss" in rec:
                by_step[rec["step"]] = rec["loss"]
    return [by_step[s] for s in range(1, STEPS + 1)]


def _ids(out, run, task, process, mode):
    path = os.path.join(out, run, f"{task}_ids_p{process}_{mode}.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _split_key_bias(params):
    """Attention key biases apart: their exact gradient is 0 (softmax is invariant to them), so
    Adam turns the round-off of their gradient into updates of up to ``lr`` per step, whose sign
    depends on the summation order of the all-reduce (in-process vs gloo)."""
    out, key_bias = {}, {}
    for k, v in params.items():
        if k.endswith("['qkv']['bias']"):
            key_bias[k] = v[1]
            v = np.delete(v, 1, axis=0)
        out[k] = v
    return out, key_bias


def _max_rel_diff(a, b):
    scale = max(float(np.abs(v).max()) for v in b.values())
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in b) / scale


# ----------------------------------------------------------------------------- launcher


def test_launcher_environment():
    env = launch.process_env(1, 2, port=1234, devices_per_process=4, init_timeout=60, heartbeat_timeout=10,
                             base={"XLA_FLAGS": "--foo --xla_force_host_platform_device_count=8"})
    assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:1234"
    assert (env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"]) == ("2", "1")
    assert env["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=4"
    assert env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] == "gloo"
    assert (env["BIOSCAN_INIT_TIMEOUT_S"], env["BIOSCAN_HEARTBEAT_TIMEOUT_S"]) == ("60", "10")
    single = launch.process_env(0, 1, port=1, devices_per_process=8, init_timeout=1, heartbeat_timeout=1,
                                base={"JAX_PROCESS_ID": "3"})
    assert "JAX_COORDINATOR_ADDRESS" not in single and "JAX_PROCESS_ID" not in single
    with pytest.raises(SystemExit):
        launch.parse_args(["--processes", "2"])  # no program


def test_launcher_fails_fast_with_a_clear_message(tmp_path):
    script = tmp_path / "one_fails.py"
    script.write_text(
        "import os, sys, time\n"
        "if os.environ['JAX_PROCESS_ID'] == '1':\n"
        "    print('bye'); sys.exit(5)\n"
        "time.sleep(120)\n")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "bioscan_jax.launch", "-n", "3", "-d", "1", "--", str(script)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - t0 < 30
    assert proc.returncode == 5
    assert "[1] bye" in proc.stdout
    assert "process 1" in proc.stderr and "exited with code 5" in proc.stderr
    assert "stopping the other processes [0, 2]" in proc.stderr


# ----------------------------------------------------------------------------- failure and resume


def test_dead_process_stops_the_others(runs):
    rc, lines, _ = runs["die"]
    text = _text(lines)
    assert rc == 7, text[-4000:]
    assert "process 1 (pid" in text and "exited with code 7" in text
    died = next(t for t, line in lines if "exiting on purpose" in line)
    assert lines[-1][0] - died < 20, "the launcher took too long to stop the surviving process"


def test_restart_resumes_from_last_complete_checkpoint(runs):
    out = runs["out"]
    result = _load(out, "multi", "bert_result.json")
    assert 1 <= result["start"] <= 2 and result["end"] == STEPS
    # Steps before the restart come from the killed run, the rest from the restarted one; the
    # batches are exactly the uninterrupted reference's.
    start = result["start"]
    ref = _ids(out, "ref", "bert", 0, "train")
    for p in (0, 1):
        seen = _ids(out, "multi", "bert", p, "die")[:start] + _ids(out, "multi", "bert", p, "train")
        assert len(seen) == STEPS
        for step, rows in enumerate(seen):
            assert set(rows) <= set(ref[step])


# ----------------------------------------------------------------------------- equality with one process


@pytest.mark.parametrize("task", ["bert", "clibd"])
def test_losses_and_params_match_single_process(runs, task):
    out = runs["out"]
    multi, ref = _losses(out, "multi", task), _losses(out, "ref", task)
    np.testing.assert_allclose(multi, ref, rtol=RTOL)
    multi, multi_kb = _split_key_bias(_load(out, "multi", f"{task}_params.npz"))
    ref, ref_kb = _split_key_bias(_load(out, "ref", f"{task}_params.npz"))
    diff = _max_rel_diff(multi, ref)
    assert diff < RTOL, diff
    lr = 1e-3
    for k in ref_kb:  # bounded by Adam's step size: lr per step
        assert np.abs(multi_kb[k] - ref_kb[k]).max() <= 2 * lr * STEPS, k


@pytest.mark.parametrize("task", ["bert", "clibd"])
def test_each_process_reads_only_its_shard(runs, task):
    out = runs["out"]
    mode = "train"
    start = _load(out, "multi", f"{task}_result.json")["start"]
    ref = _ids(out, "ref", task, 0, "train")
    per_process = []
    for p in (0, 1):
        early = _ids(out, "multi", task, p, "die")[:start] if start else []
        per_process.append(early + _ids(out, "multi", task, p, mode))
    all0 = {i for rows in per_process[0] for i in rows}
    all1 = {i for rows in per_process[1] for i in rows}
    assert all0 and all1 and not all0 & all1, "the processes read overlapping records"
    for step in range(STEPS):
        a, b = per_process[0][step], per_process[1][step]
        assert len(a) == len(b) == 8
        assert sorted(a + b) == sorted(ref[step]), f"step {step + 1}: union differs from the reference batch"


def test_restore_on_a_different_mesh(runs):
    out = runs["out"]
    for run in ("multi", "ref"):  # saved on data=8, restored on fsdp=4 x tensor=2 (2 processes / 1)
        saved = _load(out, run, "bert_params.npz")
        info = _load(out, run, "restored.json")
        assert info["step"] == STEPS
        restored = _load(out, run, "restored_params.npz")
        assert restored.keys() == saved.keys()
        for k in saved:
            np.testing.assert_array_equal(restored[k], saved[k], err_msg=k)
        specs = set(info["specs"].values()) | set(info["mu_specs"].values())
        assert any("fsdp" in s for s in specs) and any("tensor" in s for s in specs), specs


def test_embeddings_gathered_across_processes(runs):
    out = runs["out"]
    e0, e1 = _load(out, "multi", "embed_p0.npz"), _load(out, "multi", "embed_p1.npz")
    ref = _load(out, "ref", "embed_p0.npz")
    for k in e0:
        np.testing.assert_array_equal(e0[k], e1[k])  # every process holds the whole result
    # Each process embedded its own records; the gathered result is in source order, as in one process.
    assert e0["index"].tolist() == ref["index"].tolist() == list(range(37))
    np.testing.assert_array_equal(e0["processid"], ref["processid"])
    np.testing.assert_allclose(e0["embedding"], ref["embedding"], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- bad start-up


def test_mismatched_configs_are_refused(tmp_path):
    out = str(tmp_path / "out")
    os.makedirs(out)
    rc, lines, seconds = _launch(["-n", "2", "-d", "1", "--init-timeout", "60"], out, "mismatch")
    text = _text(lines)
    assert rc != 0, text[-3000:]
    assert "config differs across the 2 processes" in text
    assert "passed unexpectedly" not in text


def test_main_job_prints_the_same_table_on_one_process_and_on_two(tmp_path):
    """The BarcodeBERT main job (reduced steps) as 1 process x 8 devices and as 2 processes x 4:
    the global batches, their masks and offsets do not depend on the process count (one global
    order, per-record random keys), so the summary tables are identical."""
    reduced = ["--config=configs/barcodebert.py", "--config.pretrain.train.steps=8", "--config.pretrain.train.epochs=0",
               "--config.finetune.train.steps=8", "--config.finetune.train.epochs=0", "--config.probe.linear_epochs=3",
               "--config.pretrain.train.progress_bar=False", "--config.finetune.train.progress_bar=False",
               f"--config.data.data_dir={tmp_path / 'tfds'}"]
    env = dict(os.environ, BIOSCAN_JAX_COMPILATION_CACHE="off")
    tables = []
    for processes, devices in ((1, 8), (2, 4)):
        workdir = tmp_path / f"w{processes}"
        proc = subprocess.run([sys.executable, "-m", "bioscan_jax.launch", "--processes", str(processes),
                               "--devices-per-process", str(devices), "--", "run.py", f"--workdir={workdir}", *reduced],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        tables.append((workdir / "summary.md").read_text())
    assert tables[0] == tables[1], tables
    assert "1-NN genus accuracy" in tables[0]
