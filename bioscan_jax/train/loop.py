"""The generic train loop: mesh, init or resume, steps, logging, checkpoints, evaluation.

Usage (a task module supplies the model, its loss, its input pipeline and its evaluators; here
species fine-tuning as in :func:`bioscan_jax.tasks.barcodebert.finetune.finetune_species`)::

    cfg = kmer_bert.get_variant('tiny')
    result = train(
        config, workdir,
        model_factory=lambda rngs: kmer_bert.KmerBertClassifier(cfg, num_species, rngs=rngs),
        loss_fn=losses.classification_loss,      # (model, batch, *, train) -> (loss, metrics)
        data_iter_factory=lambda: iter(pipeline.dna_pipeline(   # process-local numpy batches
            records, tokenizer=tokenizer, batch_size=32, train=True, label_rank='species')),
        steps_per_epoch=len(records) // 32,
        evaluators=[evaluators.Accuracy(predict_val, prefix='val')],  # .run(model, step) -> {'val/accuracy': ...}
    )
    model = result.model()

Evaluators (:mod:`bioscan_jax.eval.evaluators`) run at the steps :func:`is_eval_step` picks: every
``train.eval_every`` steps, or at each epoch end when ``train.eval_every`` is 0 and
``steps_per_epoch`` is known, and always after the last step.

Config fields read (every one has a default, see :func:`default_config`)::

    config.seed
    config.mesh.{data, fsdp, tensor}            -1 = all remaining devices
    config.sharding_rules                        ((logical, mesh axes), ...)
    config.train.{batch_size, accum_steps, bf16, steps, epochs, log_every, eval_every,
                  progress_bar, tensorboard}
    config.optim.{lr, lr_ref_batch, weight_decay, warmup_frac, schedule, b1, b2, eps,
                  div_factor, final_div_factor, grad_clip}
    config.checkpoint.{every, keep, async_save}

``train.batch_size`` is the *global* batch (all processes); each process's iterator yields
``batch_size / process_count`` rows. ``train.steps`` (> 0) or ``train.epochs`` ×
``steps_per_epoch`` sets the number of optimiser updates.

Resume: if ``workdir/checkpoints`` holds a checkpoint, the train state and the data iterator
position are restored from the newest usable one and training continues to the same final step
with the same batches an uninterrupted run would have seen.

Non-finite loss: metrics are fetched at every log, checkpoint and eval step; if any step since the
last check has a NaN/inf loss, training stops with :class:`NonFiniteLossError` naming the first
bad step; the bad state is never checkpointed, so the run can be resumed (e.g. with a lower lr)
from the last good checkpoint.

Memory: before the first step the train step is compiled for the real state and batch and XLA's
planned peak per device (:func:`peak_bytes`, the planner's estimate, ``python -m bioscan_jax.plan``)
is compared with the devices' memory (``memory_stats()['bytes_limit']`` on GPU/TPU, or
``BIOSCAN_JAX_DEVICE_MEMORY_GB``); a step over 90 % of it stops with :class:`StepDoesNotFitError`,
one line naming the setting to change (remat/scan of the encoders, ``train.accum_steps``, the
batch). CPU devices report no limit: the check is skipped there unless that variable is set.

SIGINT / SIGTERM: the current step is checkpointed (pending asynchronous saves finished first) and
:class:`TrainingInterrupted` says where; the next run resumes there. A second signal stops at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from bioscan_jax import config_access
from bioscan_jax import sharding as mesh_lib
from bioscan_jax.train import optim as optim_lib
from bioscan_jax.train import run_identity
from bioscan_jax.checkpoint import Checkpointer
from bioscan_jax.models import layers as layers_lib
from bioscan_jax.train.metrics import MetricsWriter
from bioscan_jax.train.state import (ModelFactory, TrainSetup, TrainState, abstract_train_state, init_train_state,
                                     warm_start as apply_warm_start)
from bioscan_jax.train.step import LossFn, make_train_step

logger = logging.getLogger(__name__)

#: The former evaluator form, still accepted: ``(step, state, setup) -> {name: value}``.


@runtime_checkable
class Evaluator(Protocol):
    """What the loop runs during training: ``run(model, step)`` -> ``{name: value}`` (scalars, e.g.
    ``{'val/accuracy': 0.93}``). Implementations live in :mod:`bioscan_jax.eval.evaluators`."""

    def run(self, model: nnx.Module, step: int) -> Mapping[str, Any]: ...


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the bad state was not saved."""

    def __init__(self, step: int, loss: float, last_checkpoint: int | None, workdir: str):
        self.step = step
        self.loss = loss
        self.last_checkpoint = last_checkpoint
        where = (f"the last good checkpoint is step {last_checkpoint} in {workdir}/checkpoints"
                 if last_checkpoint is not None else "no checkpoint was saved before it")
        super().__init__(
            f"training loss is {loss} at step {step}; training stopped and this state was not saved "
            f"({where}). Lower config.optim.lr, set config.optim.grad_clip, or inspect the batch of "
            f"step {step}")


class StepDoesNotFitError(ValueError):
    """The compiled train step plans more memory per device than the devices have (one line that
    says which setting to change); raised before the first step runs."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training; the state of the current step was checkpointed."""

    def __init__(self, signum: int, step: int, saved: int | None, workdir: str):
        self.signum, self.step, self.saved = signum, step, saved
        self.exit_code = 128 + signum  # the shell's convention for "stopped by signal N"
        name = signal.Signals(signum).name
        where = (f"checkpoint {saved} is in {workdir}/checkpoints; run the same command again to resume"
                 if saved is not None else "no checkpoint could be saved")
        super().__init__(f"stopped by {name} after step {step}: {where}")


class _StopSignals:
    """While active (main thread only), SIGINT/SIGTERM set ``signum`` instead of killing the run,
    so the loop can save the current step and stop; a second signal interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.signum is not None:  # asked twice: stop now, without the checkpoint
            self.__exit__()
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning("%s received: saving a checkpoint after this step, then stopping "
                       "(send it again to stop at once)", signal.Signals(signum).name)

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def requested(self, sync: bool) -> int | None:
        """The signal number if a stop was asked for (on any process when ``sync``)."""
        if jax.process_count() == 1:
            return self.signum
        if not sync:
            return None
        signums = multihost_utils.process_allgather(np.int32(self.signum or 0))
        return int(np.max(signums)) or None


@dataclasses.dataclass
class TrainResult:
    setup: TrainSetup
    state: TrainState
    step: int  # optimiser updates done (the final step)
    workdir: str
    start_step: int = 0  # the step this run started from (> 0 when resumed)
    fingerprint: str = ""  # the run identity's fingerprint (run_identity.json)

    def model(self) -> nnx.Module:
        return self.setup.merge(self.state)


def default_config() -> ml_collections.ConfigDict:
    """The training-machinery fields with their defaults (experiment configs override them)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sharding_rules = mesh_lib.DEFAULT_SHARDING_RULES
    c.train = ml_collections.ConfigDict(dict(
        batch_size=64, accum_steps=1, bf16=False, steps=0, epochs=0, log_every=50, eval_every=0,
        progress_bar=True, tensorboard=True))
    c.optim = ml_collections.ConfigDict(optim_lib.OptimSettings().as_section())
    c.checkpoint = ml_collections.ConfigDict(dict(every=1000, keep=3, async_save=True))
    return c


def total_train_steps(config: Any, steps_per_epoch: int | None = None) -> int:
    """``train.steps`` if set, else ``train.epochs * steps_per_epoch``; raise when neither works."""
    t = config_access.get(config, "train")
    steps = int(config_access.get(t, "steps", 0))
    if steps > 0:
        return steps
    epochs = float(config_access.get(t, "epochs", 0))
    if epochs > 0:
        if not steps_per_epoch:
            raise ValueError(
                "config.train.epochs is set but the number of steps per epoch is unknown; pass "
                "steps_per_epoch to train() or set config.train.steps")
        return int(math.ceil(epochs * steps_per_epoch))
    raise ValueError("set config.train.steps (> 0) or config.train.epochs (> 0)")


def validate_config(config: Any, num_devices: int | None = None, steps_per_epoch: int | None = None) -> jax.sharding.Mesh:
    """Check mesh, batch, accumulation and length settings before any compute; return the mesh.

    Raises ``ValueError`` saying which field to change.
    """
    mesh = mesh_lib.make_mesh(config_access.get(config, "mesh")) if num_devices is None else None
    if mesh is None:
        shape = mesh_lib.mesh_shape(config_access.get(config, "mesh"), num_devices)
        mesh_sizes = dict(zip(mesh_lib.MESH_AXES, shape))
    else:
        mesh_sizes = dict(mesh.shape)
    t = config_access.get(config, "train")
    batch = int(config_access.get(t, "batch_size", default_config().train.batch_size))
    accum = int(config_access.get(t, "accum_steps", default_config().train.accum_steps))
    mesh_lib.validate_batch(batch, mesh_sizes, accum)
    mesh_lib.normalize_rules(config_access.get(config, "sharding_rules"))
    settings = LoopSettings.read(config, steps_per_epoch)  # the length, logging and checkpoint fields
    optim_lib.make_schedule(config_access.get(config, "optim"), total_steps=settings.total, global_batch=batch)
    return mesh


def _save_config(config: Any, workdir: str) -> None:
    if jax.process_index() != 0:
        return
    try:
        text = config.to_json_best_effort(indent=2) if hasattr(config, "to_json_best_effort") else json.dumps(
            config, indent=2, default=str)
    except Exception:  # noqa: BLE001 - informative only
        text = str(config)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(text)


def is_eval_step(step: int, *, total: int, eval_every: int, steps_per_epoch: int | None) -> bool:
    """Whether the evaluators run after ``step``: every ``eval_every`` steps when it is > 0; when it
    is 0, at each epoch end (``step`` a multiple of ``steps_per_epoch``) if that is known; and
    always after the last step (``total``)."""
    if step == total:
        return True
    if eval_every > 0:
        return step % eval_every == 0
    return bool(steps_per_epoch) and step % steps_per_epoch == 0


def _check_evaluators(evaluators: Sequence[Any]) -> None:
    for evaluator in evaluators:
        if not isinstance(evaluator, Evaluator):
            raise TypeError(f"evaluator {evaluator!r} has no run(model, step) method (loop.Evaluator)")


def run_evaluators(evaluators: Sequence[Evaluator], setup: TrainSetup, state: TrainState,
                   step: int) -> dict[str, Any]:
    """The loop side of the evaluator protocol: each evaluator's ``run(model, step)`` gets a live
    model of ``state`` (:meth:`TrainSetup.merge`, a fresh one each, in eval mode); their results
    are merged in order (a later name overrides an earlier one)."""
    results: dict[str, Any] = {}
    for evaluator in evaluators:
        model = setup.merge(state)
        model.eval()
        results.update(dict(evaluator.run(model, step)))
    return results


# ============================================================================= does the step fit?

#: A per-device memory size in GiB to check the train step against instead of what the device
#: reports (CPU devices report no limit, so there the check runs only with it): tests, and a
#: dry run of a GPU/TPU plan on a smaller machine.
DEVICE_MEMORY_ENV = "BIOSCAN_JAX_DEVICE_MEMORY_GB"
#: Fraction of a device's memory a step may plan to use (runtime, fragmentation; as the planner).
MEMORY_HEADROOM = 0.9
_GiB = 1024**3


def _gib(n: int) -> str:
    x = int(n) / _GiB
    return f"{x:.2f}" if x >= 0.1 else f"{x:.2g}"


def peak_bytes(arguments: int, temporaries: int, outputs: int, aliased: int, code: int) -> int:
    """A step's peak per device from XLA's memory analysis (the planner's estimate): arguments
    (state + batch) + temporaries + outputs not written into donated inputs + generated code."""
    return int(arguments) + int(temporaries) + max(int(outputs) - int(aliased), 0) + int(code)


def device_memory() -> tuple[int | None, str]:
    """``(bytes per device, where that number comes from)``: :data:`DEVICE_MEMORY_ENV` when set,
    else the first local device's ``memory_stats()['bytes_limit']`` (GPU, TPU); ``(None, why)``
    when neither is known (CPU)."""
    text = os.environ.get(DEVICE_MEMORY_ENV, "").strip()
    if text:
        try:
            gib = float(text)
        except ValueError:
            gib = float("nan")
        if not (math.isfinite(gib) and gib > 0):
            raise ValueError(f"{DEVICE_MEMORY_ENV}={text!r}: expected a memory size per device in GiB, e.g. 80")
        return int(gib * _GiB), f"{DEVICE_MEMORY_ENV}={text}"
    device = jax.local_devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - a backend without memory statistics
        stats = {}
    if not stats.get("bytes_limit"):
        return None, f"{device.platform} devices report no memory limit"
    return int(stats["bytes_limit"]), f"{device.device_kind} bytes_limit"


def _encoders_without_remat_scan(model: nnx.Module) -> list[str]:
    """Paths of the model's transformer encoders that do not both rematerialise and scan."""
    return [".".join(map(str, path)) or "model" for path, module in nnx.iter_modules(model)
            if isinstance(module, layers_lib.Encoder) and not (module.remat and module.scan)]


def fit_advice(peak: int, fixed: int, usable: int, *, encoders: Sequence[str], batch: int, accum: int,
               batch_shards: int) -> str:
    """Which setting to change so that a step of ``peak`` bytes per device (``fixed`` of them the
    state, batch and code, which do not shrink with the microbatch) fits in ``usable`` bytes."""
    if encoders:
        return (f"set remat=True and scan_layers=True on the encoders {', '.join(encoders)} (the model config's "
                f"remat and scan_layers: config.model.* for BarcodeBERT, config.model.<tower>.overrides.* for CLIBD)")
    if usable <= fixed:
        return (f"the train state alone needs {_gib(fixed)} GiB per device: shard it over more devices "
                f"(config.mesh.fsdp)")
    need = accum * (peak - fixed) / (usable - fixed)
    for k in range(max(accum + 1, math.ceil(need)), batch // batch_shards + 1):
        if batch % (k * batch_shards) == 0:
            return (f"raise config.train.accum_steps to {k} (the same global batch {batch} in microbatches "
                    f"of {batch // k}), or lower config.train.batch_size")
    return f"lower config.train.batch_size (now {batch}, {batch // batch_shards} per batch shard)"


def check_step_fits(train_step: Callable, setup: TrainSetup, state: TrainState, batch: Mapping[str, jax.Array], *,
                    batch_size: int, accum: int, workdir: str) -> Callable:
    """Compile the train step for ``(state, batch)``, compare XLA's planned peak per device with
    the devices' memory (:func:`device_memory`) and raise :class:`StepDoesNotFitError` with the
    setting to change when it exceeds :data:`MEMORY_HEADROOM` of it. Returns the step to run: the
    compiled one when checked, else ``train_step`` unchanged (CPU without
    :data:`DEVICE_MEMORY_ENV`: skipped, one log line)."""
    limit, source = device_memory()
    if limit is None:
        logger.info("memory check skipped: %s (set %s to check against a size)", source, DEVICE_MEMORY_ENV)
        return train_step
    with mesh_lib.mesh_context(setup.mesh, setup.rules):
        compiled = train_step.jitted.lower(state, batch).compile()
    ma = compiled.memory_analysis()
    if ma is None:  # a backend without a memory analysis: nothing to compare
        logger.info("memory check skipped: no memory analysis of the compiled step on %s", jax.default_backend())
        return compiled
    fixed = int(ma.argument_size_in_bytes) + int(ma.generated_code_size_in_bytes)
    peak = peak_bytes(ma.argument_size_in_bytes, ma.temp_size_in_bytes, ma.output_size_in_bytes,
                      ma.alias_size_in_bytes, ma.generated_code_size_in_bytes)
    usable = int(MEMORY_HEADROOM * limit)
    if peak > usable:
        advice = fit_advice(peak, fixed, usable, encoders=_encoders_without_remat_scan(setup.merge(state)),
                            batch=batch_size, accum=accum, batch_shards=mesh_lib.batch_axis_size(setup.mesh))
        raise StepDoesNotFitError(
            f"the train step of {workdir} plans {_gib(peak)} GiB per device (XLA: state and batch "
            f"{_gib(ma.argument_size_in_bytes)}, temporaries {_gib(ma.temp_size_in_bytes)}), over "
            f"{100 * MEMORY_HEADROOM:.0f}% of the {_gib(limit)} GiB per device ({source}): {advice}")
    logger.info("train step plans %s GiB per device of %s GiB (%s)", _gib(peak), _gib(limit), source)
    return compiled


def _checkpointable(it: Any) -> bool:
    while hasattr(it, "checkpointable"):
        it = it.checkpointable
    return hasattr(it, "get_state") and hasattr(it, "set_state")


def _open_data(data_iter_factory: Callable[[], Iterator]) -> tuple[Iterator, Any]:
    """``(iterator, what a checkpoint saves of it)``: the iterator itself when its position can
    be checkpointed, else None, with a warning that a resumed run restarts it."""
    data_iter = data_iter_factory()
    if _checkpointable(data_iter):
        return data_iter, data_iter
    logger.warning("the data iterator has no get_state/set_state: its position is not checkpointed "
                   "and a resumed run restarts it from the beginning")
    return data_iter, None


def train(
    config: Any,
    workdir: str | os.PathLike,
    *,
    model_factory: ModelFactory,
    loss_fn: LossFn,
    data_iter_factory: Callable[[], Iterator[Mapping[str, np.ndarray]]],
    evaluators: Sequence[Evaluator] = (),
    steps_per_epoch: int | None = None,
    trainable: Any = nnx.Param,
    warm_start: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
    identity: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train (or resume training) to ``total_train_steps(config)`` optimiser updates.

    Args:
      config: see the module docstring.
      workdir: run directory: ``checkpoints/``, ``metrics.jsonl``, ``tensorboard/``,
        ``config.json``.
      model_factory: ``rngs -> nnx.Module`` (parameters annotated with logical axis names).
      loss_fn: ``(model, batch, *, train) -> (loss, metrics)``.
      data_iter_factory: returns an iterator of process-local batches (dicts of numpy arrays with
        a leading batch dimension of ``batch_size / process_count``). A grain ``DataLoader`` /
        ``DatasetIterator`` is checkpointed with the state; it must not run out before the last
        step (repeat epochs in the pipeline).
      evaluators: objects with ``run(model, step) -> {name: value}``
        (:class:`Evaluator`, implemented in :mod:`bioscan_jax.eval.evaluators`; the model in eval mode, see
        :func:`run_evaluators`), run every ``train.eval_every`` steps, or at each epoch end when
        ``train.eval_every`` is 0 and ``steps_per_epoch`` is given, and always after the last step
        (:func:`is_eval_step`). Their results, under the names they return (e.g.
        ``val/accuracy``), are written as one record of that step to ``metrics.jsonl`` and
        TensorBoard. Evaluation time is left out of the throughput figures. A finished run that is
        run again returns at once, without evaluating. A plain callable ``(step, state, setup)``
        (the former form) is still accepted.
      steps_per_epoch: needed when the length is given in ``train.epochs``.
      trainable: nnx filter of the optimised variables.
      warm_start: parameter values to start from instead of the random init, as a nested dict
        shaped like a sub-tree of the parameters (or a zero-argument callable returning one, called
        only when the run starts fresh), e.g. ``{'bert': nnx.state(pretrained.bert,
        nnx.Param).to_pure_dict()}``. Ignored when resuming from a checkpoint.
      identity: what else determines the result (model, data identity, stage options), recorded
        with ``seed``/``train``/``optim`` in ``workdir/run_identity.json``; a workdir whose
        checkpoints have another identity is refused unless ``config.resume`` says otherwise
        (:mod:`bioscan_jax.train.run_identity`).
    """
    mesh_lib.maybe_initialize_distributed()
    workdir = os.fspath(workdir)
    mesh = validate_config(config, steps_per_epoch=steps_per_epoch)
    settings = LoopSettings.read(config, steps_per_epoch)
    _check_evaluators(evaluators)
    digest = _claim_workdir(config, workdir, identity)
    tx, schedule = optim_lib.make_optimizer(config_access.get(config, "optim"), total_steps=settings.total,
                                            global_batch=settings.global_batch)
    rules = mesh_lib.normalize_rules(config_access.get(config, "sharding_rules"))
    setup = abstract_train_state(model_factory, tx, mesh, rules, seed=settings.seed, trainable=trainable)
    logger.info("mesh %s; %d parameters", dict(mesh.shape),
                sum(math.prod(x.shape) for x in jax.tree.leaves(setup.abstract_state["params"])))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=settings.ckpt_keep, async_save=settings.async_save)
    data_iter, saved_data = _open_data(data_iter_factory)
    state, start = _restore_or_init(ckpt, setup, model_factory, tx, settings.seed, saved_data, warm_start, workdir)
    result = functools.partial(TrainResult, setup=setup, workdir=workdir, start_step=start, fingerprint=digest)
    if start >= settings.total:
        ckpt.close()
        return result(state=state, step=start)
    train_step = make_train_step(setup, loss_fn, tx, schedule=schedule, accum_steps=settings.accum,
                                 compute_dtype=jnp.bfloat16 if settings.bf16 else None)
    writer = MetricsWriter(workdir, total_steps=settings.total, initial_step=start, tensorboard=settings.tensorboard,
                           progress_bar=settings.progress_bar)
    try:
        with _StopSignals() as stop:
            loop = _StepLoop(settings, mesh, setup, train_step, data_iter, saved_data, ckpt, writer, tuple(evaluators),
                             workdir)
            state = loop.run(state, start, stop)
    finally:
        writer.close()
        ckpt.close()
    return result(state=state, step=settings.total)


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """The loop's settings of one stage, read once from its config; every default is
    :func:`default_config`'s."""

    seed: int
    global_batch: int
    accum: int
    bf16: bool
    total: int  # optimiser updates (train.steps, or train.epochs x steps_per_epoch)
    steps_per_epoch: int | None
    log_every: int
    eval_every: int
    tensorboard: bool
    progress_bar: bool
    ckpt_every: int
    ckpt_keep: int
    async_save: bool

    def __post_init__(self):
        if self.ckpt_every < 0 or self.ckpt_keep < 0:
            raise ValueError("config.checkpoint.every and config.checkpoint.keep must be >= 0")
        if self.log_every <= 0:
            raise ValueError("config.train.log_every must be >= 1")

    @classmethod
    def read(cls, config: Any, steps_per_epoch: int | None) -> LoopSettings:
        defaults = default_config()
        t, ck = config_access.get(config, "train"), config_access.get(config, "checkpoint")

        def train(name):
            return config_access.get(t, name, defaults.train[name])

        def checkpoint(name):
            return config_access.get(ck, name, defaults.checkpoint[name])

        return cls(seed=int(config_access.get(config, "seed", defaults.seed)),
                   global_batch=int(train("batch_size")), accum=int(train("accum_steps")), bf16=bool(train("bf16")),
                   total=total_train_steps(config, steps_per_epoch), steps_per_epoch=steps_per_epoch,
                   log_every=int(train("log_every")), eval_every=int(train("eval_every")),
                   tensorboard=bool(train("tensorboard")), progress_bar=bool(train("progress_bar")),
                   ckpt_every=int(checkpoint("every")), ckpt_keep=int(checkpoint("keep")),
                   async_save=bool(checkpoint("async_save")))


def _claim_workdir(config: Any, workdir: str, identity: Mapping[str, Any] | None) -> str:
    """Create ``workdir``, check (or record) its run identity and save the config; returns the
    identity's fingerprint."""
    os.makedirs(workdir, exist_ok=True)
    digest = run_identity.check(workdir, run_identity.stage_identity(config, identity),
                                str(config_access.get(config, "resume", "auto")), writer=jax.process_index() == 0)
    if jax.process_count() > 1:  # process 0 may have deleted the old run (resume=restart)
        multihost_utils.sync_global_devices("bioscan_jax_run_identity")
    _save_config(config, workdir)
    return digest


def _restore_or_init(ckpt: Checkpointer, setup: TrainSetup, model_factory: ModelFactory, tx, seed: int,
                     saved_data, warm_start, workdir: str) -> tuple[TrainState, int]:
    """``(state, step)``: the newest checkpoint (with the data iterator's position restored into
    ``saved_data``, when there is one), else the random init with ``warm_start`` applied."""
    if ckpt.latest_step() is not None:
        state, start = ckpt.restore(setup.abstract_state, saved_data)
        logger.info("resumed from %s/checkpoints step %d", workdir, start)
        return state, start
    state = init_train_state(setup, model_factory, tx, seed=seed)
    if warm_start is not None:
        state = apply_warm_start(setup, state, warm_start() if callable(warm_start) else warm_start)
    return state, 0


class _Throughput:
    """Samples, steps and tokens per second between two log lines, checkpoint and evaluation
    time left out; the first step (which compiles) is timed apart."""

    def __init__(self, global_batch: int):
        self.global_batch = global_batch
        self.first_step_s: float | None = None
        self.restart()

    def restart(self) -> None:
        """Starts a new interval (after a log line, or after the first step)."""
        self.steps, self.t0, self.pause = 0, time.perf_counter(), 0.0

    def stepped(self, metrics) -> None:
        if self.first_step_s is None:
            jax.block_until_ready(metrics)
            self.first_step_s = time.perf_counter() - self.t0
            self.restart()
        else:
            self.steps += 1

    def add_rates(self, record: dict[str, float]) -> None:
        """Adds the rates since the last call to ``record`` (the interval's summary) and restarts."""
        dt = time.perf_counter() - self.t0 - self.pause
        if self.steps > 0 and dt > 0:
            record["samples_per_s"] = self.steps * self.global_batch / dt
            record["steps_per_s"] = self.steps / dt
            if "num_tokens" in record:
                record["tokens_per_s"] = record["num_tokens"] * self.steps / dt

    @contextlib.contextmanager
    def paused(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.pause += time.perf_counter() - t


@dataclasses.dataclass
class _StepLoop:
    """The steps of one run: a batch, the jitted step, then logging, checkpoints and evaluators
    at their steps. Metrics stay on the device until a log, checkpoint or eval step fetches them."""

    settings: LoopSettings
    mesh: jax.sharding.Mesh
    setup: TrainSetup
    train_step: Callable
    data_iter: Any
    saved_data: Any  # data_iter when its position is checkpointed, else None
    ckpt: Checkpointer
    writer: MetricsWriter
    evaluators: tuple
    workdir: str

    def __post_init__(self):
        self.pending: list[tuple[int, dict[str, jax.Array]]] = []
        self.interval: list[dict[str, float]] = []
        self.throughput = _Throughput(self.settings.global_batch)

    def next_batch(self, step: int) -> dict[str, jax.Array]:
        """The next process-local batch, checked and placed on the mesh as one global batch."""
        s = self.settings
        try:
            local = next(self.data_iter)
        except StopIteration:
            raise RuntimeError(
                f"the data iterator ran out before step {step} of {s.total}; make the training "
                f"pipeline repeat (num_epochs=None) or lower config.train.steps/epochs") from None
        local_batch = s.global_batch // jax.process_count()
        lead = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in local.items()}
        if any(n != local_batch for n in lead.values()):
            raise ValueError(
                f"the data iterator yielded a batch with leading sizes {lead}; expected "
                f"{local_batch} (config.train.batch_size={s.global_batch} over "
                f"{jax.process_count()} process(es)). Use drop_remainder=True and the same batch size")
        return mesh_lib.to_global_batch(local, self.mesh)

    def fetch(self) -> list[tuple[int, dict[str, float]]]:
        """The pending steps' metrics on the host; a non-finite loss stops the run here."""
        fetched = [(s, {k: float(v) for k, v in jax.device_get(m).items()}) for s, m in self.pending]
        self.pending.clear()
        for s, m in fetched:
            if not math.isfinite(m["loss"]):
                self.ckpt.wait()
                self.writer.write(s, {**m, "event": "non_finite_loss"})
                raise NonFiniteLossError(s, m["loss"], self.ckpt.latest_step(), self.workdir)
        return fetched

    def log(self, step: int, start: int) -> None:
        """One ``metrics.jsonl`` record of the steps since the last log line, with their rates."""
        s = self.settings
        record = _summarise(self.interval)
        self.throughput.add_rates(record)
        if self.throughput.first_step_s is not None and step - start <= s.log_every:
            record["first_step_s"] = self.throughput.first_step_s
        if s.steps_per_epoch:
            record["epoch"] = step / s.steps_per_epoch
        self.writer.write(step, record)
        self.writer.progress(step, loss=record["loss"],
                             **({"samples/s": record["samples_per_s"]} if "samples_per_s" in record else {}))
        self.throughput.restart()
        self.interval = []

    def run(self, state: TrainState, start: int, stop: _StopSignals) -> TrainState:
        s = self.settings
        for step in range(start + 1, s.total + 1):
            batch = self.next_batch(step)
            if step == start + 1:  # before the first step: refuse a step the devices cannot hold
                self.train_step = check_step_fits(self.train_step, self.setup, state, batch, batch_size=s.global_batch,
                                                  accum=s.accum, workdir=self.workdir)
            state, metrics = self.train_step(state, batch)
            self.pending.append((step, metrics))
            self.throughput.stepped(metrics)
            self.writer.progress(step)
            is_last = step == s.total
            is_log = step % s.log_every == 0 or is_last
            is_ckpt = (s.ckpt_every > 0 and step % s.ckpt_every == 0) or is_last
            is_eval = bool(self.evaluators) and is_eval_step(step, total=s.total, eval_every=s.eval_every,
                                                             steps_per_epoch=s.steps_per_epoch)
            if is_log or is_ckpt or is_eval:
                self.interval.extend(m for _, m in self.fetch())
            if is_log and self.interval:
                self.log(step, start)
            with self.throughput.paused():
                self.checkpoint_and_evaluate(step, state, is_ckpt, is_eval)
            # One process alone cannot stop a multi-process run: they agree at each log step.
            signum = stop.requested(sync=is_log) if not is_last else None
            if signum:
                self.fetch()  # a non-finite state is never saved
                self.ckpt.save(step, state, self.saved_data)
                self.ckpt.wait()
                self.writer.write(step, {"event": f"stopped_by_{signal.Signals(signum).name}"})
                raise TrainingInterrupted(signum, step, self.ckpt.latest_step(), self.workdir)
        self.ckpt.wait()
        return state

    def checkpoint_and_evaluate(self, step: int, state: TrainState, is_ckpt: bool, is_eval: bool) -> None:
        if is_ckpt:
            self.ckpt.save(step, state, self.saved_data)
        if is_eval:
            results = run_evaluators(self.evaluators, self.setup, state, step)
            if results:
                self.writer.write(step, results)
                logger.info("step %d eval: %s", step, results)


def _summarise(records: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over the steps since the last log line (``num_*`` too: per step);
    ``lr`` is the last value."""
    out: dict[str, float] = {}
    for k in records[0]:
        vals = [r[k] for r in records if k in r]
        out[k] = vals[-1] if k == "lr" else float(np.mean(vals))
    return out
