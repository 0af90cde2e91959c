"""A tiny NNX model, loss and grain pipeline for the training-machinery tests.

Parameters carry the logical axis names the real models use ('vocab', 'embed', 'mlp'), so the
sharding rules apply to them exactly as they do to KmerBert.
"""

from __future__ import annotations

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from bioscan_jax.sharding import constrain

VOCAB, EMBED, MLP, SEQ = 32, 16, 32, 8


def _init(init, names):
    return nnx.with_partitioning(init, names)


class TinyModel(nnx.Module):
    """Embedding → residual MLP → LayerNorm → vocabulary head; returns (logits, aux)."""

    def __init__(self, *, dropout: float = 0.0, rngs: nnx.Rngs):
        normal = nnx.initializers.normal(0.5)
        zeros = nnx.initializers.zeros_init()
        self.embed = nnx.Embed(VOCAB, EMBED, embedding_init=_init(normal, ("vocab", "embed")), rngs=rngs)
        self.fc1 = nnx.Linear(EMBED, MLP, kernel_init=_init(nnx.initializers.lecun_normal(), ("embed", "mlp")),
                              bias_init=_init(zeros, ("mlp",)), rngs=rngs)
        self.fc2 = nnx.Linear(MLP, EMBED, kernel_init=_init(nnx.initializers.lecun_normal(), ("mlp", "embed")),
                              bias_init=_init(zeros, ("embed",)), rngs=rngs)
        self.norm = nnx.LayerNorm(EMBED, rngs=rngs)  # unannotated: replicated
        self.head = nnx.Linear(EMBED, VOCAB, kernel_init=_init(nnx.initializers.lecun_normal(), ("embed", "vocab")),
                               use_bias=False, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, ids):
        x = constrain(self.embed(ids), ("batch", None, None))  # no-op without a mesh context
        h = self.fc2(jax.nn.gelu(self.fc1(x)))
        x = self.norm(x + self.dropout(h))
        return self.head(x), {"pooled": x.mean(axis=1)}


def model_factory(dropout: float = 0.0):
    return lambda rngs: TinyModel(dropout=dropout, rngs=rngs)


def loss_fn(model, batch, *, train):
    logits, _ = model(batch["ids"])
    logits = logits.astype(jnp.float32)
    per_tok = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    loss = per_tok.mean()
    if "poison" in batch:  # test hook: a batch with poison > 0 makes the loss NaN
        loss = jnp.where(batch["poison"].max() > 0, jnp.nan, loss)
    acc = (logits.argmax(-1) == batch["targets"]).mean()
    return loss, {"accuracy": acc, "num_tokens": jnp.asarray(per_tok.size, jnp.float32)}


def example(i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(int(i))
    ids = rng.integers(0, VOCAB, size=(SEQ,), dtype=np.int32)
    return {"ids": ids, "targets": (ids * 7 + 3) % VOCAB, "index": np.asarray(i, np.int32)}


def dataset(batch_size: int, *, n: int = 256, seed: int = 0, poison_at: int | None = None):
    """Infinite, shuffled (per epoch), batched grain IterDataset of synthetic token rows."""
    ds = grain.MapDataset.range(n).shuffle(seed=seed).repeat(None).map(example)
    ds = ds.batch(batch_size, drop_remainder=True)
    if poison_at is not None:  # batch number poison_at (1-based step) poisons the loss
        ds = ds.map_with_index(lambda j, b: {**b, "poison": np.full((batch_size,), int(j + 1 == poison_at), np.int32)})
    return ds.to_iter_dataset()


def data_iter_factory(batch_size: int, **kw):
    return lambda: iter(dataset(batch_size, **kw))


def tiny_config(**train_overrides) -> ml_collections.ConfigDict:
    from bioscan_jax.train.loop import default_config

    c = default_config()
    c.train.batch_size = 16
    c.train.steps = 6
    c.train.log_every = 2
    c.train.progress_bar = False
    c.optim.lr = 1e-2
    c.checkpoint.every = 2
    c.checkpoint.keep = 3
    for k, v in train_overrides.items():
        setattr(c.train, k, v)
    return c


class RecordingIterator:
    """Wraps a grain iterator: records the ``index`` rows of every batch handed out.

    ``pause_after=N``: the (N+1)-th ``next`` touches ``marker`` and blocks (so a test can kill the
    process at a known point: right after the step-N checkpoint, before step N+1). The loop and the
    checkpointer reach the grain iterator through ``.checkpointable``.
    """

    def __init__(self, it, *, log_path: str | None = None, pause_after: int | None = None,
                 marker: str | None = None, delay: float = 0.0):
        self.checkpointable = it
        self.seen: list[list[int]] = []
        self._log_path = log_path
        self._pause_after = pause_after
        self._marker = marker
        self._delay = delay

    def __iter__(self):
        return self

    def __next__(self):
        if self._pause_after is not None and len(self.seen) == self._pause_after:
            import time

            if self._marker:
                open(self._marker, "w").close()
            time.sleep(600)
        if self._delay:
            import time

            time.sleep(self._delay)
        batch = next(self.checkpointable)
        rows = [int(i) for i in batch["index"]]
        self.seen.append(rows)
        if self._log_path:
            import json

            with open(self._log_path, "a") as f:
                f.write(json.dumps(rows) + "\n")
        return batch
