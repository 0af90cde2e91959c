r"""Step time of the tiny BarcodeBERT pretraining step: 1 process × 8 devices vs 2 processes × 4.

    python benchmarks/multiprocess_benchmark.py [--steps 20] [--batch 64] [--layouts 1x8,2x4]

Each layout runs under ``python -m bioscan_jax.launch`` (fake CPU devices, gloo collectives
between processes) with the same global mesh ``data=8``, model, batch and program; only the
process layout differs. Prints one JSON line per layout (process 0's timings) and one line with
the multi-process overhead relative to the first layout:

* ``step_ms_median`` / ``step_ms_p90``: a full train step as the loop runs it
  (``to_global_batch`` from process-local numpy + jitted step + waiting for the result);
* ``input_ms_median``: ``to_global_batch`` alone;
* ``allreduce_ms_median``: a ``psum`` over all 8 devices of an array the size of the
  parameters (the gradient all-reduce of data parallelism);
* ``first_step_s``: compile + first step.

On one machine both layouts share the same cores, so the difference is the cost of crossing
processes (gloo over TCP loopback instead of in-process copies) and of two Python processes; on
a real pod each process has its own host, and the inter-host network sets the collective cost.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(steps: int, batch: int) -> None:
    sys.path.insert(0, ROOT)
    from bioscan_jax import sharding as mesh_lib

    mesh_lib.maybe_initialize_distributed()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from bioscan_jax.models import kmer_bert
    from bioscan_jax.train import losses
    from bioscan_jax.train.state import create_train_state
    from bioscan_jax.train.step import make_train_step

    cfg = kmer_bert.get_variant("tiny")
    mesh = mesh_lib.make_mesh({"data": 8})
    tx = optax.adamw(1e-4)
    setup, state = create_train_state(lambda rngs: kmer_bert.KmerBertForMLM(cfg, rngs=rngs), tx, mesh)
    step = make_train_step(setup, losses.mlm_loss, tx)
    local = batch // jax.process_count()
    tokens = cfg.max_tokens
    rng = np.random.default_rng(jax.process_index())

    def local_batch():
        return {"ids": rng.integers(2, cfg.vocab_size, (local, tokens)).astype(np.int32),
                "attention_mask": np.ones((local, tokens), bool),
                "targets": rng.integers(0, cfg.num_labels, (local, tokens)).astype(np.int32),
                "mlm_mask": rng.random((local, tokens)) < 0.5}

    t0 = time.perf_counter()
    state, metrics = step(state, mesh_lib.to_global_batch(local_batch(), mesh))
    jax.block_until_ready(metrics)
    first = time.perf_counter() - t0
    for _ in range(2):  # warm-up
        state, metrics = step(state, mesh_lib.to_global_batch(local_batch(), mesh))
    jax.block_until_ready(metrics)
    step_ms, input_ms = [], []
    for _ in range(steps):
        host = local_batch()
        t0 = time.perf_counter()
        global_batch = mesh_lib.to_global_batch(host, mesh)
        t1 = time.perf_counter()
        state, metrics = step(state, global_batch)
        jax.block_until_ready(metrics)
        t2 = time.perf_counter()
        input_ms.append(1e3 * (t1 - t0))
        step_ms.append(1e3 * (t2 - t0))

    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    grads = jax.device_put(jnp.zeros((8, n_params), jnp.float32), NamedSharding(mesh, P(("data", "fsdp"))))
    allreduce = jax.jit(lambda g: g.sum(axis=0), out_shardings=NamedSharding(mesh, P()))
    jax.block_until_ready(allreduce(grads))
    reduce_ms = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(allreduce(grads))
        reduce_ms.append(1e3 * (time.perf_counter() - t0))

    if jax.process_index() == 0:
        q = statistics.quantiles(step_ms, n=10)
        print("RESULT " + json.dumps({
            "benchmark": "multiprocess_step", "model": "kmer_bert tiny (MLM)", "processes": jax.process_count(),
            "devices_per_process": jax.local_device_count(), "mesh": dict(mesh.shape), "global_batch": batch,
            "tokens": tokens, "params": int(n_params), "steps": steps,
            "step_ms_median": statistics.median(step_ms), "step_ms_p90": q[-1],
            "input_ms_median": statistics.median(input_ms), "allreduce_ms_median": statistics.median(reduce_ms),
            "first_step_s": first, "loss": float(metrics["loss"])}), flush=True)


def run_layout(processes: int, devices: int, steps: int, batch: int) -> dict:
    cmd = [sys.executable, "-m", "bioscan_jax.launch", "--processes", str(processes), "--devices-per-process",
           str(devices), "--", os.path.abspath(__file__), "--worker", "--steps", str(steps), "--batch", str(batch)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    lines = [line.split("RESULT ", 1)[1] for line in proc.stdout.splitlines() if "RESULT " in line]
    if proc.returncode or not lines:
        raise RuntimeError(f"{processes}x{devices} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    out = json.loads(lines[0])
    out["wall_s"] = wall
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--layouts", default="1x8,2x4", help="processes x devices per process, comma separated")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.steps, args.batch)
        return
    results = []
    for layout in args.layouts.split(","):
        processes, devices = (int(x) for x in layout.split("x"))
        result = run_layout(processes, devices, args.steps, args.batch)
        results.append(result)
        print(json.dumps(result), flush=True)
    base = results[0]
    for r in results[1:]:
        print(json.dumps({
            "benchmark": "multiprocess_overhead", "baseline": f"{base['processes']}x{base['devices_per_process']}",
            "layout": f"{r['processes']}x{r['devices_per_process']}",
            "step_overhead_ms": r["step_ms_median"] - base["step_ms_median"],
            "step_ratio": r["step_ms_median"] / base["step_ms_median"],
            "allreduce_ratio": r["allreduce_ms_median"] / base["allreduce_ms_median"],
            "input_overhead_ms": r["input_ms_median"] - base["input_ms_median"]}), flush=True)


if __name__ == "__main__":
    main()
