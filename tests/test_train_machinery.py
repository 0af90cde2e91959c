"""Mesh/config validation, optimiser, init, train/eval steps, metrics and the loop (1 device)."""

from __future__ import annotations

import dataclasses
import glob
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

import _train_tiny as T
from bioscan_jax.train import loop
from bioscan_jax import sharding as mesh_lib
from bioscan_jax.checkpoint import Checkpointer
from bioscan_jax.train.metrics import read_metrics
from bioscan_jax.train.optim import make_optimizer, make_schedule, peak_lr
from bioscan_jax.train.state import create_train_state, warm_start
from bioscan_jax.train.step import make_train_step

BATCH = 8


# -- mesh and configuration checks (no compute) ------------------------------------------------


def test_mesh_shape_fills_and_rejects():
    assert mesh_lib.mesh_shape({"data": -1, "fsdp": 1, "tensor": 1}, 8) == (8, 1, 1)
    assert mesh_lib.mesh_shape({"data": 2, "fsdp": -1, "tensor": 2}, 8) == (2, 2, 2)
    assert mesh_lib.mesh_shape({"data": 2, "fsdp": 4, "tensor": 1}, 8) == (2, 4, 1)
    assert mesh_lib.mesh_shape({"fsdp": -1}, 8) == (1, 8, 1)  # unspecified axes: 1 (data fills if none does)
    assert mesh_lib.mesh_shape({}, 8) == (8, 1, 1)
    with pytest.raises(ValueError, match="does not divide the 8 available devices"):
        mesh_lib.mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)
    with pytest.raises(ValueError, match="mesh has 4 devices but 8 are available"):
        mesh_lib.mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        mesh_lib.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)
    with pytest.raises(ValueError, match="config.mesh.tensor"):
        mesh_lib.mesh_shape({"data": -1, "fsdp": 1, "tensor": 0}, 8)


def test_make_mesh_single_device():
    mesh = mesh_lib.make_mesh({"data": -1})
    assert mesh.axis_names == mesh_lib.MESH_AXES
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def _cfg(**train):
    c = T.tiny_config(**train)
    return c


@pytest.mark.parametrize(
    "mesh,train,match",
    [
        ({"data": 8}, {"batch_size": 12}, r"batch_size=12 is not divisible by the batch shards data\*fsdp"),
        ({"data": 2, "fsdp": 4}, {"batch_size": 12}, r"data\*fsdp=2\*4=8"),
        ({"data": 8}, {"batch_size": 16, "accum_steps": 3}, "accum_steps=3 does not divide"),
        ({"data": 8}, {"batch_size": 16, "accum_steps": 4}, r"microbatch batch_size/accum_steps=4 .* data\*fsdp=8"),
        ({"data": 8}, {"steps": 0}, "set config.train.steps"),
        ({"data": 3}, {}, "mesh has 3 devices but 8 are available"),
    ],
)
def test_validate_config_errors(mesh, train, match):
    c = _cfg(**train)
    c.mesh.update(mesh)
    with pytest.raises(ValueError, match=match):
        loop.validate_config(c, num_devices=8)


def test_epochs_need_steps_per_epoch():
    c = _cfg(steps=0)
    c.train.epochs = 2
    with pytest.raises(ValueError, match="steps_per_epoch"):
        loop.total_train_steps(c)
    assert loop.total_train_steps(c, steps_per_epoch=7) == 14


def test_config_errors_come_before_any_compute(tmp_path):
    calls = []

    def factory(rngs):
        calls.append(1)
        return T.TinyModel(rngs=rngs)

    c = _cfg()
    c.mesh.data = 3  # one CPU device here
    with pytest.raises(ValueError, match="config.mesh"):
        loop.train(c, tmp_path, model_factory=factory, loss_fn=T.loss_fn, data_iter_factory=T.data_iter_factory(16))
    c = _cfg(batch_size=16, accum_steps=3)
    with pytest.raises(ValueError, match="accum_steps=3"):
        loop.train(c, tmp_path, model_factory=factory, loss_fn=T.loss_fn, data_iter_factory=T.data_iter_factory(16))
    assert not calls


def test_maybe_initialize_distributed_single_process(monkeypatch):
    for k in ("JAX_NUM_PROCESSES", "JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
              "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(k, raising=False)
    assert mesh_lib.maybe_initialize_distributed() is False


# -- optimiser ---------------------------------------------------------------------------------


def _torch_onecycle(step, total, peak, pct=0.3, div=25.0, final_div=1e4):
    """PyTorch OneCycleLR(anneal_strategy='cos') learning rate, written out from its get_lr: the
    warm-up phase ends at step pct * total - 1, the annealing phase at total - 1."""
    initial, final = peak / div, peak / div / final_div
    up, last = pct * total - 1, total - 1

    def cos(a, b, frac):
        return b + (a - b) / 2 * (1 + math.cos(math.pi * frac))

    return cos(initial, peak, step / up) if step <= up else cos(peak, final, (step - up) / (last - up))


def test_lr_scaling_and_onecycle():
    optim = {"lr": 1e-4, "lr_ref_batch": 64}
    assert peak_lr(optim, 256) == pytest.approx(4e-4)
    assert peak_lr({"lr": 5e-5, "lr_ref_batch": 500}, 2000) == pytest.approx(2e-4)
    assert peak_lr({"lr": 1e-3, "lr_ref_batch": 0}, 2000) == pytest.approx(1e-3)
    total = 1000
    sched = make_schedule(optim, total_steps=total, global_batch=256)
    for s in (0, 100, 299, 300, 301, 650, 998, 999):
        assert float(sched(s)) == pytest.approx(_torch_onecycle(s, total, 4e-4), rel=1e-4, abs=1e-12), s
    assert max(float(sched(s)) for s in range(total)) == pytest.approx(4e-4, rel=1e-5)
    with pytest.raises(ValueError, match="config.optim.schedule"):
        make_schedule({"schedule": "linear"}, total_steps=10, global_batch=64)


def test_adamw_weight_decay_and_clip():
    tx, _ = make_optimizer({"lr": 0.1, "lr_ref_batch": 0, "schedule": "constant", "weight_decay": 0.5,
                            "grad_clip": 1.0}, total_steps=10, global_batch=64)
    params = {"w": jnp.ones((3,))}
    grads = {"w": jnp.zeros((3,))}
    updates, _ = tx.update(grads, tx.init(params), params)
    # zero gradient: only decoupled decay, -lr * wd * w
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones(3), rtol=1e-6)


# -- init and steps ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh():
    return mesh_lib.make_mesh({"data": -1})


def _batches(n, batch_size=BATCH):
    it = iter(T.dataset(batch_size))
    return [next(it) for _ in range(n)]


def test_create_train_state_is_sharded_and_complete(mesh):
    tx = optax.adamw(1e-3)
    setup, state = create_train_state(T.model_factory(0.1), tx, mesh, mesh_lib.DEFAULT_SHARDING_RULES, seed=3)
    assert set(state) == {"step", "params", "model_state", "opt_state"}
    assert int(state["step"]) == 0
    assert set(state["params"]) == {"embed", "fc1", "fc2", "norm", "head"}
    # the dropout RNG stream is state, not a parameter
    assert "dropout" in state["model_state"]
    for arr, sds in zip(jax.tree.leaves(state), jax.tree.leaves(setup.abstract_state)):
        assert isinstance(sds.sharding, jax.sharding.NamedSharding)  # concrete: usable as a restore target
        assert arr.sharding == sds.sharding and arr.shape == sds.shape and arr.dtype == sds.dtype
    assert state["params"]["fc1"]["kernel"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    # same seed → same parameters; the merged model is a working NNX module
    _, again = create_train_state(T.model_factory(0.1), tx, mesh, None, seed=3)
    np.testing.assert_array_equal(again["params"]["head"]["kernel"], state["params"]["head"]["kernel"])
    model = setup.merge(state)
    logits, aux = model(jnp.zeros((2, T.SEQ), jnp.int32))
    assert logits.shape == (2, T.SEQ, T.VOCAB) and aux["pooled"].shape == (2, T.EMBED)


def test_warm_start_replaces_a_subtree(mesh, tmp_path):
    tx = optax.adamw(1e-3)
    setup, state = create_train_state(T.model_factory(0.0), tx, mesh)
    kernel = np.full((T.EMBED, T.MLP), 0.25, np.float32)
    new = warm_start(setup, state, {"fc1": {"kernel": kernel}})
    np.testing.assert_array_equal(new["params"]["fc1"]["kernel"], kernel)
    assert new["params"]["fc1"]["kernel"].sharding == setup.shardings["params"]["fc1"]["kernel"]
    np.testing.assert_array_equal(new["params"]["fc2"]["kernel"], state["params"]["fc2"]["kernel"])
    with pytest.raises(ValueError, match="unknown parameters"):
        warm_start(setup, state, {"fc3": {"kernel": kernel}})
    with pytest.raises(ValueError, match="has shape"):
        warm_start(setup, state, {"fc1": {"kernel": kernel.T}})
    # through the loop: used on a fresh start (lr 0 keeps it visible), ignored on resume
    c = _cfg(steps=2, batch_size=BATCH)
    c.optim.lr = 0.0
    calls = []

    def ws():
        calls.append(1)
        return {"fc1": {"kernel": kernel}}

    r = loop.train(c, tmp_path, model_factory=T.model_factory(0.0), loss_fn=T.loss_fn,
                   data_iter_factory=T.data_iter_factory(BATCH), warm_start=ws)
    np.testing.assert_allclose(r.state["params"]["fc1"]["kernel"], kernel)
    c.train.steps = 3
    c.resume = "force"  # a longer run is another run identity: extending it is asked for explicitly
    loop.train(c, tmp_path, model_factory=T.model_factory(0.0), loss_fn=T.loss_fn,
               data_iter_factory=T.data_iter_factory(BATCH), warm_start=ws)
    assert calls == [1]


def test_train_step_metrics_and_gradients(mesh):
    tx, sched = make_optimizer({"lr": 1e-2}, total_steps=20, global_batch=BATCH)
    setup, state = create_train_state(T.model_factory(0.0), tx, mesh)
    batch = _batches(1)[0]
    gbatch = mesh_lib.to_global_batch(batch, mesh)
    assert gbatch["ids"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
    # reference gradient norm, computed directly
    model = setup.merge(state)
    grads = nnx.grad(lambda m: T.loss_fn(m, gbatch, train=True)[0])(model)
    ref_norm = float(optax.global_norm(nnx.state(grads, nnx.Param)))
    step = make_train_step(setup, T.loss_fn, tx, schedule=sched)
    state, m = step(state, gbatch)
    assert {"loss", "grad_norm", "lr", "param_norm", "accuracy", "num_tokens"} <= set(m)
    assert float(m["grad_norm"]) == pytest.approx(ref_norm, rel=1e-5)
    assert float(m["lr"]) == pytest.approx(float(sched(0)))
    assert int(state["step"]) == 1
    losses = [float(m["loss"])]
    for _ in range(15):
        state, m = step(state, gbatch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] * 0.9


def test_gradient_accumulation_matches_full_batch(mesh):
    tx = optax.adamw(1e-2)
    batches = [mesh_lib.to_global_batch(b, mesh) for b in _batches(2)]
    results = []
    for accum in (1, 2):
        setup, state = create_train_state(T.model_factory(0.0), tx, mesh)
        step = make_train_step(setup, T.loss_fn, tx, accum_steps=accum)
        for b in batches:
            state, m = step(state, b)
        results.append((jax.device_get(state["params"]), jax.device_get(m)))
    (p1, m1), (p2, m2) = results
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert float(m2["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-5)
    assert float(m2["num_tokens"]) == float(m1["num_tokens"]) == BATCH * T.SEQ  # counts are summed


def test_bf16_compute_keeps_f32_master_weights(mesh):
    tx = optax.adamw(1e-2)
    gbatch = mesh_lib.to_global_batch(_batches(1)[0], mesh)
    losses, traced_dtypes = [], []

    def loss_fn(model, batch, *, train):
        traced_dtypes.append(model.fc1.kernel.value.dtype)  # recorded while tracing
        return T.loss_fn(model, batch, train=train)

    for dtype in (None, jnp.bfloat16):
        setup, state = create_train_state(T.model_factory(0.0), tx, mesh)
        step = make_train_step(setup, loss_fn, tx, compute_dtype=dtype)
        state, m = step(state, gbatch)
        losses.append(float(m["loss"]))
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["params"]))
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["opt_state"]) if x.ndim)
    assert traced_dtypes[0] == jnp.float32 and traced_dtypes[-1] == jnp.bfloat16
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)


def test_dropout_rng_advances_each_step(mesh):
    tx = optax.adamw(0.0)  # lr 0: parameters fixed, only the dropout stream moves
    setup, state = create_train_state(T.model_factory(0.5), tx, mesh)
    gbatch = mesh_lib.to_global_batch(_batches(1)[0], mesh)
    count0 = int(state["model_state"]["dropout"]["rngs"]["count"])
    step = make_train_step(setup, T.loss_fn, tx)
    state, m1 = step(state, gbatch)
    state, m2 = step(state, gbatch)
    assert int(state["model_state"]["dropout"]["rngs"]["count"]) == count0 + 2
    assert float(m1["loss"]) != float(m2["loss"])  # new dropout mask each step


def test_scalar_batch_entry_is_rejected(mesh):
    with pytest.raises(ValueError, match="leading batch dimension"):
        mesh_lib.to_global_batch({"x": np.zeros(())}, mesh)


def test_constrain_is_a_noop_without_mesh_context():
    x = jnp.ones((4, 3))
    assert mesh_lib.constrain(x, ("batch", None)) is x


# -- checkpoint round trip ---------------------------------------------------------------------


def test_checkpointer_round_trip_with_grain_iterator(mesh, tmp_path):
    tx = optax.adamw(1e-3)
    setup, state = create_train_state(T.model_factory(0.1), tx, mesh)
    it = iter(T.dataset(BATCH))
    for _ in range(3):
        next(it)
    with Checkpointer(tmp_path / "ck", keep=2) as ck:
        assert ck.latest_step() is None
        assert ck.save(3, state, it)
        assert not ck.save(3, state, it)  # already there: nothing written
        next(it)  # the iterator moves on after the save...
        ck.save(5, state, it)
        ck.save(7, state, it)
        ck.wait()
        assert ck.all_steps() == [5, 7]  # keep=2
        it2 = iter(T.dataset(BATCH))
        restored, step = ck.restore(setup.abstract_state, it2, step=5)
    assert step == 5
    for a, b, sds in zip(jax.tree.leaves(restored), jax.tree.leaves(state), jax.tree.leaves(setup.abstract_state)):
        np.testing.assert_array_equal(jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key) else a,
                                      jax.random.key_data(b) if jnp.issubdtype(b.dtype, jax.dtypes.prng_key) else b)
        assert a.sharding == sds.sharding
    # ...the restored iterator resumes exactly where step 5 was saved (4 batches consumed).
    fresh = iter(T.dataset(BATCH))
    want = [next(fresh) for _ in range(5)][-1]["index"]
    np.testing.assert_array_equal(next(it2)["index"], want)


# -- the loop ----------------------------------------------------------------------------------


def test_train_loop_logs_checkpoints_and_evaluates(tmp_path):
    c = _cfg(steps=6, batch_size=BATCH)
    c.train.log_every = 2
    c.train.eval_every = 3
    c.checkpoint.every = 4
    seen = []

    class LogitMean:
        def run(self, model, step):
            seen.append(step)
            logits, _ = model(jnp.zeros((1, T.SEQ), jnp.int32))
            return {"val/logit_mean": float(logits.mean())}

    result = loop.train(c, tmp_path, model_factory=T.model_factory(0.1), loss_fn=T.loss_fn,
                        data_iter_factory=T.data_iter_factory(BATCH), evaluators=[LogitMean()])
    assert result.step == 6 and result.start_step == 0
    assert seen == [3, 6]
    recs = read_metrics(tmp_path)
    train_recs = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train_recs] == [2, 4, 6]
    for r in train_recs:
        assert {"loss", "lr", "grad_norm", "param_norm", "accuracy"} <= set(r)
    assert {"samples_per_s", "tokens_per_s", "steps_per_s"} <= set(train_recs[-1])
    assert "first_step_s" in train_recs[0]
    assert [r["step"] for r in recs if "val/logit_mean" in r] == [3, 6]
    assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
    assert os.path.exists(tmp_path / "config.json")
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [4, 6]
    # Re-running a finished run is a no-op resume.
    again = loop.train(c, tmp_path, model_factory=T.model_factory(0.1), loss_fn=T.loss_fn,
                       data_iter_factory=T.data_iter_factory(BATCH))
    assert again.start_step == 6
    for a, b in zip(jax.tree.leaves(again.state["params"]), jax.tree.leaves(result.state["params"])):
        np.testing.assert_array_equal(a, b)


def test_data_iterator_running_out_is_reported(tmp_path):
    c = _cfg(steps=5, batch_size=BATCH)

    def short():
        return iter(list(_batches(2)))

    with pytest.raises(RuntimeError, match="ran out before step 3"):
        loop.train(c, tmp_path, model_factory=T.model_factory(0.0), loss_fn=T.loss_fn, data_iter_factory=short)


def test_wrong_local_batch_size_is_reported(tmp_path):
    c = _cfg(steps=2, batch_size=16)
    with pytest.raises(ValueError, match="expected 16"):
        loop.train(c, tmp_path, model_factory=T.model_factory(0.0), loss_fn=T.loss_fn,
                   data_iter_factory=T.data_iter_factory(8))


def test_default_config_fields():
    c = loop.default_config()
    assert isinstance(c, ml_collections.ConfigDict)
    assert c.optim.lr == 1e-4 and c.optim.lr_ref_batch == 64 and c.optim.weight_decay == 0.0
    assert c.optim.warmup_frac == 0.3 and c.optim.schedule == "onecycle"
    assert dict(c.mesh) == {"data": -1, "fsdp": 1, "tensor": 1}
    assert {"batch_size", "accum_steps", "bf16", "log_every", "steps", "epochs"} <= set(c.train)
    assert {"every", "keep"} <= set(c.checkpoint)


def test_optim_settings_are_read_once_with_one_set_of_defaults():
    """A typo in an optim section raises instead of being ignored; the loop's defaults and the
    configs' recipe take their values from the one dataclass."""
    from bioscan_jax.train import loop
    from bioscan_jax.train.optim import OptimSettings
    from configs import common

    with pytest.raises(ValueError, match="config.optim has no field weight_deacy"):
        make_optimizer({"lr": 1e-3, "weight_deacy": 0.1}, total_steps=10, global_batch=64)
    with pytest.raises(ValueError, match="lr_ref_batch must be a whole number"):
        peak_lr({"lr_ref_batch": 62.5}, 64)
    with pytest.raises(ValueError, match="cycle_momentum=True needs"):
        OptimSettings.read({"cycle_momentum": True, "schedule": "constant"})
    assert OptimSettings.read({"schedule": "OneCycle", "grad_clip": None}).schedule == "onecycle"
    assert loop.default_config().optim.to_dict() == OptimSettings().as_section()
    section = common.adamw_onecycle(lr=3e-4, cycle_momentum=True)
    defaults = OptimSettings()
    assert {k: v for k, v in section.items() if k not in ("lr", "cycle_momentum")} == {
        k: v for k, v in dataclasses.asdict(defaults).items() if k not in ("lr", "cycle_momentum") and k in section}
    assert OptimSettings.read(section) == dataclasses.replace(defaults, lr=3e-4, cycle_momentum=True)


def test_loop_settings_read_the_defaults_of_default_config():
    from bioscan_jax.train import loop

    settings = loop.LoopSettings.read({"train": {"steps": 7}}, None)
    d = loop.default_config()
    assert (settings.global_batch, settings.log_every, settings.ckpt_every, settings.ckpt_keep, settings.total) == (
        d.train.batch_size, d.train.log_every, d.checkpoint.every, d.checkpoint.keep, 7)
