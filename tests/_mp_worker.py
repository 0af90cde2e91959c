"""Subprocess body of tests/test_multiprocess.py (started by ``python -m bioscan_jax.launch``).

    python tests/_mp_worker.py OUTDIR MODE

Runs as one process of a 2-process × 4-device run, or alone on 8 devices (the reference). Modes:

``train``
    BarcodeBERT MLM pretraining (tiny model, real DNA pipeline with ``shard='jax'``) and a CLIBD
    contrastive run (tiny image and DNA towers on synthetic arrays), 3 steps each through
    :func:`bioscan_jax.train.loop.train` on a ``data=8`` mesh; then the trained DNA encoder embeds
    a 37-record split (each process its shard, gathered), and the BarcodeBERT checkpoint (written
    on the ``data=8`` mesh) is restored on a ``fsdp=4 × tensor=2`` mesh. Alone (one
    process), the run is the reference: every global batch is the two per-process shards'
    batches concatenated, exactly what the two processes feed together.
``die``
    The BarcodeBERT part only; process 1 exits with code 7 when it asks for the batch of step 3
    (after the checkpoints of steps 1 and 2 were started).
``mismatch``
    Each process builds a different config; the start-up check must refuse to run.

Every process appends the record indexes of each batch it hands to the loop to
``OUTDIR/<run>/<task>_ids_p<process>_<mode>.jsonl``; process 0 writes final parameters
(``<task>_params.npz``), restored parameters and embeddings as ``.npz`` files and a
``<task>_result.json``.
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bioscan_jax import sharding as mesh_lib  # noqa: E402

mesh_lib.maybe_initialize_distributed()

import grain  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from bioscan_jax.data import dna as dna_lib  # noqa: E402
from bioscan_jax.data import pipeline  # noqa: E402
from bioscan_jax.eval import embed as embed_lib  # noqa: E402
from bioscan_jax.models import kmer_bert, towers, vit  # noqa: E402
from bioscan_jax.train import loop, losses, multihost  # noqa: E402
from bioscan_jax.train import optim as optim_lib  # noqa: E402
from bioscan_jax.checkpoint import Checkpointer  # noqa: E402
from bioscan_jax.train.state import abstract_train_state  # noqa: E402

SHARDS = 2  # the process count of the multi-process run (the reference emulates it)
BATCH = 16  # global batch
STEPS = 3
N_RECORDS = 64
N_EMBED = 37
MAX_NT = 96
DNA_CFG = kmer_bert.get_variant("tiny")
CLIBD_CFG = towers.ClibdConfig(
    image=vit.get_variant("Ti/16", image_size=16, patch_size=8, hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64),
    dna=kmer_bert.get_variant("tiny", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
    embed_dim=16)  # image + DNA towers (the text tower is one more BERT: nothing new for sharding)
DNA_LEN = MAX_NT // 4


def records(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"processid": f"R{i:04d}", "index": i,
             "dna_barcode": "".join(rng.choice(list("ACGT"), size=int(rng.integers(70, MAX_NT + 1))))}
            for i in range(n)]


def base_config(steps: int = STEPS, checkpoint_every: int = 1):
    c = loop.default_config()
    c.mesh = dict(data=8, fsdp=1, tensor=1)
    c.train.batch_size, c.train.steps, c.train.log_every = BATCH, steps, 1
    c.train.progress_bar = c.train.tensorboard = False
    c.optim.lr, c.optim.lr_ref_batch = 1e-3, 0
    c.checkpoint.every, c.checkpoint.keep = checkpoint_every, 3
    return c


# ----------------------------------------------------------------------------- data


def shard_arg(index: int | None):
    """``'jax'`` in the multi-process run; an explicit shard when the reference emulates it."""
    return "jax" if index is None else grain.sharding.ShardOptions(index, SHARDS, drop_remainder=True)


def dna_batches(source, tokenizer, shard):
    return pipeline.dna_pipeline(source, tokenizer=tokenizer, batch_size=BATCH // SHARDS, train=True, seed=0,
                                 mlm=True, keep=("index",), shard=shard)


class ClibdExample(grain.transforms.Map):
    """Record -> synthetic arrays for the three towers (a pure function of the record index)."""

    def map(self, record):
        i = int(record["index"])
        rng = np.random.default_rng(1000 + i)
        return {"index": np.int32(i),
                "image": rng.random((16, 16, 3), np.float32),
                "dna_ids": rng.integers(2, 258, DNA_LEN).astype(np.int32),
                "dna_attention_mask": np.ones(DNA_LEN, bool)}


def clibd_batches(source, shard):
    ds = pipeline.records_pipeline(source, train=True, seed=1, shard=shard, batch_size=BATCH // SHARDS)
    return ds.map(ClibdExample()).batch(BATCH // SHARDS, drop_remainder=True).to_iter_dataset()


class Recorder:
    """Hands batches to the loop and appends their record indexes to a JSON-lines file.

    ``die_at=N``: process 1 exits with code 7 when asked for batch N.
    """

    def __init__(self, it, path: str, die_at: int | None = None):
        self.checkpointable = it
        self.path = path
        self.count = 0
        self.die_at = die_at

    def __iter__(self):
        return self

    def __next__(self):
        self.count += 1
        if self.die_at is not None and self.count == self.die_at and jax.process_index() == 1:
            print(f"process 1: exiting on purpose before step {self.count}", flush=True)
            os._exit(7)
        batch = next(self.checkpointable)
        with open(self.path, "a") as f:
            f.write(json.dumps([int(i) for i in batch["index"]]) + "\n")
        return batch


class Concat:
    """The reference's iterator: the per-shard batches of one step, concatenated."""

    def __init__(self, iterators, path: str):
        self.iterators, self.path = iterators, path

    def __iter__(self):
        return self

    def __next__(self):
        parts = [next(it) for it in self.iterators]
        batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        with open(self.path, "a") as f:
            f.write(json.dumps([int(i) for i in batch["index"]]) + "\n")
        return batch


def data_factory(make, run_dir: str, task: str, mode: str, die_at: int | None = None):
    """``make(shard) -> grain IterDataset``: per-process shard, or the reference's concatenation."""
    path = os.path.join(run_dir, f"{task}_ids_p{jax.process_index()}_{mode}.jsonl")
    if jax.process_count() == SHARDS:
        return lambda: Recorder(iter(make(shard_arg(None))), path, die_at)
    assert jax.process_count() == 1
    return lambda: Concat([iter(make(shard_arg(i))) for i in range(SHARDS)], path)


# ----------------------------------------------------------------------------- helpers


def host_params(tree) -> dict[str, np.ndarray]:
    """Every leaf as a full numpy array on this host (gathered across processes if needed)."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            x = multihost_utils.process_allgather(x, tiled=True)
        out[jax.tree_util.keystr(path)] = np.asarray(x)
    return out


def specs(tree) -> dict[str, str]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): str(tuple(x.sharding.spec)) for p, x in leaves}


def save_npz(path: str, arrays: dict) -> None:
    if jax.process_index() == 0:
        np.savez(path, **arrays)


def save_json(path: str, obj) -> None:
    if jax.process_index() == 0:
        with open(path, "w") as f:
            json.dump(obj, f, indent=1)


# ----------------------------------------------------------------------------- tasks


def bert_factory(rngs):
    return kmer_bert.KmerBertForMLM(DNA_CFG, rngs=rngs)


def train_bert(run_dir: str, mode: str, die_at: int | None = None):
    config = base_config()
    multihost.assert_same_config(config)
    tokenizer = dna_lib.KmerTokenizer(DNA_CFG.k, max_nucleotides=MAX_NT)
    source = records(N_RECORDS)
    result = loop.train(
        config, os.path.join(run_dir, "bert"), model_factory=bert_factory, loss_fn=losses.mlm_loss,
        data_iter_factory=data_factory(lambda s: dna_batches(source, tokenizer, s), run_dir, "bert", mode, die_at))
    save_npz(os.path.join(run_dir, "bert_params.npz"), host_params(result.state["params"]))
    save_json(os.path.join(run_dir, "bert_result.json"), {"start": result.start_step, "end": result.step})
    return result, tokenizer


def train_clibd(run_dir: str, mode: str):
    from bioscan_jax.tasks.clibd import training as clibd_train
    from configs import clibd as clibd_configs

    config = base_config(checkpoint_every=0)
    multihost.assert_same_config(config)
    loss_fn = clibd_train.make_loss_fn(clibd_configs.get_config("tiny"))
    source = records(N_RECORDS, seed=1)
    result = loop.train(
        config, os.path.join(run_dir, "clibd"), model_factory=lambda rngs: towers.ClibdModel(CLIBD_CFG, rngs=rngs),
        loss_fn=loss_fn, data_iter_factory=data_factory(lambda s: clibd_batches(source, s), run_dir, "clibd", mode))
    save_npz(os.path.join(run_dir, "clibd_params.npz"), host_params(result.state["params"]))
    save_json(os.path.join(run_dir, "clibd_result.json"), {"start": result.start_step, "end": result.step})


def pooled(model, batch):
    return model.bert(batch["ids"], batch["attention_mask"])[1]["pooled"]


def embed(run_dir: str, result, tokenizer):
    """The trained encoder's embeddings of a 37-record split: sharded + gathered, or all at once."""
    source = records(N_EMBED, seed=2)
    model = result.model()
    mesh = result.setup.mesh
    batches = pipeline.dna_pipeline(source, tokenizer=tokenizer, batch_size=8 // jax.process_count(), train=False,
                                    drop_remainder=False, shard="jax", num_epochs=1, keep=("index", "processid"))
    out = embed_lib.embed_batches(model, batches, pooled, mesh=mesh, batch_size=8, keep=("index", "processid"))
    tag = jax.process_index()
    np.savez(os.path.join(run_dir, f"embed_p{tag}.npz"), **out)


def restore_other_mesh(run_dir: str):
    """Restore this run's last BarcodeBERT checkpoint (saved on data=8) on a fsdp=4 x tensor=2 mesh."""
    config = base_config()
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    tx, _ = optim_lib.make_optimizer(config.optim, total_steps=STEPS, global_batch=BATCH)
    setup = abstract_train_state(bert_factory, tx, mesh, config.sharding_rules, seed=config.seed)
    with Checkpointer(os.path.join(run_dir, "bert", "checkpoints")) as ckpt:
        state, step = ckpt.restore(setup.abstract_state)
    save_npz(os.path.join(run_dir, "restored_params.npz"), host_params(state["params"]))
    save_json(os.path.join(run_dir, "restored.json"), {"step": step, "specs": specs(state["params"]),
                                                       "mu_specs": specs(state["opt_state"][0].mu)})


def main():
    out, mode = sys.argv[1], sys.argv[2]
    run_dir = os.path.join(out, "multi" if jax.process_count() > 1 else "ref")
    os.makedirs(run_dir, exist_ok=True)
    if mode == "mismatch":
        config = base_config()
        config.seed = jax.process_index()  # e.g. a flag passed to one host only
        multihost.assert_same_config(config)
        print("config check passed unexpectedly", flush=True)
        return
    if mode == "die":
        train_bert(run_dir, mode, die_at=3)
        return
    result, tokenizer = train_bert(run_dir, mode)
    train_clibd(run_dir, mode)
    embed(run_dir, result, tokenizer)
    restore_other_mesh(run_dir)
    print("worker done", flush=True)


if __name__ == "__main__":
    main()
