"""Tasks: one package per benchmark, each exposing one :class:`TaskSpec` as ``SPEC``.

A task package (``tasks/<name>/``) holds that benchmark's training, evaluation and report
modules; ``train/`` and ``eval/`` below it know no task (``tests/test_import_graph.py``).
``run.py``, the planner and the tests reach a task through its spec (:func:`get`). A task that
builds on another one (zero-shot clustering clusters with the CLIBD towers) goes through that
task's spec too (its ``train`` and ``load``), never through its modules.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

#: Task name (``config.task``) -> its package.
TASKS: dict[str, str] = {
    "barcodebert": "bioscan_jax.tasks.barcodebert",
    "clibd": "bioscan_jax.tasks.clibd",
    "zsc": "bioscan_jax.tasks.zsc",
}


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """What the rest of the package may know of a task.

    * ``run(config, workdir) -> summary``: the whole benchmark; it writes the summary too;
    * ``check_config(config)``: raises on the first config error of the task, one line, before
      any data are built (the value checks every task shares are
      :func:`bioscan_jax.config_errors.check_config`'s);
    * ``train(config, workdir) -> (model, summary)``: the training alone, resumed or returned at
      once when ``workdir`` holds a finished run (None for a task that trains nothing of its own);
    * ``load(path, config=None) -> model``: the trained model of a run directory (or of a released
      checkpoint file), as the run reports it;
    * ``stages``: the train steps the memory planner can compile (the first is its default, the
      one that needs the most memory), and ``step(config, stage, *, num_classes, text_vocab) ->
      StepSpec``: that step, from the task's own model factory and loss and the pipeline's
      batch spec.
    """

    name: str
    run: Callable[[Any, str], dict]
    check_config: Callable[[Any], Any]
    train: Callable[..., tuple[Any, dict]] | None = None
    load: Callable[..., Any] | None = None
    stages: tuple[str, ...] = ()
    step: Callable[..., StepSpec] | None = None


@dataclasses.dataclass
class StepSpec:
    """One train step as :mod:`bioscan_jax.plan` compiles it: a model, its loss, the optimizer
    settings and the global batch (``{key: jax.ShapeDtypeStruct}``, from the pipeline's own
    batch spec: :func:`bioscan_jax.data.pipeline.dna_batch_spec`, ``clibd_batch_spec``)."""

    task: str
    model_factory: Callable
    loss_fn: Callable
    batch: dict[str, Any]
    train: Any  # config section: batch_size, accum_steps, bf16
    optim: Any
    notes: list[str]


def get(name: str) -> TaskSpec:
    """The spec of the task ``name``; an unknown or unavailable task raises clearly."""
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    try:
        module = importlib.import_module(TASKS[name])
    except ModuleNotFoundError as e:
        if e.name == TASKS[name]:
            raise NotImplementedError(f"Task {name!r} is not implemented in this version of bioscan-jax") from e
        raise
    return module.SPEC


def run(config, workdir: str) -> dict:
    """Runs ``config.task`` in ``workdir`` and returns its summary."""
    return get(config.task).run(config, workdir)
