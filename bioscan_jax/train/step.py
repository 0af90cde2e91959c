"""The generic jitted train and eval steps.

A task provides only its loss::

    def loss_fn(model: nnx.Module, batch: dict[str, jax.Array], *, train: bool
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
        logits, aux = model(batch['input_ids'], batch['attention_mask'])
        loss = ...                       # scalar, mean over the (micro)batch, float32
        return loss, {'accuracy': acc, 'num_tokens': n}

The model arrives in train mode (``model.train()``: dropout on) or eval mode; its NNX ``Rngs``
streams are part of the state, so dropout keys advance from step to step and are checkpointed.
Metric values must be scalars. Names starting with ``num_`` are counts: they are summed over
gradient-accumulation microbatches (and ``num_tokens`` drives the tokens/s figure of the loop);
all others are averaged.

:func:`make_train_step` returns ``jax.jit(step, in_shardings=(state, batch), out_shardings=(state,
metrics), donate_argnums=0)`` of a pure function ``(state, batch) -> (state, metrics)``. Metrics
always include ``loss``, ``grad_norm`` (global L2 norm of the gradient, before clipping), ``lr``
(learning rate used by this update) and ``param_norm``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from bioscan_jax import sharding as mesh_lib
from bioscan_jax.train.state import TrainSetup, TrainState

LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
Batch = dict[str, jax.Array]


def _is_count(name: str) -> bool:
    return name.startswith("num_")


def _cast_floats(tree: Any, dtype: Any) -> Any:
    if dtype is None:
        return tree

    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree.map(cast, tree)


def _forward(setup: TrainSetup, loss_fn: LossFn, compute_dtype: Any, train: bool):
    """``(params, model_state, batch) -> (loss, (metrics, new_model_state))`` as a pure function."""

    def fn(params, model_state, batch):
        model = nnx.merge(setup.graphdef, _cast_floats(params, compute_dtype), model_state)
        if train:
            model.train()
        else:
            model.eval()
        loss, metrics = loss_fn(model, batch, train=train)
        loss = jnp.asarray(loss, jnp.float32)
        metrics = {k: jnp.asarray(v, jnp.float32) for k, v in dict(metrics).items()}
        _, _, new_model_state = nnx.split(model, setup.trainable, ...)
        return loss, (metrics, new_model_state.to_pure_dict())

    return fn


def _split_microbatches(batch: Batch, accum_steps: int, mesh) -> Batch:
    """``[B, ...] -> [A, B/A, ...]`` with microbatch ``a`` = rows ``a, a+A, a+2A, ...``.

    Taking strided rows keeps each device's rows on that device: the batch is split over
    ``(data, fsdp)`` in contiguous blocks, and every block holds rows of every microbatch.
    """
    spec = NamedSharding(mesh, P(None, mesh_lib.BATCH_AXES))

    def split(x):
        b = x.shape[0]
        x = x.reshape((b // accum_steps, accum_steps) + x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, spec)

    return jax.tree.map(split, batch)


def _accumulated_gradients(grad_fn, params, model_state, batch: Batch, accum_steps: int, mesh, param_shardings):
    """``(grads, loss, metrics, model_state)`` as means over ``accum_steps`` microbatches of
    ``batch``, run one after the other (``lax.scan``); count metrics are summed."""
    micro = _split_microbatches(batch, accum_steps, mesh)
    first = jax.tree.map(lambda x: x[0], micro)
    (_, (metrics_shape, _)), _ = jax.eval_shape(grad_fn, params, model_state, first)

    def body(carry, mb):
        g_acc, l_acc, m_acc, ms = carry
        (l, (m, ms)), g = grad_fn(params, ms, mb)
        g_acc = jax.tree.map(jnp.add, g_acc, g)
        m_acc = {k: m_acc[k] + m[k] for k in m_acc}
        return (g_acc, l_acc + l, m_acc, ms), None

    zeros_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    zeros_g = jax.lax.with_sharding_constraint(zeros_g, param_shardings)
    zeros_m = {k: jnp.zeros((), jnp.float32) for k in metrics_shape}
    (grads, loss, metrics, model_state), _ = jax.lax.scan(
        body, (zeros_g, jnp.zeros((), jnp.float32), zeros_m, model_state), micro)
    grads = jax.tree.map(lambda g: g / accum_steps, grads)
    metrics = {k: v if _is_count(k) else v / accum_steps for k, v in metrics.items()}
    return grads, loss / accum_steps, metrics, model_state


def make_train_step(
    setup: TrainSetup,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    schedule: optax.Schedule | None = None,
    accum_steps: int = 1,
    compute_dtype: Any = None,
    donate: bool = True,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Build the jitted ``(state, batch) -> (new_state, metrics)`` train step.

    Args:
      setup: from :func:`bioscan_jax.train.state.create_train_state`.
      loss_fn: the task loss (see the module docstring).
      tx: the optax transformation the state was built with.
      schedule: learning-rate schedule, only for the ``lr`` metric.
      accum_steps: gradient accumulation: the batch is split into this many microbatches, run
        one after the other (``lax.scan``), and their mean gradient is applied once. Equal to a
        single big batch when ``loss_fn`` returns a per-example mean.
      compute_dtype: e.g. ``jnp.bfloat16``: floating trainable parameters are cast to it before
        the forward pass (master weights, gradients and optimizer state stay float32). Models
        with their own ``dtype`` setting can use that instead.
      donate: donate the input state buffers (the caller must not reuse the old state).
    """
    mesh = setup.mesh
    forward = _forward(setup, loss_fn, compute_dtype, train=True)
    grad_fn = jax.value_and_grad(forward, has_aux=True)
    param_shardings = setup.shardings["params"]

    def step(state: TrainState, batch: Batch):
        params, model_state = state["params"], state["model_state"]
        if accum_steps == 1:
            (loss, (metrics, model_state)), grads = grad_fn(params, model_state, batch)
        else:
            grads, loss, metrics, model_state = _accumulated_gradients(
                grad_fn, params, model_state, batch, accum_steps, mesh, param_shardings)
        grads = jax.lax.with_sharding_constraint(grads, param_shardings)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        params = optax.apply_updates(params, updates)
        out = dict(metrics)
        out["loss"] = loss
        out["grad_norm"] = grad_norm
        out["param_norm"] = optax.global_norm(params)
        if schedule is not None:
            out["lr"] = jnp.asarray(schedule(state["step"]), jnp.float32)
        new_state = {
            "step": state["step"] + 1,
            "params": params,
            "model_state": model_state,
            "opt_state": opt_state,
        }
        return new_state, out

    jitted = jax.jit(
        step,
        in_shardings=(setup.shardings, mesh_lib.batch_sharding(mesh)),
        out_shardings=(setup.shardings, mesh_lib.replicated(mesh)),
        donate_argnums=(0,) if donate else (),
    )

    def train_step(state: TrainState, batch: Batch):
        with mesh_lib.mesh_context(mesh, setup.rules):
            return jitted(state, batch)

    train_step.jitted = jitted  # type: ignore[attr-defined]
    return train_step
