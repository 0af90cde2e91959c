"""One attention layer, einsum vs blocked (models.layers.blocked_attention), at BarcodeBERT's
shapes: forward (inference) and forward + backward with attention dropout 0.1 (training), the
q/k/v and output projections included; median ms of ``--reps`` calls each, and the largest
difference between the two paths' outputs, loss and gradients (same weights, same dropout key).

    python benchmarks/attention_benchmark.py
    python benchmarks/attention_benchmark.py --shapes tiny:64,4_4_4:32
"""

from __future__ import annotations

import argparse
import statistics
import time

from _common import configure_jax, emit, machine_info

# name -> (tokens, hidden, heads) of the KmerBert variants (k-mer tokens of a 660-nt barcode + CLS/SEP)
SHAPES = {"tiny": (165, 128, 4), "4_4_4": (166, 768, 4), "paper": (82, 768, 4), "5_12_12": (132, 768, 12)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="tiny:64,tiny:256,4_4_4:32,paper:256,5_12_12:64", help="name:batch, comma separated")
    p.add_argument("--reps", type=int, default=5)
    return p.parse_args(argv)


def _median_ms(fn, *args, reps):
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def bench(name: str, batch: int, reps: int) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from bioscan_jax.models import layers

    tokens, dim, heads = SHAPES[name]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, tokens, dim)), jnp.float32)
    lengths = rng.integers(int(0.9 * tokens), tokens + 1, batch)
    mask = jnp.asarray(np.arange(tokens)[None] < lengths[:, None])[:, None, None, :]
    ms, outs = {}, {}
    for impl in ("einsum", "blocked"):
        model = layers.MultiHeadAttention(dim, heads, attention_dropout=0.1, attention_impl=impl,
                                          rngs=nnx.Rngs(0, dropout=1))

        @nnx.jit
        def forward(m, x):
            return m(x, mask, deterministic=True)

        @nnx.jit
        def train(m, x):
            def loss(m):
                return (m(x, mask, deterministic=False) ** 2).mean()

            value, grads = nnx.value_and_grad(loss)(m)
            return value, nnx.state(grads, nnx.Param)

        outs[impl] = (forward(model, x), train(model, x))
        ms[impl] = (_median_ms(forward, model, x, reps=reps), _median_ms(train, model, x, reps=reps))
    (f1, (l1, g1)), (f2, (l2, g2)) = outs["einsum"], outs["blocked"]
    grad_diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)))
    emit(benchmark="attention", shape=name, batch=batch, tokens=tokens, heads=heads, head_dim=dim // heads,
         forward_ms_einsum=ms["einsum"][0], forward_ms_blocked=ms["blocked"][0],
         train_ms_einsum=ms["einsum"][1], train_ms_blocked=ms["blocked"][1],
         block_records=layers.block_records(batch, heads, tokens),
         max_abs_diff_forward=float(jnp.abs(f1 - f2).max()), abs_diff_loss=abs(float(l1) - float(l2)),
         max_abs_diff_grads=grad_diff)


def main(argv=None):
    args = parse_args(argv)
    configure_jax("cpu", "f32", False)
    emit(benchmark="machine", **machine_info())
    for item in filter(None, (s.strip() for s in args.shapes.split(","))):
        name, batch = item.split(":")
        bench(name, int(batch), args.reps)


if __name__ == "__main__":
    main()
