"""Device mesh, logical-axis sharding rules, host → global batches, and gathering across processes.

The one module below models, training and evaluation that all of them use for sharding (as
big_vision's ``sharding.py``): models call :func:`constrain` on activations, the train loop and
the evaluators build meshes, shard batches and gather results with it.

Mesh
----
Every run uses one 3-axis mesh ``('data', 'fsdp', 'tensor')`` built from ``config.mesh``
(``{data, fsdp, tensor}``; one of them may be ``-1`` = "all remaining devices"). All axes are
``AxisType.Auto``: the compiler propagates shardings from the jitted functions' in/out
shardings.

* ``data``   pure data parallelism (parameters replicated, batch split);
* ``fsdp``   batch split *and* parameters sharded along their ``embed`` dimension (ZeRO-3);
* ``tensor`` parameters sharded along ``mlp`` / ``heads`` / ``vocab`` (Megatron style).

The batch dimension is split over ``('data', 'fsdp')`` (:data:`BATCH_AXES`).

Logical-axis rules
------------------
Parameters carry logical axis names (``nnx.with_partitioning(init, ('embed', 'mlp'))``). A rules
table (``config.sharding_rules``, MaxText style) maps each logical name to mesh axes::

    (('batch', ('data', 'fsdp')), ('embed', 'fsdp'), ('mlp', 'tensor'), ...)

A rule value is a mesh-axis name, a tuple of names, or ``None`` (replicated). A logical name may
appear several times: the candidates are tried in order and the first one that (a) uses no mesh
axis already used by another dimension of the same array and (b) divides the dimension's size
wins. When no candidate fits, the dimension is **replicated** and a warning names the parameter
(e.g. a vocabulary of ``4**k + 2`` rows never divides ``tensor=4``). A logical name with no rule
at all is a configuration error (raised, naming the parameter and the missing rule).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as core_spmd
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bioscan_jax import config_access

logger = logging.getLogger(__name__)

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")
BATCH_AXES: tuple[str, str] = ("data", "fsdp")

#: Default rules table; configs keep their own copy in ``config.sharding_rules``.
DEFAULT_SHARDING_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("classes", None),
    ("length", None),
    ("norm", None),
    ("layers", None),  # the stacked-blocks axis of scanned encoders
)

Rules = tuple[tuple[str, Any], ...]


# ---------------------------------------------------------------------------------------------
# Multi-process start-up
# ---------------------------------------------------------------------------------------------

def _env_int(name: str) -> int:
    try:
        return int(os.environ.get(name, "1") or 1)
    except ValueError:
        return 1


def maybe_initialize_distributed() -> bool:
    """Call ``jax.distributed.initialize()`` when the environment says this is a multi-process run.

    Single-process runs (the norm on one CPU/GPU) do nothing. A multi-process launch is recognised
    by ``JAX_NUM_PROCESSES > 1`` or ``JAX_COORDINATOR_ADDRESS`` (explicit settings, also read:
    ``JAX_PROCESS_ID``), or a cluster JAX auto-detects: SLURM or Open MPI with more than one task,
    a multi-host Cloud TPU slice (``TPU_WORKER_HOSTNAMES`` lists several hosts). Returns True when
    ``initialize`` was called here. Must run before anything touches a JAX backend; a second call
    is a no-op.
    """
    env = os.environ
    if jax.distributed.is_initialized():
        return False
    multi = (
        _env_int("JAX_NUM_PROCESSES") > 1
        or "JAX_COORDINATOR_ADDRESS" in env
        or _env_int("SLURM_NTASKS") > 1
        or _env_int("OMPI_COMM_WORLD_SIZE") > 1
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
    )
    if not multi:
        return False
    kwargs: dict[str, Any] = {}
    if "JAX_COORDINATOR_ADDRESS" in env:
        kwargs["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
    if "JAX_NUM_PROCESSES" in env:
        kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
    if "JAX_PROCESS_ID" in env:
        kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
    # Optional timeouts (seconds), so that a dead or missing peer fails the others instead of
    # hanging them (set by bioscan_jax.launch; see docs/pod_guide.md).
    for name, arg in (("BIOSCAN_INIT_TIMEOUT_S", "initialization_timeout"),
                      ("BIOSCAN_HEARTBEAT_TIMEOUT_S", "heartbeat_timeout_seconds"),
                      ("BIOSCAN_SHUTDOWN_TIMEOUT_S", "shutdown_timeout_seconds")):
        if env.get(name):
            kwargs[arg] = int(env[name])
    jax.distributed.initialize(**kwargs)
    logger.info("jax.distributed initialised: process %d of %d", jax.process_index(), jax.process_count())
    return True


# ---------------------------------------------------------------------------------------------
# Mesh
# ---------------------------------------------------------------------------------------------


def mesh_shape(mesh_config: Any, num_devices: int) -> tuple[int, int, int]:
    """Resolve ``{data, fsdp, tensor}`` (``-1`` = fill) against ``num_devices``; raise on mismatch."""
    given = {a: config_access.get(mesh_config, a) for a in MESH_AXES}
    # An unspecified axis is 1, except `data`, which fills when no other axis does.
    fill_data = given["data"] is None and -1 not in (given["fsdp"], given["tensor"])
    sizes = [int(given[a]) if given[a] is not None else (-1 if a == "data" and fill_data else 1)
             for a in MESH_AXES]
    desc = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))
    fill = [i for i, s in enumerate(sizes) if s == -1]
    bad = [a for a, s in zip(MESH_AXES, sizes) if s == 0 or s < -1]
    if bad:
        raise ValueError(
            f"config.mesh ({desc}): axis sizes must be positive or -1 (fill); fix config.mesh.{bad[0]}")
    if len(fill) > 1:
        raise ValueError(
            f"config.mesh ({desc}): at most one axis may be -1; set all but one of "
            f"{[MESH_AXES[i] for i in fill]} to explicit sizes")
    fixed = math.prod(s for s in sizes if s != -1)
    if fill:
        if num_devices % fixed:
            raise ValueError(
                f"config.mesh ({desc}): the fixed axes multiply to {fixed}, which does not divide the "
                f"{num_devices} available devices; change config.mesh so that the product divides "
                f"{num_devices}")
        sizes[fill[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(
            f"config.mesh ({desc}): the mesh has {fixed} devices but {num_devices} are available; "
            f"set one axis to -1 or make data*fsdp*tensor == {num_devices}")
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(mesh_config: Any = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build the ``('data', 'fsdp', 'tensor')`` mesh from ``config.mesh`` over all (or given) devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices)


def normalize_rules(rules: Any) -> Rules:
    """Rules from a config (tuples, lists or a ConfigDict field) → a tuple of ``(name, axes)``."""
    if rules is None:
        return DEFAULT_SHARDING_RULES
    out = []
    for entry in rules:
        if len(entry) != 2:
            raise ValueError(f"config.sharding_rules: each rule is (logical_name, mesh_axes); got {entry!r}")
        name, axes = entry
        if isinstance(axes, list):
            axes = tuple(axes)
        if isinstance(axes, tuple) and len(axes) == 1:
            axes = axes[0]
        out.append((str(name), axes))
    return tuple(out)


def _axes_tuple(axes: Any) -> tuple[str, ...]:
    if axes is None:
        return ()
    if isinstance(axes, str):
        return (axes,)
    return tuple(axes)


def logical_to_spec(
    logical_axes: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh | jax.sharding.AbstractMesh,
    rules: Rules,
    *,
    name: str = "array",
    fallbacks: list[str] | None = None,
) -> P:
    """Map logical axis names of an array of ``shape`` to a ``PartitionSpec`` on ``mesh``.

    See the module docstring for the rule semantics. Dimensions that cannot be sharded as the
    rules ask are replicated; a description is appended to ``fallbacks`` when given (otherwise
    a warning is logged).
    """
    if not logical_axes:
        return P()
    if len(logical_axes) != len(shape):
        raise ValueError(
            f"{name}: {len(logical_axes)} logical axes {tuple(logical_axes)} for an array of shape "
            f"{tuple(shape)}; fix the nnx.with_partitioning names of this parameter")
    table: dict[str, list[Any]] = {}
    for key, axes in rules:
        table.setdefault(key, []).append(axes)
    mesh_sizes = dict(mesh.shape)
    used: set[str] = set()
    spec: list[Any] = []
    for dim, (logical, size) in enumerate(zip(logical_axes, shape)):
        if logical is None:
            spec.append(None)
            continue
        if logical in table:
            candidates = table[logical]
        elif logical in mesh_sizes:
            candidates = [logical]
        else:
            raise ValueError(
                f"{name}: logical axis {logical!r} has no sharding rule; add e.g. ({logical!r}, None) "
                f"(replicated) or ({logical!r}, 'fsdp') to config.sharding_rules")
        chosen: Any = None
        for cand in candidates:
            axes = _axes_tuple(cand)
            unknown = [a for a in axes if a not in mesh_sizes]
            if unknown:
                raise ValueError(
                    f"config.sharding_rules maps {logical!r} to unknown mesh axes {unknown}; "
                    f"mesh axes are {tuple(mesh_sizes)}")
            if not axes:
                chosen = None
                break
            if used.intersection(axes):
                continue
            if size % math.prod(mesh_sizes[a] for a in axes):
                continue
            chosen = axes[0] if len(axes) == 1 else axes
            break
        else:
            if any(_axes_tuple(c) for c in candidates):
                msg = (f"{name}: dim {dim} ({logical!r}, size {size}) cannot be sharded over "
                       f"{candidates} on mesh {mesh_sizes} (size not divisible, or the mesh axis is "
                       f"taken by another dim); replicated")
                if fallbacks is not None:
                    fallbacks.append(msg)
                else:
                    logger.warning(msg)
        used.update(_axes_tuple(chosen))
        spec.append(chosen)
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def _path_str(path: Sequence[Any]) -> str:
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return ".".join(parts)


def variable_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> dict:
    """NamedShardings (as a pure nested dict, like ``state.to_pure_dict()``) for an NNX state.

    Variables with ``out_sharding`` metadata (set by ``nnx.with_partitioning``) are sharded by the
    rules; everything else (RNG keys and counters, unannotated variables) is replicated.
    """
    fallbacks: list[str] = []

    def one(path, var):
        value = var.get_value() if isinstance(var, nnx.Variable) else var
        shape = tuple(getattr(value, "shape", ()))
        logical = None
        if isinstance(var, nnx.Variable):
            meta = var.get_metadata()
            logical = meta.get("out_sharding") or None
            if isinstance(logical, (P, NamedSharding)):
                logical = tuple(logical.spec if isinstance(logical, NamedSharding) else logical)
        spec = logical_to_spec(logical, shape, mesh, rules, name=_path_str(path), fallbacks=fallbacks)
        return var.replace(NamedSharding(mesh, spec)) if isinstance(var, nnx.Variable) else NamedSharding(mesh, spec)

    shardings = jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    for msg in fallbacks:
        logger.warning(msg)
    return shardings.to_pure_dict() if isinstance(shardings, nnx.State) else shardings


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """``jax.set_mesh(mesh)`` plus flax's logical-axis rules, for code that uses
    ``jax.lax.with_sharding_constraint`` with PartitionSpecs or logical names inside a model."""
    with jax.set_mesh(mesh), core_spmd.logical_axis_rules(rules):
        yield


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical names (e.g. ``('batch', 'length', None)``).

    For use inside models: resolves the names with the rules of the enclosing
    :func:`mesh_context` (which the train/eval steps set) and applies
    ``jax.lax.with_sharding_constraint``; outside any mesh/rules context it returns ``x``
    unchanged, so models stay usable on one device without a mesh.
    """
    mesh = jax.sharding.get_abstract_mesh()
    rules = core_spmd.get_logical_axis_rules()
    if mesh.empty or not rules:
        return x
    spec = logical_to_spec(tuple(logical_axes), x.shape, mesh, normalize_rules(rules), name="activation",
                           fallbacks=[])
    return jax.lax.with_sharding_constraint(x, spec)


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


def batch_axis_size(mesh: Mesh | Mapping[str, int]) -> int:
    """Number of batch shards: ``data * fsdp`` (of a mesh or a ``{axis: size}`` mapping)."""
    sizes = dict(mesh.shape) if isinstance(mesh, Mesh) else dict(mesh)
    return math.prod(sizes[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ``('data', 'fsdp')``, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def process_batch_size(global_batch: int) -> int:
    """This process's rows of a global batch (what its input pipeline batches)."""
    return global_batch // jax.process_count()


def nearest_multiple(value: int, n: int) -> int:
    """The positive multiple of ``n`` nearest to ``value`` (the lower one on a tie)."""
    below = (value // n) * n
    above = below + n
    return below if below > 0 and value - below <= above - value else above


def _neighbours(value: int, n: int) -> str:
    below = (value // n) * n
    return ", ".join(str(m) for m in (below, below + n) if m > 0)


def validate_batch(global_batch: int, mesh: Mesh | Mapping[str, int], accum_steps: int = 1) -> None:
    """Raise (before any compute) when the batch cannot be split as configured."""
    sizes = dict(mesh.shape) if isinstance(mesh, Mesh) else dict(mesh)
    n = batch_axis_size(sizes)
    if global_batch <= 0:
        raise ValueError(f"config.train.batch_size must be positive, got {global_batch}")
    if accum_steps <= 0:
        raise ValueError(f"config.train.accum_steps must be >= 1, got {accum_steps}")
    mesh_text = ", ".join(f"{a}={sizes.get(a, 1)}" for a in MESH_AXES)
    if global_batch % n:
        raise ValueError(
            f"config.train.batch_size={global_batch} is not divisible by the batch shards "
            f"data*fsdp={sizes['data']}*{sizes['fsdp']}={n} (mesh {mesh_text}); the nearest valid batch is "
            f"{nearest_multiple(global_batch, n)} (multiples of {n}: {_neighbours(global_batch, n)})")
    if global_batch % accum_steps:
        raise ValueError(
            f"config.train.accum_steps={accum_steps} does not divide config.train.batch_size="
            f"{global_batch}; pick a divisor of the batch size")
    micro = global_batch // accum_steps
    if micro % n:
        raise ValueError(
            f"microbatch batch_size/accum_steps={micro} is not divisible by data*fsdp={n} (mesh {mesh_text}); "
            f"lower config.train.accum_steps or set config.train.batch_size to a multiple of {n * accum_steps}: "
            f"the nearest is {nearest_multiple(global_batch, n * accum_steps)}")
    if global_batch % jax.process_count():
        raise ValueError(
            f"config.train.batch_size={global_batch} is not divisible by the {jax.process_count()} processes")


def to_global_batch(local_batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Process-local numpy batch (leading dim = this process's share) → global sharded arrays."""
    sharding = batch_sharding(mesh)
    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        if value.ndim == 0:
            raise ValueError(f"batch entry {key!r} is a scalar; every batch entry needs a leading batch dimension")
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out


# ---------------------------------------------------------------------------------------------
# Across processes: gather per-process results, replicate a host tree
# ---------------------------------------------------------------------------------------------

def gather_same_shape(x: np.ndarray) -> np.ndarray:
    """``[processes, *x.shape]``: ``x`` of every process (all of one shape and dtype)."""
    return np.asarray(multihost_utils.process_allgather(x))


def allgather_rows(x: Any) -> np.ndarray:
    """Concatenate each process's ``x`` (any number of rows) along axis 0, in process order.

    Every process gets the whole result. Numbers, booleans and strings are supported; the
    trailing dimensions must agree across processes.
    """
    x = np.asarray(x)
    if jax.process_count() == 1:
        return x
    if x.ndim == 0:
        raise ValueError("allgather_rows needs arrays with a leading (row) dimension")
    kind = x.dtype.kind
    if kind in "US":  # strings: gather as fixed-width code points
        width = int(gather_same_shape(np.asarray([x.dtype.itemsize // (4 if kind == "U" else 1)], np.int64)).max())
        width = max(width, 1)
        target = np.dtype(f"{kind}{width}")
        codes = x.astype(target).view(np.uint32 if kind == "U" else np.uint8).reshape(x.shape + (width,))
        gathered = allgather_rows(codes.astype(np.int32))
        return gathered.astype(np.uint32 if kind == "U" else np.uint8).view(target).reshape(gathered.shape[:-1])
    if kind == "b":
        return allgather_rows(x.astype(np.uint8)).astype(bool)
    counts = gather_same_shape(np.asarray([x.shape[0]], np.int64))[:, 0]
    longest = int(counts.max())
    padded = np.zeros((longest,) + x.shape[1:], x.dtype)
    padded[: x.shape[0]] = x
    every = gather_same_shape(padded)
    return np.concatenate([every[p, : int(n)] for p, n in enumerate(counts)], axis=0)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Put every leaf of ``tree`` (identical on all processes) on all devices of ``mesh``.

    Leaves that already are global arrays (spanning several processes, e.g. a train state) are
    left as they are.
    """
    sharding = NamedSharding(mesh, P())

    def put(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # RNG state
            return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        x = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)
