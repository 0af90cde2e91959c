r"""CLIBD: image (ViT), DNA (BarcodeBERT) and taxonomy-text towers aligned contrastively.

  python run.py --config=configs/clibd.py                      # tiny, embedded synthetic data
  python run.py --config=configs/clibd.py:paper --config.data.manual_dir=/data/bioscan5m \
      --config.data.builder_config=cropped_256 --workdir=/ckpt/clibd
  python run.py --config=configs/clibd.py --config.model.modalities=image,dna   # I+D only

Variants:

* ``tiny`` (default): the synthetic dataset with images; 64 px crops into a 3-layer ViT (width
  128, 8 px patches), a 1-layer k=6 BarcodeBERT (width 64), a 2-layer text encoder (width 64),
  shared dimension 128; batch 128, 6 epochs of pretrain + train (228 steps), peak lr 1e-3.
  About 280 CPU-seconds in all (under 4 minutes on 2 otherwise idle cores).
* ``paper`` (BIOSCAN-CLIBD v1.0): ViT-B/16 at 224 px, BarcodeBERT k=5 with 12 layers, bert-small
  text, shared dimension 768, global batch 2000, max lr 5e-5 × 2000/500, 20 epochs, bf16.

The DNA encoder can start from BarcodeBERT weights (``model.dna.init``): ``'mlm'`` runs the
masked-token pretraining of :mod:`bioscan_jax.tasks.barcodebert` first (settings in
``dna_pretrain``, on ``pretrain+other_heldout``), or give the workdir of an earlier BarcodeBERT
run with the same model shape (its ``pretrain/checkpoints`` are restored), or an HF checkpoint.
``model.image.init`` takes an HF ``ViTModel`` (or, with ``init_format='timm'``, a timm) ViT
checkpoint, e.g. ImageNet ``google/vit-base-patch16-224-in21k`` saved locally.
"""

import ml_collections

from bioscan_jax.train.contrastive import INIT_LOG_SCALE
from bioscan_jax.sharding import DEFAULT_SHARDING_RULES
from configs import common

VARIANTS = ("tiny", "paper")


def get_config(arg=None):
    arg = common.parse_arg(arg, variants=VARIANTS)
    c = ml_collections.ConfigDict()
    c.task = "clibd"
    c.variant = arg.variant
    c.seed = 0
    c.workdir = f"workdirs/clibd_{arg.variant}"
    # A workdir with checkpoints of another run (other data or settings) is refused: "restart"
    # discards the old run, "force" continues it anyway (bioscan_jax/train/run_identity.py).
    c.resume = "auto"
    c.quiet_logs = True                # hide the libraries' routine INFO logs (orbax, TFDS)

    c.data = dict(
        source="tfds",
        builder_config="synthetic",    # 'synthetic' (embedded, with images) or 'cropped_256' (real, manual_dir)
        data_dir="",                   # TFDS data dir ('' = TFDS default)
        manual_dir="",                 # official BIOSCAN-5M files (extracted or zips)
        on_bad_record="raise",         # the builder's policy: 'raise' or 'skip' (counted in the dataset info)
        verify_md5=True,               # False: accept an official-named metadata CSV whose md5 differs
        verify_images=True,            # False: build without decoding each image (only its JPEG structure is checked)
        num_records=0,                 # synthetic size (0 = the generator's default)
        train_split="pretrain+train",  # CLIBD trains on pretrain + train
        vocab_split="train",           # taxonomy words of the text tower
        image_size=64,                 # crop (ViT input) size; CLIBD: 224
        resize=73,                     # shorter side before cropping; CLIBD: 256
        normalize_images=False,        # CLIBD feeds [0, 1] pixels
        dna_random_offset=False,       # CLIBD does not shift the barcode
        # False: one seeded order repeated by every epoch, as CLIBD's DistributedSampler(shuffle=True)
        # that never gets set_epoch (bioscanclip/util/dataset.py); True: a new order per epoch.
        reshuffle_each_epoch=True,
        max_nucleotides=660,
        worker_count=0,                # grain worker processes (0: threads only)
        read_threads=2,                # grain reader threads (0: grain's default, 16)
        prefetch=4,                    # batches read ahead (0: grain's default, 500)
    )

    c.model = dict(
        modalities="image,dna,text",   # any two or more of image, dna, text
        embed_dim=128,                 # shared dimension (CLIBD: 768)
        # ViT variant + field overrides (image_size always comes from data.image_size).
        image=dict(variant="Ti/16", init="", init_format="hf",
                   overrides=dict(patch_size=8, hidden_size=128, num_layers=3, num_heads=2, mlp_dim=384)),
        # KmerBert variant + overrides; init: '' | 'mlm' | BarcodeBERT workdir | HF checkpoint.
        # tokenization: bioscan_jax.data.dna.TOKENIZATION_PROTOCOLS; CLIBD tokenises as v1 (trailing N kept).
        dna=dict(variant="tiny", init="", tokenization="v1",
                 overrides=dict(k=6, hidden_size=64, num_layers=1, num_heads=2, intermediate_size=256)),
        # Text encoder variant + overrides; tokenizer: '' (words of the training taxonomy) or a
        # WordPiece vocab.txt / model directory / hub id; init: '' or HF BertModel weights.
        text=dict(variant="tiny", max_length=text_max_length(), tokenizer="", init="",
                  overrides=dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=256)),
        # 'masked_mean' (ours) or 'reference' (CLIBD's own tower outputs; models/towers.py).
        tower_mode="masked_mean",
    )

    c.loss = dict(
        positives="",                  # '' (identity targets, CLIBD), 'species' or 'dna_bin' (label positives)
        chunk_size=0,                  # > 0: blockwise loss with column blocks of this size
        init_log_scale=INIT_LOG_SCALE,  # log(1/0.07)
        learnable_scale=True,          # False: fixed temperature (not optimised)
        max_scale=0.0,                 # > 0: clamp the logit scale (CLIBD: no clamp)
    )

    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.sharding_rules = DEFAULT_SHARDING_RULES
    c.train = dict(batch_size=128, accum_steps=1, bf16=False, steps=0, epochs=6, log_every=10,
                   eval_every=0, progress_bar=False, tensorboard=True)
    # AdamW + OneCycle (cosine, 30% warm-up); peak lr = lr * batch / lr_ref_batch (CLIBD: 5e-5 per 500).
    c.optim = common.adamw_onecycle(lr=1e-3, lr_ref_batch=0, grad_clip=1.0)
    c.checkpoint = dict(every=0, keep=1, async_save=True)

    # BarcodeBERT masked-token pretraining of the DNA encoder, used when model.dna.init == 'mlm'.
    c.dna_pretrain = dict(
        split="pretrain+other_heldout", dedup=True, mask_prob=0.5, masked_only=False,
        train=dict(batch_size=64, accum_steps=1, bf16=False, steps=0, epochs=4, log_every=50,
                   eval_every=0, progress_bar=False, tensorboard=False),
        optim=common.adamw_onecycle(lr=4e-4, lr_ref_batch=64),
        checkpoint=dict(every=0, keep=1, async_save=True),
    )

    c.eval = dict(
        no_alignment=True,             # also evaluate the untrained towers ("No alignment" row)
        key_splits=("train", "key_unseen"),
        query_splits=("test", "test_unseen"),  # the reported benchmark
        # Retrieval of these queries is logged during training (train.eval_every; '' = off).
        val_query_splits=("val", "val_unseen"),
        pairs=("dna_to_dna", "image_to_image", "image_to_dna"),
        ks=(1, 3, 5),
        ranks=("order", "family", "genus", "species"),
        # 'class': a missing label is a class of its own (CLIBD's not_classified: such queries
        # count, unlabelled keys match them); 'exclude': left out of that rank (counted).
        missing_labels="class",
        # scripts/train_cl.py: val/val_unseen retrieval at the end of 0-based epoch e when
        # e > eval_skip_epoch; the test tables are of the best by compute_overall_acc ('best_val',
        # kept in train/best_val) or of the last step ('last').
        eval_skip_epoch=2,
        select="best_val",
        batch_size=256,
        cache_max_records=50_000,      # keep decoded eval batches in memory up to this many records
    )

    if arg.variant == "paper":
        c.seed = 42                    # global_config.yaml / image_dna_text_seed_42.yaml: default_seed 42
        c.data.reshuffle_each_epoch = False
        c.data.builder_config = "cropped_256"
        c.data.image_size, c.data.resize = 224, 256
        c.data.worker_count = 8
        c.data.read_threads = 16
        c.data.prefetch = 2            # per worker; a float32 batch of 2000 images at 224 px is 1.2 GB
        c.model.embed_dim = 768
        c.model.tower_mode = "reference"
        # The pretrained encoders CLIBD starts from (bioscanclip/model/simple_clip.py::load_clip_model):
        # timm 'vit_base_patch16_224' with pretrained=True, i.e. timm 1.0.x's default tag (CLIBD pins
        # timm~=1.0.9); BarcodeBERT v1 5-12-12 (global_config.yaml: ckpt/BarcodeBERT/5_mer/model_41.pth,
        # a v1 state dict with the 4**5 + 3 vocabulary); prajjwal1/bert-small and its WordPiece vocab.
        # remat + scan_layers on every tower: the step of global batch 2000 on fsdp=8 plans 8.95 GiB
        # per device instead of 101.3 GiB (remat alone: 102.0), so it fits 8 x 80 GiB (python -m
        # bioscan_jax.plan --config=configs/clibd.py:paper --mesh=fsdp=8). The numbers are the same;
        # pretrained weights load into the stacked layers (models/layers.match_layer_layout).
        fit = dict(remat=True, scan_layers=True)
        c.model.image = dict(variant="B/16", init="timm/vit_base_patch16_224.augreg2_in21k_ft_in1k",
                             init_format="timm", overrides=dict(layer_norm_eps=1e-6, **fit))
        c.model.dna = dict(variant="5_12_12", init="bioscan-ml/clibd:ckpt/BarcodeBERT/5_mer/model_41.pth", tokenization="v1",
                           overrides=dict(vocab_size=4**5 + 3, **fit))
        c.model.text = dict(variant="bert-small", max_length=text_max_length(), tokenizer="prajjwal1/bert-small",
                            init="prajjwal1/bert-small", overrides=dict(**fit))
        c.train = dict(batch_size=2000, accum_steps=1, bf16=True, steps=0, epochs=20, log_every=100,
                       eval_every=0, progress_bar=True, tensorboard=True)
        c.optim = common.adamw_onecycle(lr=5e-5, lr_ref_batch=500, weight_decay=0.01)
        c.checkpoint = dict(every=1000, keep=3, async_save=True)
        c.dna_pretrain.train.batch_size = 512
        c.dna_pretrain.train.epochs = 35
        c.dna_pretrain.optim.lr = 1e-4
        c.dna_pretrain.checkpoint.every = 2000
        c.eval.batch_size = 1024
        c.eval.eval_skip_epoch = 10    # image_dna_text_seed_42.yaml
    return c


def text_max_length() -> int:
    from bioscan_jax.data.text import MAX_LENGTH

    return MAX_LENGTH
