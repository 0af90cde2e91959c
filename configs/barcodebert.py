r"""BarcodeBERT: masked k-mer pretraining, species fine-tuning, linear and 1-NN probes.

  python run.py --config=configs/barcodebert.py                  # tiny, embedded synthetic data
  python run.py --config=configs/barcodebert.py:paper --config.data.manual_dir=/data/bioscan5m
  python run.py --config=configs/barcodebert.py \
      --config.data.source=bold --config.data.path=my_barcodes.tsv

Variants: ``tiny`` (default: a small model on the synthetic dataset, CPU minutes),
``paper`` (BIOSCAN-5M "Ours (8-4-4)": k=8, 4 layers, 4 heads, 35 epochs on pretrain +
other_heldout), ``4_12_12`` (the original BarcodeBERT shape).
"""

import ml_collections

from bioscan_jax.sharding import DEFAULT_SHARDING_RULES
from configs import common

VARIANTS = ("tiny", "paper", "4_12_12")


def _stage(*, batch_size, epochs=0, steps=0, lr=1e-4, log_every=50, checkpoint_every=500):
    """One training stage (pretraining or fine-tuning): batch, length, optimiser, checkpoints."""
    return ml_collections.ConfigDict(dict(
        train=dict(batch_size=batch_size, accum_steps=1, bf16=False, steps=steps, epochs=epochs,
                   log_every=log_every, eval_every=0, progress_bar=True, tensorboard=True),
        # barcodebert/pretraining.py (and finetuning.py): AdamW, lr per 64 samples scaled by batch/64,
        # no decay, torch's OneCycleLR defaults (cosine, 30% warm-up, beta1 cycled 0.95→0.85→0.95).
        optim=common.adamw_onecycle(lr=lr, lr_ref_batch=64, cycle_momentum=True),
        checkpoint=dict(every=checkpoint_every, keep=2, async_save=True),
    ))


def get_config(arg=None):
    arg = common.parse_arg(arg, variants=VARIANTS)
    c = ml_collections.ConfigDict()
    c.task = "barcodebert"
    c.variant = arg.variant
    c.seed = 0
    c.workdir = f"workdirs/barcodebert_{arg.variant}"
    # A workdir with checkpoints of another run (other data or settings) is refused: "restart"
    # discards the old run, "force" continues it anyway (bioscan_jax/train/run_identity.py).
    c.resume = "auto"

    c.data = dict(
        source="tfds",                 # 'tfds' (bioscan5m builder) or 'bold' (a user's BOLD TSV/FASTA)
        builder_config="synthetic_dna",  # 'synthetic_dna' (embedded default) or 'dna' (real, needs manual_dir)
        data_dir="",                   # TFDS data dir ('' = TFDS default)
        manual_dir="",                 # official BIOSCAN-5M files (extracted or zips)
        on_bad_record="raise",         # the builder's policy: 'raise' or 'skip' (counted in the dataset info)
        verify_md5=True,               # False: accept an official-named metadata CSV whose md5 differs
        verify_images=True,            # False: build without decoding each image (only its JPEG structure is checked)
        # synthetic size (0 = the generator's default, 6,000). The tiny main job uses 10,000 so that
        # its 1-NN table rests on 382 unseen-species queries instead of 62 (docs/performance.md).
        num_records=10_000,
        path="",                       # source='bold': BOLD TSV or FASTA
        min_length=200,                # source='bold': shorter barcodes (nt, after normalisation) are skipped, counted
        unseen_fraction=0.2,           # source='bold': share of species held out as unseen
        test_fraction=0.2,             # source='bold': share of each seen species' records for test
        pretrain_split="auto",         # 'auto': pretrain+other_heldout (tfds) or pretrain+train (bold)
        finetune_split="train",
        test_split="test",
        probe_key_split="train",
        # The 1-NN queries: the paper's test_unseen; tiny takes every unseen-species record
        # (key_unseen + val_unseen + test_unseen: none is a key), 382 after deduplication.
        probe_query_split="unseen",
        # data/data_split.py: every set keeps the first record of each barcode after rstrip('N')
        # over the whole metadata (the tokenisation rule is the model's: model.tokenization).
        dedup_barcodes=True,
        max_nucleotides=660,
        worker_count=0,
    )
    # The tokenisation protocol (bioscan_jax.data.dna.TOKENIZATION_PROTOCOLS): 'bioscan5m' strips
    # trailing N before the 660-nt cut (data/data_split.py), 'v1' keeps them (BarcodeBERT v1, CLIBD).
    c.model = dict(variant=arg.variant, remat=False, scan_layers=False, tokenization="bioscan5m")

    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.sharding_rules = DEFAULT_SHARDING_RULES

    c.pretrain = _stage(batch_size=64, steps=160, lr=1e-4 * 4, log_every=20)
    c.pretrain.mask_prob = 0.5
    c.pretrain.masked_only = False     # reference: loss over all non-special positions
    # Tiny fine-tuning starts the head from the species linear probe of the frozen encoder (LP-FT)
    # and then trains everything for 5 epochs: 100% on synthetic test in 195 steps. With the
    # reference's random head it took 20 epochs at 4e-3 per 64 samples to reach 85.4% (6 epochs at
    # 4e-4 stayed at the class prior, 2.4%); see the README.
    c.finetune = _stage(batch_size=32, epochs=4, lr=1e-3, log_every=20)
    c.finetune.head_init = "linear_probe"  # 'random' (the reference) or 'linear_probe' (LP-FT)
    c.finetune.pooling = "masked_mean"     # 'mean' over all positions (the reference) or 'masked_mean'
    c.probe = dict(
        eval_batch_size=128,
        # 'reference' (baselines/linear_probing.py: scalar standardisation, SGD momentum 0.9,
        # lr 0.01, wd 1e-5, batch 64, 200 epochs) or 'adamw' (per-feature, AdamW + cosine).
        linear_recipe="adamw",
        linear_epochs=100, linear_lr=1e-2, linear_batch_size=256, linear_rank="species",
        linear_momentum=0.9, linear_weight_decay=1e-5,
        knn_rank="genus",
        kmer_baseline_k=4,             # k of the k-mer count 1-NN baseline
        random_init_baseline=True,     # also report the 1-NN probe of a random-init encoder
    )
    c.stages = "pretrain,finetune,probes"  # any subset, comma separated

    if arg.variant in ("paper", "4_12_12"):
        c.data.probe_query_split = "test_unseen"  # knn_probing.py: queries unseen.csv = test_unseen
    if arg.variant == "paper":
        c.data.builder_config = "dna"
        # Global batch 64, lr 1e-4 (docs/protocols.md, "batch and lr"): pretraining.py takes
        # --batch-size per GPU (default 16; global = 16 x WORLD_SIZE) and scales lr 1e-4 by
        # global/64. No source records the BIOSCAN-5M 8-4-4 run's GPU count; we assume the
        # repository's full-pipeline script slurm/run_cedar.slrm (--gres=gpu:4, torchrun over the
        # node's GPUs, no --batch-size): 4 x 16 = 64. The README's single-process command gives 16.
        c.pretrain = _stage(batch_size=64, epochs=35, lr=1e-4, log_every=100, checkpoint_every=20000)
        c.pretrain.mask_prob = 0.5
        c.pretrain.masked_only = False
        # finetuning.py: the pretraining parser (batch 16 per GPU, same GPUs: 64), its default 35
        # epochs, a random head on the unmasked mean.
        c.finetune = _stage(batch_size=64, epochs=35, lr=1e-4, log_every=100, checkpoint_every=5000)
        c.finetune.head_init = "random"
        c.finetune.pooling = "mean"
        # model.remat / model.scan_layers stay off: at batch 64 the steps plan 1.24 GiB (pretraining)
        # and 0.57 GiB (fine-tuning) per device on fsdp=8 (python -m bioscan_jax.plan
        # --config=configs/barcodebert.py:paper --mesh=fsdp=8 [--stage finetune]).
        c.probe.eval_batch_size = 1024
        c.probe.update(dict(linear_recipe="reference", linear_epochs=200, linear_lr=0.01, linear_batch_size=64,
                            linear_momentum=0.9, linear_weight_decay=1e-5))
        c.probe.kmer_baseline_k = 6
        c.data.worker_count = 8
    elif arg.variant == "4_12_12":
        c.data.builder_config = "dna"
        c.pretrain = _stage(batch_size=256, epochs=35, lr=1e-4, log_every=100, checkpoint_every=2000)
        c.pretrain.mask_prob = 0.5
        c.pretrain.masked_only = False
        c.finetune = _stage(batch_size=256, epochs=35, lr=1e-4, log_every=100, checkpoint_every=2000)
        c.finetune.head_init = "random"
        c.finetune.pooling = "mean"
        c.probe.update(dict(linear_recipe="reference", linear_epochs=200, linear_lr=0.01, linear_batch_size=64,
                            linear_momentum=0.9, linear_weight_decay=1e-5))
        c.probe.kmer_baseline_k = 6
    # Every variant's fine-tuning evaluates species accuracy on `val_split` at each epoch end
    # (finetune/metrics.jsonl `val/accuracy`, the curve in training_curves.png; '' = never; a BOLD
    # import has no validation split: skipped, one log line) and keeps the best epoch's parameters in
    # finetune/best_val/. `select` says which parameters the test accuracy is reported for: 'last'
    # (the final step) or 'best_val' (the best val epoch). It is not part of the run identity: it
    # changes neither the training nor what is kept, so a finished run can be re-reported either way.
    c.finetune.val_split = "val"
    c.finetune.select = "last"
    return c
