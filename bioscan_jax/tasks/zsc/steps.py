"""The train steps a ZSC run may take, as the memory planner compiles them
(:mod:`bioscan_jax.plan`): the CLIBD towers it trains when no CLIBD workdir holds them
(``clibd``, its default: the larger) and the BarcodeBERT it pretrains for ``weights='pretrain'``
models (``pretrain``). Both come from the spec of the task that owns the step."""

from __future__ import annotations

import ml_collections

from bioscan_jax import tasks

#: The steps the planner can compile; the first is its default.
STAGES = ("clibd", "pretrain")


def _barcodebert_view(config) -> ml_collections.ConfigDict:
    """The ``barcodebert`` section as the BarcodeBERT task reads a config (``model``, ``pretrain``,
    ``data.max_nucleotides``)."""
    view = ml_collections.ConfigDict()
    view.task = "barcodebert"
    view.model = config.barcodebert.model
    view.pretrain = config.barcodebert.pretrain
    view.data = ml_collections.ConfigDict({"max_nucleotides": int(config.data.max_nucleotides)})
    return view


def step(config, stage: str, *, num_classes: int, text_vocab: int) -> tasks.StepSpec:
    if stage not in STAGES:
        raise ValueError(f"--stage must be clibd or pretrain for zero-shot clustering, got {stage!r}")
    if stage == "clibd":
        spec = tasks.get("clibd").step(config.clibd, "train", num_classes=num_classes, text_vocab=text_vocab)
    else:
        spec = tasks.get("barcodebert").step(_barcodebert_view(config), "pretrain", num_classes=num_classes)
    spec.task = f"zsc/{spec.task}"
    return spec
