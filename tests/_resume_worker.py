"""Subprocess body of tests/test_resume.py: one (possibly resumed, possibly killed) training run.

    python _resume_worker.py WORKDIR STEPS [PAUSE_AFTER [DELAY]]

Trains the tiny model (dropout on, so the RNG state matters) with checkpoints every 2 steps.
Batches handed to the loop are appended to WORKDIR/batches.jsonl; with PAUSE_AFTER=N the run
blocks right after the step-N checkpoint (touching WORKDIR/paused) until it is killed (PAUSE_AFTER=-1:
never); DELAY seconds per batch give a signal time to arrive mid-run. A stop by SIGINT/SIGTERM
exits with the loop's exit code (128 + the signal) and its one line on stderr. At the end
the parameters go to WORKDIR/params.npz and the start/end steps to WORKDIR/result.json.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import _train_tiny as T  # noqa: E402
from bioscan_jax.train import loop  # noqa: E402

BATCH = 8


def main():
    workdir, steps = sys.argv[1], int(sys.argv[2])
    pause_after = int(sys.argv[3]) if len(sys.argv) > 3 and int(sys.argv[3]) >= 0 else None
    delay = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    os.makedirs(workdir, exist_ok=True)
    config = T.tiny_config(steps=steps, batch_size=BATCH)

    def data_iter_factory():
        return T.RecordingIterator(iter(T.dataset(BATCH)), log_path=os.path.join(workdir, "batches.jsonl"),
                                   pause_after=pause_after, marker=os.path.join(workdir, "paused"), delay=delay)

    try:
        result = loop.train(config, workdir, model_factory=T.model_factory(0.1), loss_fn=T.loss_fn,
                            data_iter_factory=data_iter_factory)
    except loop.TrainingInterrupted as e:
        print(e, file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    params = {jax.tree_util.keystr(p): np.asarray(x)
              for p, x in jax.tree_util.tree_flatten_with_path(jax.device_get(result.state["params"]))[0]}
    np.savez(os.path.join(workdir, "params.npz"), **params)
    with open(os.path.join(workdir, "result.json"), "w") as f:
        json.dump({"start": result.start_step, "end": result.step}, f)


if __name__ == "__main__":
    main()
