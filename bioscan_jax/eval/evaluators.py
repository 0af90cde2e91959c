"""Evaluators: what the train loop runs on the current model during training (big_vision style).

An evaluator is any object with one method, ``run(model, step) -> {name: value}``::

    class ValAccuracy:
        def run(self, model, step):
            return {"val/accuracy": ...}

:func:`bioscan_jax.train.loop.train` calls ``run`` with the live NNX model of the current train
state, in eval mode (dropout off), at its evaluation steps (see its docstring for the cadence) and
writes the returned values, under the names given here, to ``metrics.jsonl`` and TensorBoard.
The model shares its arrays with the train state: read it, do not keep it (the next train step
reuses those buffers) and do not train it. An evaluator sees the model only, never the optimizer,
the data iterator or the RNG streams of training, so it cannot change what is trained.

This module provides:

* :func:`labelled_accuracy`: the accuracy of predictions over the rows that have a label, the one
  definition shared by the evaluators and the final test metrics;
* :class:`Accuracy`: ``{prefix}/accuracy`` of a ``predict(model) -> (predicted, labels)``;
* :class:`KeepBest`: wraps an evaluator and keeps the parameters of its best-scoring step in a
  checkpoint directory (one orbax checkpoint, :class:`bioscan_jax.checkpoint.Checkpointer`),
  so a resumed run still knows them.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from bioscan_jax.eval.intervals import accuracy_with_interval
from bioscan_jax.models import towers
from bioscan_jax.checkpoint import Checkpointer, complete_steps

logger = logging.getLogger(__name__)


def labelled_accuracy(predicted: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Share of rows with ``predicted == labels`` among the rows with a label (``labels >= 0``;
    unlabelled rows are ``MISSING_INDEX``): ``{'accuracy', 'ci95', 'n', 'n_excluded'}`` (``ci95``:
    :func:`bioscan_jax.eval.intervals.bootstrap_interval`); the accuracy is NaN when no row has a label."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    labelled = labels >= 0
    correct = predicted[labelled].astype(np.int64) == labels[labelled]
    return {**accuracy_with_interval(correct), "n_excluded": int((~labelled).sum())}


class Accuracy:
    """``{prefix}/accuracy`` (:func:`labelled_accuracy`) of ``predict(model) -> (predicted,
    labels)``, two arrays over the records of one split."""

    def __init__(self, predict: Callable[[nnx.Module], tuple[np.ndarray, np.ndarray]], *, prefix: str = "val"):
        self.predict = predict
        self.prefix = prefix

    def run(self, model: nnx.Module, step: int) -> dict[str, float]:
        predicted, labels = self.predict(model)
        return {f"{self.prefix}/accuracy": labelled_accuracy(predicted, labels)["accuracy"]}


def _abstract(tree: Any) -> Any:
    """Restore targets for ``tree``'s arrays: same shape, dtype and sharding."""

    def one(x):
        sharding = getattr(x, "sharding", None)
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
        return np.zeros(np.shape(x), np.asarray(x).dtype)

    return jax.tree.map(one, tree)


class KeepBest:
    """Runs ``evaluator`` and keeps the ``nnx.Param`` values of the model at the step where
    ``results[metric]`` was highest (first such step on ties; NaN never counts) in ``directory``.

    ``directory`` holds one checkpoint (``Checkpointer``, keep=1) with the tree ``{'params',
    'step', 'value'}``: the parameters in the layout of the train state's ``params`` (trainable =
    ``nnx.Param``), readable with :func:`bioscan_jax.checkpoint.restore_params`, the train
    step they are from and their score. Checkpoints are numbered by improvement (1, 2, ...), not by
    train step, so a resumed run that replays steps can never write a number lower than the one on
    disk. A resumed run reads the stored score back at its first evaluation and keeps comparing
    against it; a run that starts afresh must :meth:`clear` the directory first.
    """

    def __init__(self, evaluator: Any, directory: str | os.PathLike, *, metric: str):
        self.evaluator = evaluator
        self.directory = os.fspath(directory)
        self.metric = metric
        self._best: tuple[int, float] | None = None  # (train step, value) of the kept parameters
        self._loaded = False

    def clear(self) -> None:
        """Forget the kept parameters (a run that starts from step 0 keeps nothing of an earlier one)."""
        if jax.process_index() == 0 and os.path.isdir(self.directory):
            shutil.rmtree(self.directory)
        self._best, self._loaded = None, True

    def run(self, model: nnx.Module, step: int) -> Mapping[str, Any]:
        results = self.evaluator.run(model, step)
        if self.metric not in results:  # the evaluator did not score this step (e.g. a skipped epoch)
            return results
        value = float(results[self.metric])
        params = nnx.state(model, nnx.Param).to_pure_dict()
        best = self._best_of(params)
        if math.isfinite(value) and (best is None or value > best[1]):
            self._save(params, step, value)
            logger.info("step %d: best %s so far (%.4f), parameters kept in %s", step, self.metric, value,
                        self.directory)
        return results

    def best(self, model: nnx.Module) -> tuple[int, float] | None:
        """``(train step, value)`` of the kept parameters, or None when nothing was kept."""
        return self._best_of(nnx.state(model, nnx.Param).to_pure_dict())

    def restore_into(self, model: nnx.Module) -> tuple[int, float]:
        """Copies the kept parameters into ``model`` (in place); returns their ``(step, value)``.
        Raises ``FileNotFoundError`` when nothing was kept."""
        restored = self._restore(nnx.state(model, nnx.Param).to_pure_dict())
        if restored is None:
            raise FileNotFoundError(f"no parameters kept in {self.directory}: no evaluation produced a finite "
                                    f"{self.metric}")
        towers.load_params(model, restored["params"], f"kept parameters of {self.directory}")
        self._best, self._loaded = (int(restored["step"]), float(restored["value"])), True
        return self._best

    # -- the checkpoint --------------------------------------------------------------------------

    def _restore(self, params: Any) -> dict[str, Any] | None:
        if not complete_steps(self.directory):
            return None
        target = {"params": _abstract(params), "step": np.zeros((), np.int64), "value": np.zeros((), np.float64)}
        with Checkpointer(self.directory, keep=1, async_save=False) as ckpt:
            tree, _ = ckpt.restore(target)
        return tree

    def _best_of(self, params: Any) -> tuple[int, float] | None:
        """The kept ``(step, value)``, read from the directory once (``params``: the restore layout)."""
        if not self._loaded:
            restored = self._restore(params)
            self._best = None if restored is None else (int(restored["step"]), float(restored["value"]))
            self._loaded = True
        return self._best

    def _save(self, params: Any, step: int, value: float) -> None:
        number = (complete_steps(self.directory) or [0])[-1] + 1
        tree = {"params": params, "step": np.asarray(step, np.int64), "value": np.asarray(value, np.float64)}
        with Checkpointer(self.directory, keep=1, async_save=False) as ckpt:
            ckpt.save(number, tree)
        self._best = (int(step), value)
