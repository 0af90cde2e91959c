r"""Memory planner: will this config's train step fit on that accelerator, on that mesh?

    python -m bioscan_jax.plan --config=configs/barcodebert.py:paper --mesh=fsdp=64 --accelerator v5e
    python -m bioscan_jax.plan --config=configs/clibd.py:paper --mesh=fsdp=8 --accelerator all
    python -m bioscan_jax.plan --config=configs/clibd.py:paper --mesh=fsdp=64 --remat \
        --config.train.batch_size=4096 --json
    python -m bioscan_jax.plan --config=configs/barcodebert.py:paper --mesh=data=1 \
        --config.pretrain.train.batch_size=16 --measure      # check the estimate against a real step

``--config`` and ``--config.<field>=<value>`` are parsed by ``ml_collections.config_flags``, as
by ``run.py``: the planner sees exactly the config a run would.

The planner builds the config's real train step (model, loss, optimizer, sharding rules, bf16
and gradient-accumulation settings — the same code the trainer runs) on a mesh of *fake* CPU
devices of the requested shape, compiles it ahead of time from abstract inputs
(``jax.jit(...).lower(abstract state, abstract batch).compile()``; nothing is allocated) and
reads XLA's per-device memory analysis:

=============== =================================================================================
parameters      this device's shards of the trainable parameters (from their shardings)
optimizer       this device's shards of the optimizer state (Adam's mu and nu, counters)
batch           this device's rows of the global batch
arguments       everything the step receives (state + batch), per XLA
temporaries     activations, gradients and scratch buffers live during the step (XLA temp)
outputs         new state + metrics; with donation they reuse the argument buffers (aliased)
peak            arguments + temporaries + outputs not aliased to arguments + generated code
=============== =================================================================================

and whether ``peak`` fits each accelerator's memory with 10 % headroom (runtime, fragmentation):
TPU v5e 16 GiB, TPU v5p 95 GiB, H100 80 GiB per chip.

Caveats: the numbers come from the XLA **CPU** compiler. TPU and GPU compilers fuse, lay out
(TPU pads minor dimensions to tiles of 128) and schedule differently, and the CPU backend may
keep bfloat16 intermediates in float32, so treat the estimate as ±25 % and leave headroom.
Fake-device compiles of large meshes are slow (the compile time is printed). ``--measure``
runs one real step on the CPU (mesh of one device) and prints the process's peak resident
memory growth beside the estimate.

The process sets ``XLA_FLAGS=--xla_force_host_platform_device_count=<mesh size>`` before
importing JAX (re-executing itself in a fresh process when JAX is already loaded).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from bioscan_jax import config_access, tasks  # imports nothing heavy: JAX is not loaded here
from bioscan_jax.tasks import StepSpec

GiB = 1024**3
#: Memory per chip (bytes) of the accelerators the planner knows.
ACCELERATORS: dict[str, int] = {"v5e": 16 * GiB, "v5p": 95 * GiB, "h100": 80 * GiB}
#: Fraction of an accelerator's memory the planner lets a step use.
HEADROOM = 0.9
MESH_AXES = ("data", "fsdp", "tensor")
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


# ============================================================================= CLI parsing (no JAX)


def parse_mesh(text: str) -> dict[str, int]:
    """``'fsdp=64'`` / ``'data=2,fsdp=4,tensor=2'`` -> ``{data, fsdp, tensor}`` (missing axes = 1)."""
    sizes = {a: 1 for a in MESH_AXES}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name not in MESH_AXES:
            raise ValueError(f"--mesh: expected axis=size with axes {MESH_AXES}, got {item!r}")
        if int(value) < 1:
            raise ValueError(f"--mesh: {name} must be >= 1, got {value}")
        sizes[name] = int(value)
    return sizes


def load_config(config_flags_argv: Sequence[str]):
    """The config of ``--config=FILE[:ARG]`` and ``--config.x=y`` flags, parsed by
    ``ml_collections.config_flags`` exactly as ``run.py`` parses them; a bad flag is a
    ``ValueError`` with one line (:func:`bioscan_jax.config_errors.one_line`)."""
    from absl import flags
    from ml_collections import config_flags

    from bioscan_jax import config_errors

    values = flags.FlagValues()
    argv = ["plan", *config_flags_argv]
    config_flags.DEFINE_config_file("config", None, "experiment config file", flag_values=values, lock_config=False,
                                    sys_argv=argv)  # the overrides it defines come from these flags
    try:
        values(argv)
    except Exception as e:  # noqa: BLE001 - config_flags raises AttributeError/KeyError/ValueError/flags.Error
        raise ValueError(config_errors.one_line(e)) from None
    if values["config"].value is None:
        raise ValueError("--config is required, e.g. --config=configs/clibd.py:paper")
    return values["config"].value


# ============================================================================= the plan


@dataclasses.dataclass
class Plan:
    """Per-device memory of one train step (bytes) and how long it took to find out."""

    config: str
    task: str
    mesh: dict[str, int]
    devices: int
    global_batch: int
    per_device_batch: float
    num_params: int
    params: int
    optimizer: int
    model_state: int
    batch: int
    arguments: int
    temporaries: int
    outputs: int
    aliased: int
    code: int
    compile_s: float
    notes: list[str] = dataclasses.field(default_factory=list)
    measured: dict[str, float] | None = None

    @property
    def state(self) -> int:
        return self.params + self.optimizer + self.model_state

    @property
    def peak(self) -> int:
        from bioscan_jax.train.loop import peak_bytes  # the train loop's memory check uses the same

        return peak_bytes(self.arguments, self.temporaries, self.outputs, self.aliased, self.code)

    def fits(self, accelerator: str) -> bool:
        return self.peak <= HEADROOM * ACCELERATORS[accelerator]

    def to_json(self, accelerators: Sequence[str] = ()) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["state"] = self.state
        out["peak"] = self.peak
        out["fits"] = {a: self.fits(a) for a in accelerators}
        return out


def set_model_option(config, name: str) -> None:
    """Turn on a boolean encoder option (``remat``, ``scan_layers``) in every encoder of the config."""
    if config.task == "barcodebert":
        config.model[name] = True
        return
    if config.task == "clibd":
        _set_tower_option(config.model, name)
        return
    if config.task == "zsc":  # the BarcodeBERT it may pretrain and the CLIBD towers it may train
        config.barcodebert.model[name] = True
        _set_tower_option(config.clibd.model, name)
        return
    raise ValueError(f"encoder option {name!r}: no encoders known for task {config.task!r}")


def _set_tower_option(model, name: str) -> None:
    for tower in ("image", "dna", "text"):
        section = model[tower]
        overrides = section.get("overrides", None)
        if overrides is None:
            section.overrides = {name: True}
        else:
            overrides[name] = True


def step_spec(config, *, stage: str | None = None, num_classes: int = 22_622, text_vocab: int = 15_000) -> StepSpec:
    """The train step of ``stage`` of ``config.task``, from the task's spec (``stages``: the
    first, the one that needs the most memory, when ``stage`` is not given): BarcodeBERT
    ``pretrain`` or ``finetune``; CLIBD ``train``; ZSC ``clibd`` (the CLIBD towers it trains when
    no CLIBD workdir has them) or ``pretrain`` (the BarcodeBERT it pretrains for
    ``weights='pretrain'``)."""
    spec = tasks.get(config.task)
    if spec.step is None:
        raise ValueError(f"the planner knows no train step of the task {config.task!r}")
    return spec.step(config, stage or spec.stages[0], num_classes=num_classes, text_vocab=text_vocab)


def _shard_bytes(tree) -> int:
    import jax

    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


def build(config, spec: StepSpec, mesh_sizes: Mapping[str, int]):
    """``(setup, train_step, abstract batch)`` of the spec on a mesh of ``mesh_sizes``.

    ``config`` needs only ``sharding_rules`` and ``seed`` (a ConfigDict or a plain dict).
    """
    import jax
    import jax.numpy as jnp

    from bioscan_jax import sharding as mesh_lib
    from bioscan_jax.train import optim as optim_lib
    from bioscan_jax.train.state import abstract_train_state
    from bioscan_jax.train.step import make_train_step

    mesh = mesh_lib.make_mesh(dict(mesh_sizes))
    rules = mesh_lib.normalize_rules(config_access.get(config, "sharding_rules", None))
    batch = int(config_access.get(spec.train, "batch_size", 0))
    accum = int(config_access.get(spec.train, "accum_steps", 1))
    mesh_lib.validate_batch(batch, mesh, accum)
    tx, schedule = optim_lib.make_optimizer(spec.optim, total_steps=1000, global_batch=batch)
    setup = abstract_train_state(spec.model_factory, tx, mesh, rules, seed=int(config_access.get(config, "seed", 0)))
    compute_dtype = jnp.bfloat16 if bool(config_access.get(spec.train, "bf16", False)) else None
    step = make_train_step(setup, spec.loss_fn, tx, schedule=schedule, accum_steps=accum, compute_dtype=compute_dtype)
    sharding = mesh_lib.batch_sharding(mesh)
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in spec.batch.items()}
    return setup, step, abstract_batch


def plan(config, config_name: str, mesh_sizes: Mapping[str, int], spec: StepSpec):
    """Compile the train step for ``mesh_sizes`` from abstract inputs; return ``(Plan, compiled)``."""
    import jax

    from bioscan_jax import sharding as mesh_lib

    devices = math.prod(mesh_sizes.values())
    if jax.device_count() != devices:
        raise RuntimeError(f"the mesh needs {devices} devices, JAX has {jax.device_count()}; run the planner "
                           f"as `python -m bioscan_jax.plan` (it sets the fake device count itself)")
    setup, step, abstract_batch = build(config, spec, mesh_sizes)
    t0 = time.perf_counter()
    with mesh_lib.mesh_context(setup.mesh, setup.rules):
        compiled = step.jitted.lower(setup.abstract_state, abstract_batch).compile()
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    state = setup.abstract_state
    batch = int(config_access.get(spec.train, "batch_size", 0))
    result = Plan(
        config=config_name, task=spec.task, mesh=dict(mesh_sizes), devices=devices, global_batch=batch,
        per_device_batch=batch / mesh_lib.batch_axis_size(setup.mesh),
        num_params=sum(math.prod(x.shape) for x in jax.tree.leaves(state["params"])),
        params=_shard_bytes(state["params"]), optimizer=_shard_bytes(state["opt_state"]),
        model_state=_shard_bytes(state["model_state"]) + _shard_bytes(state["step"]),
        batch=_shard_bytes(abstract_batch),
        arguments=int(ma.argument_size_in_bytes), temporaries=int(ma.temp_size_in_bytes),
        outputs=int(ma.output_size_in_bytes), aliased=int(ma.alias_size_in_bytes),
        code=int(ma.generated_code_size_in_bytes), compile_s=compile_s, notes=list(spec.notes))
    if bool(config_access.get(spec.train, "bf16", False)) and jax.default_backend() == "cpu":
        result.notes.append("bf16 compute (CPU estimate may keep some bf16 intermediates in f32)")
    return result, compiled, setup, abstract_batch


# ============================================================================= measuring a real step


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (the peak resident set size) to the current RSS


def _random_batch(abstract_batch) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    out = {}
    for k, s in abstract_batch.items():
        if np.issubdtype(s.dtype, np.floating):
            out[k] = rng.random(s.shape, dtype=np.float32).astype(s.dtype)
        elif s.dtype == np.bool_:
            out[k] = np.ones(s.shape, bool)
        else:  # token ids / labels: small valid values
            out[k] = rng.integers(2, 4 if k.startswith("label") else 60, s.shape).astype(s.dtype)
    return out


def measure(result: Plan, compiled, setup, abstract_batch, spec: StepSpec, config) -> dict[str, float]:
    """Run the compiled step once on random inputs (one-device mesh) and measure its memory.

    On an accelerator with memory statistics (GPU): ``total_bytes`` is the device's
    ``peak_bytes_in_use`` (state, batch and the step together). On the CPU: the process's
    resident memory. ``state_bytes`` is the growth while the train state is created (on the CPU
    it includes compiling the init program); ``step_peak_bytes`` the growth of the peak during
    the step over what was held just before it (temporaries, gradients, outputs not written in
    place); ``total_bytes`` the exact state and batch size plus ``step_peak_bytes``.
    Compare ``total_bytes`` with the planned ``peak``.
    """
    import jax

    from bioscan_jax.train import optim as optim_lib
    from bioscan_jax.train.state import init_train_state

    if result.devices != 1:
        raise ValueError("--measure runs on a one-device mesh (e.g. --mesh=data=1); CPU devices share host memory")
    device = jax.local_devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    tx, _ = optim_lib.make_optimizer(spec.optim, total_steps=1000, global_batch=result.global_batch)
    host_batch = _random_batch(abstract_batch)
    gc.collect()
    before = stats["bytes_in_use"] if stats else _status_kib("VmRSS") * 1024
    state = init_train_state(setup, spec.model_factory, tx, seed=int(config_access.get(config, "seed", 0)))
    batch = {k: jax.device_put(v, abstract_batch[k].sharding) for k, v in host_batch.items()}
    jax.block_until_ready((state, batch))
    gc.collect()
    if stats:
        with_state = device.memory_stats()["bytes_in_use"]
    else:
        with_state = _status_kib("VmRSS") * 1024
        _reset_peak_rss()
    t0 = time.perf_counter()
    out = compiled(state, batch)
    jax.block_until_ready(out)
    step_s = time.perf_counter() - t0
    loss = float(out[1]["loss"])
    if stats:
        peak = device.memory_stats()["peak_bytes_in_use"]
        return {"state_bytes": with_state - before, "step_peak_bytes": peak - with_state,
                "total_bytes": peak, "step_s": step_s, "loss": loss, "source": f"{device.platform} peak_bytes_in_use"}
    peak = _status_kib("VmHWM") * 1024
    return {"state_bytes": with_state - before, "step_peak_bytes": peak - with_state,
            "total_bytes": result.state + result.batch + peak - with_state, "step_s": step_s, "loss": loss,
            "source": "cpu resident memory"}


# ============================================================================= output


def _gib(n: float) -> str:
    return f"{n / GiB:8.2f} GiB"


def format_plan(p: Plan, accelerators: Sequence[str]) -> str:
    mesh = ", ".join(f"{a}={n}" for a, n in p.mesh.items())
    lines = [
        f"{p.config}  task={p.task}  mesh: {mesh} ({p.devices} devices)",
        f"  global batch {p.global_batch} ({p.per_device_batch:g} per batch shard), "
        f"{p.num_params / 1e6:.1f} M parameters; compiled in {p.compile_s:.1f} s",
        *(f"  {n}" for n in p.notes),
        "  per device:",
        f"    parameters    {_gib(p.params)}",
        f"    optimizer     {_gib(p.optimizer)}",
        f"    batch         {_gib(p.batch)}",
        f"    arguments     {_gib(p.arguments)}   (XLA: state + batch)",
        f"    temporaries   {_gib(p.temporaries)}   (XLA: activations, gradients, scratch)",
        f"    outputs       {_gib(p.outputs)}   ({_gib(p.aliased).strip()} aliased to donated inputs)",
        f"    peak          {_gib(p.peak)}",
    ]
    for a in accelerators:
        cap = ACCELERATORS[a]
        verdict = "fits" if p.fits(a) else "does NOT fit"
        lines.append(f"  {a:5s} {cap / GiB:4.0f} GiB: {verdict} ({100 * p.peak / cap:.0f} % of memory; limit "
                     f"{100 * HEADROOM:.0f} %)")
    if p.measured:
        m = p.measured
        ratio = m["total_bytes"] / p.peak if p.peak else float("nan")
        lines += [
            f"  measured (one real step; {m.get('source', '')}):",
            f"    state         {_gib(m['state_bytes'])}   (planned {_gib(p.state + p.batch).strip()})",
            f"    during step   {_gib(m['step_peak_bytes'])}   (planned temporaries + new outputs "
            f"{_gib(p.temporaries + max(p.outputs - p.aliased, 0)).strip()})",
            f"    total         {_gib(m['total_bytes'])}   (state + batch + during step; planned peak "
            f"{_gib(p.peak).strip()}; "
            f"measured/planned = {ratio:.2f})",
        ]
    return "\n".join(lines)


# ============================================================================= main


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bioscan_jax.plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="--config=FILE[:ARG] (required) and --config.<field>=<value> as for run.py")
    p.add_argument("--mesh", required=True, help="mesh, e.g. fsdp=64 or data=2,fsdp=4,tensor=2")
    p.add_argument("--accelerator", default="all", help="v5e, v5p, h100 or all (default)")
    p.add_argument("--stage", default=None,
                   help="BarcodeBERT: pretrain (default) or finetune; ZSC: clibd (default) or pretrain")
    p.add_argument("--remat", action="store_true", help="rematerialise every transformer block")
    p.add_argument("--scan", action="store_true",
                   help="stack the transformer blocks and run them with nnx.scan (one compiled block)")
    p.add_argument("--num-classes", type=int, default=22_622, help="BarcodeBERT fine-tuning classes (species)")
    p.add_argument("--text-vocab", type=int, default=15_000,
                   help="CLIBD taxonomy word vocabulary (built from the data at train time; default 15000)")
    p.add_argument("--measure", action="store_true",
                   help="also run one real step on the CPU (one-device mesh) and report peak memory")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    config_argv = [a for a in argv if a == "--config" or a.startswith(("--config=", "--config."))]
    if "--config" in config_argv:
        p.error("give the config as --config=FILE[:ARG] (one argument)")
    args = p.parse_args([a for a in argv if a not in config_argv])
    if not any(a.startswith("--config=") for a in config_argv):
        p.error("--config=FILE[:ARG] is required, e.g. --config=configs/clibd.py:paper")
    args.config_argv = config_argv
    args.config = next(a.split("=", 1)[1] for a in config_argv if a.startswith("--config="))
    if args.accelerator != "all" and args.accelerator not in ACCELERATORS:
        p.error(f"--accelerator must be one of {sorted(ACCELERATORS)} or all")
    try:
        args.mesh_sizes = parse_mesh(args.mesh)
    except ValueError as e:
        p.error(str(e))
    return args


def _ensure_devices(count: int, argv: Sequence[str]) -> int | None:
    """Make JAX see ``count`` fake CPU devices: set the flags (JAX not loaded yet) or re-run this
    command in a fresh process with them. Returns the child's exit code when re-run."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_COUNT_FLAG)]
    wanted = " ".join(flags + [f"{_DEVICE_COUNT_FLAG}={count}"])
    if "jax" not in sys.modules:
        os.environ["XLA_FLAGS"] = wanted
        os.environ["JAX_PLATFORMS"] = "cpu"
        return None
    import jax

    if jax.device_count() == count and jax.default_backend() == "cpu":
        return None
    env = dict(os.environ, XLA_FLAGS=wanted, JAX_PLATFORMS="cpu")
    return subprocess.call([sys.executable, "-m", "bioscan_jax.plan", *argv], env=env)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    code = _ensure_devices(math.prod(args.mesh_sizes.values()), argv)
    if code is not None:
        return code
    try:
        config = load_config(args.config_argv)
    except ValueError as e:
        print(f"python -m bioscan_jax.plan: {e}", file=sys.stderr)
        return 2
    if args.remat:
        set_model_option(config, "remat")
    if args.scan:
        set_model_option(config, "scan_layers")
    spec = step_spec(config, stage=args.stage, num_classes=args.num_classes, text_vocab=args.text_vocab)
    result, compiled, setup, abstract_batch = plan(config, args.config, args.mesh_sizes, spec)
    if args.measure:
        result.measured = measure(result, compiled, setup, abstract_batch, spec, config)
    accelerators = sorted(ACCELERATORS) if args.accelerator == "all" else [args.accelerator]
    if args.json:
        print(json.dumps(result.to_json(accelerators)))
    else:
        print(format_plan(result, accelerators))
    return 0


if __name__ == "__main__":
    sys.exit(main())
