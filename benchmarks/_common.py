"""Shared set-up of the step benchmarks (BarcodeBERT, ViT): JAX platform and matmul precision,
the matmul peak they are measured against, and JSON-line output."""

from __future__ import annotations

import json
import os
import sys
import time


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def configure_jax(device: str, dtype: str, tf32: bool):
    """Selects the JAX platform before JAX is imported, puts the repository on ``sys.path`` and,
    for f32 on GPU, sets the same matmul precision as the PyTorch side; returns ``jax``."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu" if device == "cpu" else "cuda")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import jax

    if device == "gpu" and dtype == "f32":  # same matmul precision on both sides
        jax.config.update("jax_default_matmul_precision", "tensorfloat32" if tf32 else "highest")
    return jax


def matmul_peak(n: int, reps: int, dtype) -> tuple[float, float]:
    """Best-of-``reps`` FLOP/s of one jitted ``n``x``n`` matmul, and its time in seconds."""
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), dtype)
    b = jax.random.normal(kb, (n, n), dtype)
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best, best
