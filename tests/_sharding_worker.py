"""Subprocess body of tests/test_sharding.py: runs on 8 fake CPU devices.

XLA_FLAGS=--xla_force_host_platform_device_count=8 must be set before JAX is imported, so this
runs as its own process. It prints one JSON object on its last stdout line: for every mesh, the
PartitionSpec and per-device shard shape of each parameter (and of Adam's mu), the per-step
losses, and the largest relative parameter difference to the 1-device run.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _train_tiny as T  # noqa: E402

from bioscan_jax import sharding as mesh_lib  # noqa: E402
from bioscan_jax.train.state import create_train_state  # noqa: E402
from bioscan_jax.train.step import make_train_step  # noqa: E402

STEPS = 3
BATCH = 16


def flat(tree):
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def describe(tree):
    return {k: {"spec": str(tuple(x.sharding.spec)), "shard": list(x.addressable_shards[0].data.shape),
                "shape": list(x.shape)} for k, x in flat(tree).items()}


def run(mesh_cfg, devices, batches, *, factory, loss_fn, accum=1, lr=1e-3):
    mesh = mesh_lib.make_mesh(mesh_cfg, devices=devices)
    tx = optax.adamw(lr, weight_decay=0.01)
    setup, state = create_train_state(factory, tx, mesh, mesh_lib.DEFAULT_SHARDING_RULES, seed=0)
    info = {"params": describe(state["params"]), "mu": describe(state["opt_state"][0].mu)}
    step = make_train_step(setup, loss_fn, tx, accum_steps=accum)
    losses = []
    for b in batches:
        state, m = step(state, mesh_lib.to_global_batch(b, mesh))
        losses.append(float(m["loss"]))
    info["losses"] = losses
    info["batch_spec"] = str(tuple(mesh_lib.to_global_batch(batches[0], mesh)[next(iter(batches[0]))].sharding.spec))
    params = {k: np.asarray(v) for k, v in flat(jax.device_get(state["params"])).items()}
    return info, params


def compare(params, ref):
    worst = 0.0
    for k, r in ref.items():
        scale = max(float(np.abs(r).max()), 1e-6)
        worst = max(worst, float(np.abs(params[k] - r).max()) / scale)
    return worst


def kmer_setup():
    from bioscan_jax.models.kmer_bert import KmerBertForMLM, get_variant

    cfg = get_variant("tiny")

    def factory(rngs):
        return KmerBertForMLM(cfg, rngs=rngs)

    def loss_fn(model, batch, *, train):
        logits, _ = model(batch["input_ids"], batch["attention_mask"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
        return loss, {}

    rng = np.random.default_rng(0)
    T_ = 24
    batches = [{"input_ids": rng.integers(2, cfg.vocab_size, (BATCH, T_)).astype(np.int32),
                "attention_mask": np.ones((BATCH, T_), np.int32),
                "labels": rng.integers(0, cfg.num_labels, (BATCH, T_)).astype(np.int32)} for _ in range(2)]
    return factory, loss_fn, batches


def main():
    devices = jax.devices()
    assert len(devices) == 8, devices
    it = iter(T.dataset(BATCH))
    batches = [next(it) for _ in range(STEPS)]
    meshes = {
        "data8": {"data": 8, "fsdp": 1, "tensor": 1},
        "fsdp8": {"data": 1, "fsdp": 8, "tensor": 1},
        "d2f2t2": {"data": 2, "fsdp": 2, "tensor": 2},
    }
    out = {"devices": len(devices), "tiny": {}, "kmer_bert": {}}
    # Dropout on: the NNX dropout streams must advance identically on every mesh.
    factory = T.model_factory(0.1)
    ref_info, ref = run({"data": 1}, devices[:1], batches, factory=factory, loss_fn=T.loss_fn)
    for name, cfg in meshes.items():
        info, params = run(cfg, devices, batches, factory=factory, loss_fn=T.loss_fn)
        info["ref_losses"] = ref_info["losses"]
        info["max_rel_param_diff"] = compare(params, ref)
        out["tiny"][name] = info

    if os.environ.get("WITH_KMER_BERT", "1") == "1":
        try:
            factory, loss_fn, kb = kmer_setup()
        except ImportError as e:
            out["kmer_bert"] = {"skipped": str(e)}
        else:
            ref_info, ref = run({"data": 1}, devices[:1], kb, factory=factory, loss_fn=loss_fn, lr=1e-4)
            info, params = run(meshes["d2f2t2"], devices, kb, factory=factory, loss_fn=loss_fn, lr=1e-4)
            info["ref_losses"] = ref_info["losses"]
            # Adam turns gradient round-off of parameters whose exact gradient is 0 (attention key
            # biases) into updates of size ~lr, so compare against the overall parameter scale.
            scale = max(float(np.abs(r).max()) for r in ref.values())
            info["max_abs_param_diff_over_scale"] = max(
                float(np.abs(params[k] - r).max()) for k, r in ref.items()) / scale
            out["kmer_bert"]["d2f2t2"] = info
    print(json.dumps(out))


if __name__ == "__main__":
    main()
