"""f32 GEMM rates at the dense-layer shapes of the BarcodeBERT ``4_4_4`` (batch 32) and ViT-B/16
(batch 8) steps: forward ``X @ W``, input gradient ``dY @ W.T`` and weight gradient ``X.T @ dY``,
for ``jnp.dot`` (jitted, this CPU's XLA default as in ``run.py``), ``torch.mm`` and numpy's BLAS,
each shape's three libraries timed one after the other in one process. Prints the machine line,
one JSON line per shape (median GFLOP/s) and the FLOP-weighted rate of each step's dense GEMMs:
what the step would reach if it were all dense GEMMs (docs/performance.md).

    python benchmarks/gemm_shapes_benchmark.py
"""

from __future__ import annotations

import argparse
import statistics

from _common import configure_jax, emit, machine_info, timed

#: name -> (M, K, N, FLOP weight in its step: how many such GEMMs per layer, in units of K·N).
SHAPES = {
    "4_4_4 q/k/v/out": (32 * 166, 768, 768, 4),
    "4_4_4 mlp in": (32 * 166, 768, 3072, 1),
    "4_4_4 mlp out": (32 * 166, 3072, 768, 1),
    "vit q/k/v": (8 * 197, 768, 2304, 1),
    "vit out": (8 * 197, 768, 768, 1),
    "vit mlp in": (8 * 197, 768, 3072, 1),
    "vit mlp out": (8 * 197, 3072, 768, 1),
    "square 2048": (2048, 2048, 2048, 0),
}
OPS = ("fwd", "dx", "dw")
LIBS = ("jax", "torch", "numpy")


def median_seconds(fn, reps: int) -> float:
    """Median wall seconds of ``reps`` calls of ``fn`` after one warm-up call."""
    fn()
    return statistics.median(timed(fn)[0] for _ in range(reps))


def weighted_rate(rows: dict, step: str, lib: str) -> float:
    """FLOP-weighted (harmonic) mean GFLOP/s of ``step``'s dense GEMMs, all three ops."""
    flops = seconds = 0.0
    for name, row in rows.items():
        if name.startswith(step + " "):
            m, k, n, weight = SHAPES[name]
            for op in OPS:
                flops += weight * k * n
                seconds += weight * k * n / row[op][lib]
    return flops / seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args(argv)
    jax = configure_jax("cpu", "f32", False)
    import jax.numpy as jnp
    import numpy as np
    import torch

    emit(benchmark="machine", **machine_info())
    fwd, dx, dw = (jax.jit(f) for f in (lambda a, b: a @ b, lambda g, w: g @ w.T, lambda x, g: x.T @ g))
    rng = np.random.default_rng(0)
    rows = {}
    for name, (m, k, n, _) in SHAPES.items():
        x, w, g = (rng.standard_normal(s, dtype=np.float32) for s in ((m, k), (k, n), (m, n)))
        jx, jw, jg = map(jnp.asarray, (x, w, g))
        tx, tw, tg = map(torch.from_numpy, (x, w, g))
        calls = {
            "fwd": {"jax": lambda: fwd(jx, jw).block_until_ready(), "torch": lambda: tx @ tw, "numpy": lambda: x @ w},
            "dx": {"jax": lambda: dx(jg, jw).block_until_ready(), "torch": lambda: tg @ tw.T, "numpy": lambda: g @ w.T},
            "dw": {"jax": lambda: dw(jx, jg).block_until_ready(), "torch": lambda: tx.T @ tg, "numpy": lambda: x.T @ g},
        }
        flops = 2 * m * k * n
        rows[name] = {op: {lib: flops / median_seconds(calls[op][lib], args.reps) / 1e9 for lib in LIBS} for op in OPS}
        emit(benchmark="gemm_shape", shape=name, mkn=[m, k, n], gflops=rows[name])
    for step in ("4_4_4", "vit"):
        emit(benchmark="gemm_step_weighted", step=step, gflops={lib: weighted_rate(rows, step, lib) for lib in LIBS})


if __name__ == "__main__":
    main()
