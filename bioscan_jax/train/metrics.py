"""Training metrics: ``workdir/metrics.jsonl``, TensorBoard events, a progress bar.

:class:`MetricsWriter` writes one JSON object per logged step to ``metrics.jsonl`` (appending, so a
resumed run continues the same file; the rows an earlier run logged after the step this run starts
from are removed first, since this run logs those steps again: one row per step and kind), the same scalars to TensorBoard event files in
``workdir/tensorboard`` (tensorboardX, no TensorFlow needed), and drives a tqdm progress bar showing
loss, throughput and the ETA. Only process 0 writes; the others keep silent.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

logger = logging.getLogger(__name__)

def _to_python(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray)) or hasattr(value, "dtype"):
        value = np.asarray(value)
        value = value.item() if value.size == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf: "nan", "inf", "-inf"
    return value


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of ``workdir/metrics.jsonl`` (for tests, reports and notebooks)."""
    path = os.path.join(os.fspath(workdir), "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def logged_value(workdir: str | os.PathLike, key: str, step: int) -> float | None:
    """The last value of ``key`` logged at ``step`` in ``workdir/metrics.jsonl`` (a resumed run
    may log a step twice), or None."""
    values = [r[key] for r in read_metrics(workdir) if r.get("step") == step and key in r]
    return float(values[-1]) if values else None


def _step_of(line: str) -> int | None:
    """The ``step`` of one metrics.jsonl line (``None`` if it has none or does not parse)."""
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def supersede(path: str | os.PathLike, after_step: int) -> int:
    """Removes the rows of ``path`` (a metrics.jsonl) logged after ``after_step``, and a last line
    cut short by a killed write; returns how many lines were removed.

    A run resumed from the checkpoint of ``after_step`` redoes the later steps and logs them
    again: the rows of the run it resumes (which got past that checkpoint and then stopped) would
    be duplicates with other values. The file is rewritten atomically (a temporary file renamed
    over it), so a crash here leaves either the old or the new file, never a partial one.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        step = _step_of(line)
        if step is None or step <= after_step:
            kept.append(line)
    if kept and not kept[-1].endswith("\n"):  # a write cut short: the next row would run into it
        last = kept.pop()
        if _step_of(last) is not None:  # whole but for its newline
            kept.append(last + "\n")
    if kept == lines:
        return 0
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(lines) - len(kept)


class MetricsWriter:
    """metrics.jsonl + TensorBoard + tqdm progress bar for one run directory.

    ``initial_step``: the step this run starts from (the resumed checkpoint's; 0 for a fresh run).
    Rows of ``metrics.jsonl`` after it are removed before this run appends (:func:`supersede`).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        total_steps: int | None = None,
        initial_step: int = 0,
        tensorboard: bool = True,
        progress_bar: bool = True,
    ):
        self.workdir = os.fspath(workdir)
        self.enabled = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        self._bar = None
        if not self.enabled:
            return
        os.makedirs(self.workdir, exist_ok=True)
        path = os.path.join(self.workdir, "metrics.jsonl")
        removed = supersede(path, int(initial_step))
        if removed:
            logger.info("%s: %d rows after step %d removed (this run logs those steps again)", path, removed,
                        int(initial_step))
        self._jsonl = open(path, "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(self.workdir, "tensorboard"))
        if progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                             file=sys.stderr, smoothing=0.1)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """One record ``{"step": step, **metrics}`` to metrics.jsonl and TensorBoard."""
        if not self.enabled:
            return
        record = {"step": int(step)}
        record.update({k: _to_python(v) for k, v in metrics.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, int(step))

    def progress(self, step: int, **postfix: Any) -> None:
        """Move the bar to ``step``; ``postfix`` (e.g. loss, samples/s) is shown beside it."""
        if self._bar is None:
            return
        delta = int(step) - self._bar.n
        if postfix:
            self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                  refresh=False)
        if delta > 0:
            self._bar.update(delta)

    def flush(self) -> None:
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
