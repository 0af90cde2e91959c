"""Build model + optimizer state, sharded under the mesh, in one init function.

The train state is a plain dict (easy to checkpoint, to inspect and to pass through ``jax.jit``)::

    {
      'step':        int32 scalar, number of optimiser updates done,
      'params':      trainable parameters (pure nested dict, like ``nnx.State.to_pure_dict()``),
      'model_state': every other model variable: RNG keys/counters of the NNX ``Rngs`` streams
                     (dropout), frozen parameters, batch statistics...,
      'opt_state':   the optax state over ``params``,
    }

The static half of the model (its ``nnx.GraphDef``) lives in :class:`TrainSetup`, together with
the concrete ``NamedSharding`` of every leaf and the abstract state (``jax.ShapeDtypeStruct``
with those shardings), which is also the restore target for checkpoints.

How the state is created (:func:`create_train_state`):

1. ``nnx.eval_shape`` of ``model_factory(rngs)`` with eager sharding off (no compute, no mesh
   needed) gives the graphdef, shapes and the logical axis names of every parameter;
2. the rules table maps those names to concrete ``NamedSharding`` on the mesh
   (:func:`bioscan_jax.sharding.variable_shardings`); the optimizer state inherits the sharding
   of the parameter it mirrors (Adam's ``mu``/``nu``), its counters are replicated;
3. a ``jax.jit``-ed init with ``out_shardings`` creates the parameters and the optimizer state
   directly in their shards: no device ever holds the whole unsharded model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bioscan_jax import sharding as mesh_lib
from bioscan_jax.models import layers
from bioscan_jax.models import params as params_lib

ModelFactory = Callable[[nnx.Rngs], nnx.Module]
TrainState = dict[str, Any]


def make_rngs(seed: int) -> nnx.Rngs:
    """The ``nnx.Rngs`` handed to model factories: ``params`` and ``dropout`` streams from ``seed``."""
    return nnx.Rngs(seed, params=seed, dropout=seed + 1)


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """Everything static about a train state: model structure, shardings, abstract state."""

    graphdef: nnx.GraphDef
    mesh: Mesh
    rules: mesh_lib.Rules
    shardings: TrainState  # same tree as the state, NamedSharding leaves
    abstract_state: TrainState  # same tree, ShapeDtypeStruct leaves with concrete shardings
    trainable: Any = nnx.Param  # nnx filter for the optimised variables

    def merge(self, state: TrainState) -> nnx.Module:
        """A live NNX model from a train state (for evaluation, export, inspection)."""
        return nnx.merge(self.graphdef, state["params"], state["model_state"])


def _opt_state_shardings(abstract_opt: Any, abstract_params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Sharding for each optimizer-state leaf: the sharding of the parameter whose path is the
    longest suffix of the leaf's path and whose shape matches; replicated otherwise."""
    by_path: dict[tuple, tuple[tuple[int, ...], NamedSharding]] = {}
    for (path, leaf), sharding in zip(
        jax.tree_util.tree_flatten_with_path(abstract_params)[0], jax.tree_util.tree_leaves(param_shardings)
    ):
        by_path[params_lib.path_key(path)] = (tuple(leaf.shape), sharding)
    rep = NamedSharding(mesh, P())

    def one(path, leaf):
        key = params_lib.path_key(path)
        for start in range(len(key)):
            hit = by_path.get(key[start:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return hit[1]
        return rep

    return jax.tree_util.tree_map_with_path(one, abstract_opt)


def abstract_train_state(
    model_factory: ModelFactory,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: Any = None,
    *,
    seed: int = 0,
    trainable: Any = nnx.Param,
) -> TrainSetup:
    """Shapes, shardings and graphdef of the train state, without allocating anything."""
    rules = mesh_lib.normalize_rules(rules)
    with nnx.use_eager_sharding(False):
        abs_model = nnx.eval_shape(lambda: model_factory(make_rngs(seed)))
    graphdef, params_state, rest_state = nnx.split(abs_model, trainable, ...)
    param_shardings = mesh_lib.variable_shardings(params_state, mesh, rules)
    rest_shardings = mesh_lib.variable_shardings(rest_state, mesh, rules)
    abs_params = params_state.to_pure_dict()
    abs_rest = rest_state.to_pure_dict()
    abs_opt = jax.eval_shape(tx.init, abs_params)
    opt_shardings = _opt_state_shardings(abs_opt, abs_params, param_shardings, mesh)
    rep = NamedSharding(mesh, P())
    shardings = {"step": rep, "params": param_shardings, "model_state": rest_shardings, "opt_state": opt_shardings}
    abstract = {
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "params": abs_params,
        "model_state": abs_rest,
        "opt_state": abs_opt,
    }
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return TrainSetup(graphdef=graphdef, mesh=mesh, rules=rules, shardings=shardings,
                      abstract_state=abstract, trainable=trainable)


def init_train_state(
    setup: TrainSetup, model_factory: ModelFactory, tx: optax.GradientTransformation, *, seed: int = 0
) -> TrainState:
    """Create the train state described by ``setup``, each array born in its shards."""

    def init() -> TrainState:
        with nnx.use_eager_sharding(False):
            model = model_factory(make_rngs(seed))
        _, params, rest = nnx.split(model, setup.trainable, ...)
        params = params.to_pure_dict()
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "model_state": rest.to_pure_dict(),
            "opt_state": tx.init(params),
        }

    with mesh_lib.mesh_context(setup.mesh, setup.rules):
        return jax.jit(init, out_shardings=setup.shardings)()


def warm_start(setup: TrainSetup, state: TrainState, partial_params: Any) -> TrainState:
    """Replace part of ``state['params']`` with given values (e.g. a pretrained encoder).

    ``partial_params`` is a nested dict shaped like a sub-tree of the parameters (e.g.
    ``{'bert': nnx.state(pretrained.bert, nnx.Param).to_pure_dict()}``); each value is placed with
    its parameter's sharding. Unknown paths and shape mismatches raise. Preferable to copying
    weights inside the model factory, which would bake them into the compiled init as constants.
    """
    # either Encoder layout warm-starts either (unrolled blocks <-> stacked for nnx.scan)
    partial_params = layers.match_layer_layout(params_lib.as_pure(partial_params), state["params"])
    flat_new = {params_lib.path_key(p): v for p, v in jax.tree_util.tree_flatten_with_path(partial_params)[0]}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state["params"])
    shardings = jax.tree.leaves(setup.shardings["params"])
    known = {params_lib.path_key(p) for p, _ in leaves}
    unknown = sorted(".".join(map(str, k)) for k in flat_new if k not in known)
    if unknown:
        raise ValueError(f"warm-start values for unknown parameters: {unknown[:10]}")
    out = []
    for (path, old), sharding in zip(leaves, shardings):
        key = params_lib.path_key(path)
        if key not in flat_new:
            out.append(old)
            continue
        new = flat_new[key]
        if tuple(new.shape) != tuple(old.shape):
            raise ValueError(
                f"warm-start value for {'.'.join(map(str, key))} has shape {tuple(new.shape)}, "
                f"the model expects {tuple(old.shape)}")
        out.append(jax.device_put(jnp.asarray(new, old.dtype), sharding))
    return {**state, "params": jax.tree_util.tree_unflatten(treedef, out)}


def create_train_state(
    model_factory: ModelFactory,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: Any = None,
    *,
    seed: int = 0,
    trainable: Any = nnx.Param,
) -> tuple[TrainSetup, TrainState]:
    """The one init function: ``(setup, state)`` with parameters and optimizer state sharded.

    ``model_factory(rngs)`` builds the NNX model (``rngs`` from :func:`make_rngs`); ``trainable``
    is the nnx filter of the variables the optimizer updates (default every ``nnx.Param``; e.g.
    ``nnx.All(nnx.Param, nnx.PathContains('head'))`` for a linear probe).
    """
    setup = abstract_train_state(model_factory, tx, mesh, rules, seed=seed, trainable=trainable)
    return setup, init_train_state(setup, model_factory, tx, seed=seed)
