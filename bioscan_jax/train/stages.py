"""Training stages the tasks share: the loop config of a stage, its run identity and the DNA
masked-token (BarcodeBERT) pretraining stage.

The pretraining stage: BarcodeBERT pretrains its encoder with it (``tasks/barcodebert``), CLIBD
pretrains its DNA tower with it (``model.dna.init='mlm'``), and zero-shot clustering pretrains the
BarcodeBERT it clusters with (``tasks/zsc``): one function, called with each task's own sections,
instead of each task assembling a BarcodeBERT-shaped config for another task's function.

The reference: BarcodeBERT's ``barcodebert/pretraining.py`` (masked k-mer modelling, AdamW +
OneCycle, loss on the masked positions). Species fine-tuning, BarcodeBERT's own stage, is
:mod:`bioscan_jax.tasks.barcodebert.finetune`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Sequence
from typing import Any

import ml_collections
from flax import nnx

from bioscan_jax import sharding as mesh_lib
from bioscan_jax.data import pipeline, schema, sources
from bioscan_jax.models import kmer_bert
from bioscan_jax.train import loop, losses

logger = logging.getLogger(__name__)

#: Record fields the DNA pipelines read (parsing only these keeps the input fast).
DNA_FEATURES = ("processid", "dna_barcode", "genus", "species")


def stage_config(config: ml_collections.ConfigDict, stage: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config the generic train loop reads: the run's seed, mesh, sharding rules and resume
    policy + the stage's own ``train``, ``optim`` and ``checkpoint`` sections."""
    c = ml_collections.ConfigDict()
    c.seed = config.seed
    c.mesh = config.mesh
    c.sharding_rules = config.sharding_rules
    c.train, c.optim, c.checkpoint = stage.train, stage.optim, stage.checkpoint
    c.resume = config.get("resume", "auto")
    return c


def dna_stage_identity(model_cfg: kmer_bert.KmerBertConfig, tokenizer, data: sources.Splits, split: str,
                       **options) -> dict[str, Any]:
    """What a DNA stage's result depends on beyond seed/train/optim (its run identity): the model
    (not its memory layout), the tokenisation, the data and the split with its size."""
    model = {k: v for k, v in dataclasses.asdict(model_cfg).items() if k not in ("remat",)}
    tokens = {"k": tokenizer.k, "stride": tokenizer.stride, "max_nucleotides": tokenizer.max_nucleotides,
              "add_cls": tokenizer.add_cls, "strip_trailing_n": tokenizer.strip_trailing_n}
    return {"model": model, "tokenizer": tokens,
            "data": {**data.identity, "split": split, "records": len(data[split])}, "stage": options}


class MlmValidation:
    """The pretraining stage's evaluator (:class:`bioscan_jax.train.loop.Evaluator`): the
    masked-token loss and accuracies of the model on a held-out split, as ``val/mlm_loss``,
    ``val/mlm_accuracy`` (every k-mer target) and ``val/mlm_masked_accuracy`` (masked positions).

    The batches (at most ``max_batches``, the split's first records in order) are tokenised and
    masked once, with ``seed``: every evaluation scores the same tokens, so the numbers of
    successive epochs compare. The loss is :func:`bioscan_jax.train.losses.mlm_loss`, the
    training loss, on the model in eval mode (no dropout).
    """

    def __init__(self, source, tokenizer, *, batch_size: int, mask_prob: float, masked_only: bool, seed: int,
                 mesh, rules, max_batches: int = 8):
        batches = pipeline.dna_pipeline(
            source, tokenizer=tokenizer, batch_size=mesh_lib.process_batch_size(batch_size), train=False, seed=seed, mlm=True,
            mask_prob=mask_prob, masked_only=masked_only, drop_remainder=True, num_epochs=1, shard="jax")
        self.batches = list(itertools.islice(iter(batches), max_batches))
        self.records = len(self.batches) * batch_size
        self._mesh, self._rules = mesh, rules
        self._forward = nnx.jit(lambda model, batch: losses.mlm_loss(model, batch, train=False))

    def run(self, model, step: int) -> dict[str, float]:
        del step
        sums = {"loss": 0.0, "accuracy": 0.0, "masked_accuracy": 0.0}
        with mesh_lib.mesh_context(self._mesh, self._rules):
            for local in self.batches:
                loss, metrics = self._forward(model, mesh_lib.to_global_batch(local, self._mesh))
                sums["loss"] += float(loss)
                sums["accuracy"] += float(metrics["accuracy"])
                sums["masked_accuracy"] += float(metrics["masked_accuracy"])
        n = max(len(self.batches), 1)
        return {f"val/mlm_{k}": v / n for k, v in sums.items()}


def mlm_validation(stage: ml_collections.ConfigDict, source, tokenizer, *, seed: int, mesh, rules,
                   batch_size: int) -> MlmValidation | None:
    """:class:`MlmValidation` of ``source`` with the stage's masking, in batches of ``batch_size``
    (fewer for a smaller split: all of its records that fill whole batch shards), or ``None``
    (logged) when the split has fewer records than the mesh has batch shards."""
    shards = mesh_lib.batch_axis_size(mesh)
    batch_size = min(batch_size, len(source) - len(source) % shards)
    if batch_size <= 0:
        logger.info("pretraining reports no validation loss: the validation split has %d records, "
                    "fewer than the %d batch shards", len(source), shards)
        return None
    return MlmValidation(source, tokenizer, batch_size=batch_size, mask_prob=float(stage.mask_prob),
                         masked_only=bool(stage.masked_only), seed=seed, mesh=mesh, rules=rules)


def mlm_model_factory(model_cfg: kmer_bert.KmerBertConfig):
    """``rngs -> KmerBertForMLM``: the pretraining stage's model (the memory planner's too)."""
    return lambda rngs: kmer_bert.KmerBertForMLM(model_cfg, rngs=rngs)


def pretrain_mlm(config: ml_collections.ConfigDict, stage: ml_collections.ConfigDict, data: sources.Splits,
                 split: str, model_cfg: kmer_bert.KmerBertConfig, tokenizer, workdir: str, *,
                 worker_count: int = 0, evaluators: Sequence[loop.Evaluator] = ()) -> loop.TrainResult:
    """Masked-token pretraining of a :class:`~bioscan_jax.models.kmer_bert.KmerBertForMLM` on
    ``data[split]``, in ``workdir`` (checkpoints, metrics, run identity).

    ``config`` gives the seed, mesh, sharding rules and resume policy; ``stage`` the ``train``,
    ``optim`` and ``checkpoint`` sections and ``mask_prob``/``masked_only``. A split smaller than
    one batch is a ``ValueError``. ``evaluators`` (e.g. :func:`mlm_validation`) run at each epoch
    end (or every ``train.eval_every`` steps) and after the last step.
    """
    source = data[split]
    batch = int(stage.train.batch_size)
    if len(source) < batch:
        raise ValueError(f"pretraining split {split!r} has {len(source)} records, fewer than one batch of {batch}")

    def data_iter():
        return iter(pipeline.dna_pipeline(
            source, tokenizer=tokenizer, batch_size=mesh_lib.process_batch_size(batch), train=True, seed=config.seed,
            mlm=True, mask_prob=stage.mask_prob, masked_only=stage.masked_only, worker_count=worker_count))

    identity = dna_stage_identity(model_cfg, tokenizer, data, split, mask_prob=float(stage.mask_prob),
                                  masked_only=bool(stage.masked_only))
    return loop.train(
        stage_config(config, stage), workdir,
        model_factory=mlm_model_factory(model_cfg),
        loss_fn=losses.mlm_loss, data_iter_factory=data_iter, steps_per_epoch=len(source) // batch,
        identity=identity, evaluators=evaluators)


def open_dna_split(data_config, split: str, *, seed: int, dedup: bool,
                   features: Sequence[str] = ()) -> sources.Splits:
    """One split for a DNA stage, with :data:`DNA_FEATURES` (+ ``features``), deduplicated by
    barcode over the whole metadata when ``dedup`` (the reference's ``data/data_split.py``:
    :func:`sources.reference_dedup`)."""
    wanted = tuple(dict.fromkeys((*DNA_FEATURES, schema.FIRST_OF_BARCODE, *features)))
    data = sources.open_splits(data_config, [split], features=wanted, seed=seed)
    if dedup:
        data.sources[split] = sources.reference_dedup(data[split])
    return data
