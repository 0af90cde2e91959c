"""One CLIBD training step (three towers, contrastive loss, AdamW): time, samples/s, FLOP/s.

The step is the trainer's own (``bioscan_jax.plan.step_spec`` → ``plan.build``: model, loss,
optimizer, sharding rules, bf16 and accumulation exactly as ``run.py`` would), on a one-device
mesh of the default JAX device, from random weights and a random batch (nothing is downloaded:
the towers' ``init`` fields are not read). Prints JSON lines (``clibd_step``).

    python benchmarks/clibd_step_benchmark.py --config=configs/clibd.py:paper --config.train.batch_size=256
    python benchmarks/clibd_step_benchmark.py --config=configs/clibd.py --config.train.batch_size=4 --steps 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from _common import emit  # noqa: E402


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    config_argv = [a for a in argv if a.startswith(("--config=", "--config."))]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="--config=FILE[:ARG] and --config.<field>=<value> as for run.py")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    p.add_argument("--text-vocab", type=int, default=15_000, help="taxonomy word vocabulary (WordPiece configs: 30522)")
    args = p.parse_args([a for a in argv if a not in config_argv])

    import jax

    from bioscan_jax import plan
    from bioscan_jax import sharding as mesh_lib
    from bioscan_jax.train import optim as optim_lib
    from bioscan_jax.train.state import init_train_state

    config = plan.load_config(config_argv or ["--config=configs/clibd.py"])
    spec = plan.step_spec(config, text_vocab=args.text_vocab)
    setup, step, abstract_batch = plan.build(config, spec, {"data": 1, "fsdp": 1, "tensor": 1})
    batch_size = int(spec.train.batch_size)
    tx, _ = optim_lib.make_optimizer(spec.optim, total_steps=1000, global_batch=batch_size)
    state = init_train_state(setup, spec.model_factory, tx, seed=int(config.seed))
    host = plan._random_batch(abstract_batch)  # pylint: disable=protected-access
    batch = {k: jax.device_put(v, abstract_batch[k].sharding) for k, v in host.items()}
    t0 = time.perf_counter()
    with mesh_lib.mesh_context(setup.mesh, setup.rules):
        compiled = step.jitted.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float((cost or {}).get("flops", 0.0)) or None
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    emit(benchmark="clibd_step", config=" ".join(config_argv) or "--config=configs/clibd.py",
         device=jax.devices()[0].device_kind, batch=batch_size, bf16=bool(spec.train.bf16),
         modalities=str(config.model.modalities),
         step_s=step_s, step_s_all=times, samples_per_s=batch_size / step_s, compile_s=compile_s,
         flops_per_step=flops, flops_source="xla" if flops else None,
         flops_per_s=flops / step_s if flops else None, loss=float(metrics["loss"]), notes=spec.notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
