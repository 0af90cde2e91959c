"""BarcodeBERT's train steps as the memory planner compiles them (:mod:`bioscan_jax.plan`):
the model the stage trains, its loss, and the batch :func:`bioscan_jax.data.pipeline.dna_pipeline`
yields for it (:func:`~bioscan_jax.data.pipeline.dna_batch_spec`, with the model's own tokenizer)."""

from __future__ import annotations

from bioscan_jax.data import dna as dna_lib
from bioscan_jax.data import pipeline
from bioscan_jax.models import kmer_bert
from bioscan_jax.tasks import StepSpec
from bioscan_jax.tasks.barcodebert.finetune import classifier_factory
from bioscan_jax.train import losses, stages

#: The steps the planner can compile; the first (the one that needs the most memory) is its default.
STAGES = ("pretrain", "finetune")


def step(config, stage: str, *, num_classes: int, text_vocab: int | None = None) -> StepSpec:
    """The ``pretrain`` (masked-token) or ``finetune`` (species head of ``num_classes``) step of
    ``config``; ``text_vocab`` is not used (BarcodeBERT has no text tower)."""
    del text_vocab
    if stage not in STAGES:
        raise ValueError(f"--stage must be pretrain or finetune for BarcodeBERT, got {stage!r}")
    cfg = kmer_bert.config_from(config.model)
    tokenizer = dna_lib.tokenizer_for(config.model.tokenization, cfg.k,
                                      max_nucleotides=int(config.data.max_nucleotides))
    section = config[stage]
    batch = int(section.train.batch_size)
    notes = [f"BarcodeBERT {config.model.variant} ({stage}): k={cfg.k}, {cfg.num_layers} layers, hidden "
             f"{cfg.hidden_size}, {tokenizer.num_tokens} tokens, remat={cfg.remat}, scan_layers={cfg.scan_layers}"]
    if stage == "pretrain":
        return StepSpec("barcodebert/pretrain", stages.mlm_model_factory(cfg),
                        losses.mlm_loss, pipeline.dna_batch_spec(batch, tokenizer, mlm=True),
                        section.train, section.optim, notes)
    notes.append(f"classifier head of {num_classes} classes (--num-classes)")
    pooling = section.get("pooling", "masked_mean")
    return StepSpec("barcodebert/finetune",
                    classifier_factory(cfg, num_classes, pooling),
                    losses.classification_loss, pipeline.dna_batch_spec(batch, tokenizer, label=True),
                    section.train, section.optim, notes)
