"""Parameter surgery, in one place: path keys, a shape-checked copy into a module, and placing a
module's variables on a mesh.

Everything that moves parameter values between trees uses these: the train loop's warm start
(:func:`bioscan_jax.train.state.warm_start`), the CLIBD towers' pretrained encoders
(:func:`bioscan_jax.models.towers.load_params`), restoring a CLIBD run
(:func:`bioscan_jax.tasks.clibd.training.load_towers`), the best-on-validation keeper, and the ZSC
embedding cache.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bioscan_jax import sharding as mesh_lib
from bioscan_jax.models import layers


def path_key(path: tuple[Any, ...]) -> tuple[Any, ...]:
    """A tree path (``DictKey``/``GetAttrKey``/``SequenceKey`` entries, or plain names) as plain
    names and indices, so paths from a pure dict, an ``nnx.State`` and a checkpoint compare."""
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)


def flat_shapes(tree: Any) -> dict[tuple[Any, ...], tuple[int, ...]]:
    """``{path_key: shape}`` of every leaf of ``tree``."""
    return {path_key(p): tuple(jnp.shape(v)) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def as_pure(values: nnx.State | Mapping[str, Any]) -> dict[str, Any]:
    """A pure nested dict of ``values``, layer indices as ints (checkpoints restore them as str)."""
    pure = values.to_pure_dict() if isinstance(values, nnx.State) else dict(values)
    return nnx.restore_int_paths(pure)


def copy_into(module: nnx.Module, values: nnx.State | Mapping[str, Any], what: str) -> None:
    """Copies ``values`` (an ``nnx.State`` or pure dict of ``module``'s ``nnx.Param``s) into
    ``module`` in place, each encoder's ``layers`` in the module's layout (unrolled or scanned,
    :func:`bioscan_jax.models.layers.match_layer_layout`). The paths and shapes must then match
    exactly: a mismatch raises ``ValueError`` naming ``what`` and the first differing paths."""
    target = nnx.state(module, nnx.Param)
    # either Encoder layout loads into either (unrolled blocks <-> stacked for nnx.scan)
    pure = layers.match_layer_layout(as_pure(values), target.to_pure_dict())
    want = {path_key(p): tuple(jnp.shape(v)) for p, v in nnx.to_flat_state(target)}
    have = flat_shapes(pure)
    if want != have:
        diff = sorted(".".join(map(str, p)) for p in set(want) ^ set(have)
                      | {p for p in set(want) & set(have) if want[p] != have[p]})
        raise ValueError(f"{what} does not match the model: {diff[:10]}")
    target.replace_by_pure_dict(pure)
    nnx.update(module, target)


def place_on_mesh(module: nnx.Module, mesh, rules) -> None:
    """Puts the module's variables on ``mesh``, sharded by the logical-axis ``rules``, in place."""
    state = nnx.state(module)
    shardings = mesh_lib.variable_shardings(state, mesh, mesh_lib.normalize_rules(rules))
    state.replace_by_pure_dict(jax.device_put(state.to_pure_dict(), shardings))
    nnx.update(module, state)
