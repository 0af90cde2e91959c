"""BarcodeBERT's species fine-tuning stage: a linear species head on the pooled encoder,
trained end to end (the reference's ``barcodebert/finetuning.py``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from flax import nnx

from bioscan_jax import sharding as mesh_lib
from bioscan_jax.data import pipeline, sources
from bioscan_jax.models import kmer_bert
from bioscan_jax.train import loop, losses
from bioscan_jax.train.stages import dna_stage_identity, stage_config


def classifier_factory(model_cfg: kmer_bert.KmerBertConfig, num_classes: int, pooling: str = "masked_mean"):
    """``rngs -> KmerBertClassifier``: the fine-tuning stage's model (the memory planner's too)."""
    return lambda rngs: kmer_bert.KmerBertClassifier(model_cfg, num_classes, pooling=pooling, rngs=rngs)


def finetune_species(config: ml_collections.ConfigDict, stage: ml_collections.ConfigDict, data: sources.Splits,
                     split: str, model_cfg: kmer_bert.KmerBertConfig, tokenizer, workdir: str, *,
                     encoder: nnx.Module | None = None, encoder_identity: str = "",
                     head: Mapping[str, Any] | None = None, head_identity: Any = None, worker_count: int = 0,
                     evaluators: Sequence[loop.Evaluator] = (), **identity: Any) -> loop.TrainResult:
    """Species fine-tuning of a :class:`~bioscan_jax.models.kmer_bert.KmerBertClassifier`
    (``stage.pooling``, default ``masked_mean``) on ``data[split]``, in ``workdir``.

    The encoder starts from ``encoder``'s parameters (if given; ``encoder_identity``, e.g. the
    pretraining run's fingerprint, is part of the run identity) and the head from ``head``
    (``{'kernel': [hidden, species], 'bias': [species]}``, e.g. a linear probe of the frozen
    encoder; ``head_identity`` says what it depends on) or at random. ``identity`` adds options
    to the run identity; ``evaluators`` run at each epoch end (or every ``train.eval_every``
    steps) and after the last step. ``config`` gives the seed (the batches use ``seed + 1``),
    mesh, sharding rules and resume policy; ``stage`` the ``train``, ``optim`` and ``checkpoint``
    sections.
    """
    source = data[split]
    num_classes = data.num_classes("species")
    pooling = stage.get("pooling", "masked_mean")
    batch = stage.train.batch_size

    factory = classifier_factory(model_cfg, num_classes, pooling)
    warm_start = {}
    if encoder is not None:  # start the encoder from the pretrained one
        warm_start["bert"] = nnx.state(encoder, nnx.Param).to_pure_dict()
    if head is not None:
        if head["kernel"].shape != (model_cfg.hidden_size, num_classes):
            raise ValueError(f"linear-probe head of shape {head['kernel'].shape} does not fit the classifier "
                             f"({model_cfg.hidden_size} features, {num_classes} species)")
        warm_start["head"] = {"kernel": head["kernel"], "bias": head["bias"]}

    def data_iter():
        return iter(pipeline.dna_pipeline(
            source, tokenizer=tokenizer, batch_size=mesh_lib.process_batch_size(batch), train=True, seed=config.seed + 1,
            label_rank="species", worker_count=worker_count))

    identity = dna_stage_identity(model_cfg, tokenizer, data, split, num_classes=num_classes, pooling=pooling,
                                  encoder=(encoder_identity or "given") if encoder is not None else "random",
                                  head=head_identity if head is not None else "random", **identity)
    return loop.train(
        stage_config(config, stage), workdir, model_factory=factory,
        loss_fn=losses.classification_loss, data_iter_factory=data_iter, steps_per_epoch=len(source) // batch,
        warm_start=warm_start or None, identity=identity, evaluators=evaluators)
