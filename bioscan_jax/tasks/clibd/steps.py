"""CLIBD's train step as the memory planner compiles it (:mod:`bioscan_jax.plan`): the towers,
the contrastive loss of :func:`~bioscan_jax.tasks.clibd.training.make_loss_fn`, and the batch
:func:`bioscan_jax.data.pipeline.clibd_pipeline` yields for those towers
(:func:`~bioscan_jax.data.pipeline.clibd_batch_spec`)."""

from __future__ import annotations

from bioscan_jax.data import pipeline
from bioscan_jax.tasks import StepSpec
from bioscan_jax.tasks.clibd import training

#: The steps the planner can compile.
STAGES = ("train",)


def step(config, stage: str = "train", *, num_classes: int | None = None, text_vocab: int) -> StepSpec:
    """The contrastive step of ``config``; ``text_vocab`` sizes the word vocabulary of the
    taxonomy text (a WordPiece tokenizer, ``model.text.tokenizer``, brings its own)."""
    del num_classes
    if stage not in STAGES:
        raise ValueError(f"--stage must be train for CLIBD, got {stage!r}")
    if config.model.text.get("tokenizer", ""):  # a WordPiece vocabulary: bert-small's 30,522 entries
        from bioscan_jax.models import text as text_model

        text_vocab = text_model.get_variant(config.model.text.variant).vocab_size
    mcfg = training.model_config(config, text_vocab_size=text_vocab)
    batch = int(config.train.batch_size)
    tokenizer = training.dna_tokenizer(config, mcfg.dna.k) if mcfg.dna is not None else None
    shapes = pipeline.clibd_batch_spec(
        batch, tokenizer=tokenizer, text_length=int(config.model.text.max_length),
        image_size=mcfg.image.image_size if mcfg.image is not None else 0,
        label_ranks=training.positive_label_ranks(config), modalities=mcfg.modalities)
    notes = []
    if mcfg.image is not None:
        notes.append(f"image: ViT {config.model.image.variant} at {mcfg.image.image_size} px, "
                     f"remat={mcfg.image.remat}, scan_layers={mcfg.image.scan_layers}")
    if mcfg.dna is not None:
        notes.append(f"dna: BarcodeBERT {config.model.dna.variant}, {tokenizer.num_tokens} tokens, "
                     f"remat={mcfg.dna.remat}, scan_layers={mcfg.dna.scan_layers}")
    if mcfg.text is not None:
        notes.append(f"text: {config.model.text.variant}, {config.model.text.max_length} tokens, vocabulary "
                     f"{text_vocab} (--text-vocab), remat={mcfg.text.remat}, scan_layers={mcfg.text.scan_layers}")
    notes.append(f"contrastive loss over {len(mcfg.modalities)} modalities, chunk_size={config.loss.chunk_size}")
    return StepSpec("clibd", training.model_factory(mcfg), training.make_loss_fn(config),
                    shapes, config.train, config.optim, notes)
