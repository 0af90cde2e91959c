"""Training curves of a task's stages, from their ``metrics.jsonl``, as one figure.

:func:`stage_curves` reads one stage's curves; :func:`plot_curves` draws every stage that logged
(loss, training accuracy, and the validation loss and accuracy of the evaluation steps) into
``workdir/training_curves.png``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from bioscan_jax.train.metrics import read_metrics

#: The validation accuracy an evaluator logs (``bioscan_jax.eval.evaluators.Accuracy``, prefix ``val``).
VAL_ACCURACY = "val/accuracy"


def _is_val_loss(name: str) -> bool:
    """A validation loss an evaluator logged (``val/...loss``, e.g. pretraining's ``val/mlm_loss``)."""
    return name.startswith("val/") and name.endswith("loss")


def _evaluated(records, metric: str) -> tuple[list[int], list[float]] | None:
    """``(steps, values)`` of one evaluator metric (the last record of a step a resumed run
    logged twice), or None when it was never logged."""
    val = {r["step"]: r[metric] for r in records if metric in r and "step" in r}
    return (sorted(val), [val[s] for s in sorted(val)]) if val else None


def stage_curves(stage_dir: str, val_metric: str = VAL_ACCURACY, val_metrics: Sequence[str] = ()
                 ) -> dict[str, tuple[list[int], list[float]]]:
    """The curves :func:`plot_curves` draws for one stage, ``name -> (steps, values)`` from its
    ``metrics.jsonl``: ``loss`` and (when logged) the training ``accuracy`` of the log steps,
    ``val accuracy`` (``val_metric``) of the evaluation steps (fine-tuning: each epoch end), every
    validation loss an evaluator logged (``val/...loss``, e.g. pretraining's ``val/mlm_loss``) under
    its own name, and each of ``val_metrics`` under its own name (CLIBD: the validation retrieval
    per pair)."""
    records = read_metrics(stage_dir)
    train = [r for r in records if "loss" in r and "step" in r]
    curves = {"loss": ([r["step"] for r in train], [r["loss"] for r in train])}
    if train and "accuracy" in train[0]:
        curves["accuracy"] = ([r["step"] for r in train], [r.get("accuracy") for r in train])
    val_losses = sorted({k for r in records for k in r if _is_val_loss(k)})
    for name, metric in (("val accuracy", val_metric), *((m, m) for m in (*val_losses, *val_metrics))):
        curve = _evaluated(records, metric)
        if curve:
            curves[name] = curve
    return curves


def plot_curves(workdir: str, stages: Sequence[str] = ("pretrain", "finetune"),
                val_metric: str = VAL_ACCURACY, val_metrics: Sequence[str] = ()) -> str | None:
    """Training loss (and accuracy) of each of ``stages`` (``workdir/<stage>``) that has a
    ``metrics.jsonl``, with the validation accuracy per evaluation (:func:`stage_curves`), saved
    as ``workdir/training_curves.png``; its path, or None when no stage logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in stages if os.path.exists(os.path.join(workdir, s, "metrics.jsonl"))]
    if not stages:
        return None
    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.5), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        curves = stage_curves(os.path.join(workdir, stage), val_metric, val_metrics)
        ax.plot(*curves["loss"], color="black", label="loss")
        val_losses = [name for name in curves if _is_val_loss(name)]
        for name in val_losses:
            ax.plot(*curves[name], color="tab:gray", linestyle="--", marker="o", label=name)
        if val_losses:
            ax.legend(loc="upper right", fontsize="small")
        ax.set_xlabel("step")
        ax.set_title(stage)
        if len(curves) > 1:
            ax2 = ax.twinx()
            if "accuracy" in curves:
                ax2.plot(*curves["accuracy"], color="tab:orange", label="accuracy")
            if "val accuracy" in curves:
                ax2.plot(*curves["val accuracy"], color="tab:green", marker="o", label="val accuracy")
            for metric in val_metrics:
                if metric in curves:
                    ax2.plot(*curves[metric], marker="o", label=metric)
            if "val accuracy" in curves or any(m in curves for m in val_metrics):
                ax2.legend(loc="lower right", fontsize="small")
            ax2.set_ylabel("accuracy")
        ax.set_ylabel("loss")
    fig.tight_layout()
    path = os.path.join(workdir, "training_curves.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
