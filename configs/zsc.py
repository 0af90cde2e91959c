r"""BIOSCAN-ZSC: zero-shot clustering of frozen image and DNA embeddings.

  python run.py --config=configs/zsc.py                      # tiny, embedded synthetic data
  python run.py --config=configs/zsc.py:paper --config.data.manual_dir=/data/bioscan5m \
      --config.models.vit_b16.path=/weights/dino_vitb16.safetensors \
      --config.models.barcodebert.path=workdirs/barcodebert_paper

Variants: ``tiny`` (default: small encoders on the synthetic dataset, CPU minutes; the DNA
encoder is pretrained on the fly by the BarcodeBERT task and the image encoder trained by the
CLIBD task) and ``paper`` (BIOSCAN-5M test + test_unseen, ViT-B/16 and BarcodeBERT 8-4-4,
UMAP to 50 dims, Ward, AMI at every rank).

What is evaluated is ``encoders``: comma-separated specs ``<modality>:<model>[+<model>]``:

* ``dna:barcodebert_pretrained`` — one DNA model;
* ``image:vit_random`` — one image model;
* ``image+dna:vit_clibd+barcodebert_pretrained`` — an image and a DNA model, each embedding
  z-scored per feature, then concatenated.

Every ``<model>`` names an entry of ``models``; each entry says which modality it embeds and
where its weights come from (``weights``):

========== ======== ==========================================================================
weights    modality meaning
========== ======== ==========================================================================
random     both     random init (``variant`` + ``overrides``; seed ``config.seed``)
pretrain   dna      pretrained on the fly by the BarcodeBERT task (``barcodebert`` section);
                    the checkpoint is kept under the workdir and reused by later runs
checkpoint dna      a BarcodeBERT workdir's pretraining checkpoint (``path``; the model's
                    ``variant`` + ``overrides``)
hf         both     an HF checkpoint converted on load (``path``: .safetensors, .bin or an HF
                    directory; BERT/BarcodeBERT for dna, ``ViTModel`` for image)
timm       image    a timm ViT state dict (``path``; LayerNorm eps 1e-6)
clibd      both     the CLIBD tower of that modality: loaded from ``clibd_workdir`` when set,
                    else trained on the fly by the CLIBD task (``clibd`` section) under the
                    run's workdir, where later runs find it
kmer       dna      no model: k-mer frequency vectors (``k``, ``stride``), the alignment-free
                    reference (stride 1 does not depend on where a read starts)
========== ======== ==========================================================================

Image preprocessing is the ZSC protocol: Resize ``image_size`` → CenterCrop ``image_size``,
then ``normalize``: ``none`` (our ViTs, trained without normalisation), ``imagenet`` (imported
ImageNet weights) or ``bioscan`` (the dataset's RGB mean/std); CLIBD towers get what CLIBD trained
with (``clibd.data.normalize_images``: none by default). DNA:
trailing N stripped, masked mean of the last hidden layer (``feature`` picks, for CLIBD towers,
the aligned ``projection`` output or the ``encoder``'s pooled feature).
"""

import ml_collections

from bioscan_jax.sharding import DEFAULT_SHARDING_RULES
from configs import barcodebert as barcodebert_configs
from configs import clibd as clibd_configs
from configs import common

VARIANTS = ("tiny", "paper")


def model(modality, weights, *, variant="", overrides=None, path="", image_size=0, normalize="none",
          layer_norm_eps=0.0, feature="projection", k=4, stride=0, frames=1):
    """One encoder definition (every field present so that any can be overridden by flags).

    ``variant`` + ``overrides``: KmerBert variant (dna, default ``'tiny'``) or ViT variant such as
    ``'B/16'`` (image), with config field overrides (e.g. ``num_layers``), for ``random``,
    ``checkpoint``, ``hf`` and ``timm`` weights; ``image_size``: ViT input size (0 = 224);
    ``layer_norm_eps``: 0 = the default of the weights (1e-6 for timm, 1e-12 otherwise);
    ``feature``: CLIBD towers only, ``'projection'`` (aligned space) or ``'encoder'``;
    ``k``, ``stride``: ``kmer`` only, k-mer length and step (0 = k: non-overlapping);
    ``frames``: BarcodeBERT only, 1 (the protocol) or the number of reading frames whose
    embeddings are averaged (k: every start position of the non-overlapping tokens).
    """
    return ml_collections.ConfigDict(dict(
        modality=modality, weights=weights, variant=variant, overrides=dict(overrides or {}), path=path,
        image_size=image_size, normalize=normalize, layer_norm_eps=layer_norm_eps, feature=feature, k=k,
        stride=stride, frames=frames))


def clibd_config(c, arg):
    """The CLIBD experiment whose towers ``weights='clibd'`` models use, on the same data and seed
    as the clustering (its data fields refer to ``c.data``, so overrides of those carry over)."""
    clibd = clibd_configs.get_config(arg)
    for key in ("source", "builder_config", "data_dir", "manual_dir", "num_records", "max_nucleotides"):
        clibd.data[key] = c.data.get_ref(key)
    clibd.seed = c.get_ref("seed")
    return clibd


def get_config(arg=None):
    arg = common.parse_arg(arg, variants=VARIANTS)
    c = ml_collections.ConfigDict()
    c.task = "zsc"
    c.variant = arg.variant
    c.seed = 0
    c.workdir = f"workdirs/zsc_{arg.variant}"
    # A workdir with checkpoints of another run (other data or settings) is refused: "restart"
    # discards the old run, "force" continues it anyway (bioscan_jax/train/run_identity.py).
    c.resume = "auto"

    c.data = dict(
        source="tfds",                # 'tfds' (bioscan5m builder) or 'bold' (DNA-only models then)
        builder_config="synthetic",   # 'synthetic' (embedded, with images) or an image package
        data_dir="",
        manual_dir="",
        on_bad_record="raise",         # the builder's policy: 'raise' or 'skip' (counted in the dataset info)
        verify_md5=True,               # False: accept an official-named metadata CSV whose md5 differs
        verify_images=True,            # False: build without decoding each image (only its JPEG structure is checked)
        num_records=0,                # synthetic size (0 = the generator's default)
        path="",                      # source='bold': BOLD TSV or FASTA
        min_length=200,               # source='bold': shorter barcodes (nt, after normalisation) are skipped, counted
        unseen_fraction=0.2,
        test_fraction=0.2,
        split="test+test_unseen",     # the clustered records (the paper: seen and unseen together)
        # True: records sorted by processid within each partition (zs-ssl-clustering's
        # datasets/bioscan5m.py, "needed to reproduce"); False: the builder's order (tiny's tables).
        sort_by_processid=False,
        max_nucleotides=660,
        worker_count=0,
    )
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.sharding_rules = DEFAULT_SHARDING_RULES

    c.embed = dict(
        batch_size=64,                # global batch of the jitted forward (multiple of data*fsdp)
        recompute=False,              # True: re-embed even when workdir/embeddings/*.npz exist
    )
    c.cluster = dict(
        reduction="umap",             # 'umap' (the paper), 'pca' or 'none'
        n_components=50,
        n_neighbors=30,
        min_dist=0.0,
        silhouette_samples=10_000,
        # 'fused': z-score the modalities of an image+DNA spec over all records; 'elementwise_zscore':
        # the reference's --prenorm (io.py::load_embeddings): every modality of every spec z-scored
        # per feature within each partition (test, test_unseen); 'none'.
        prenorm="fused",
        # A missing label at a rank is one class of its own ('class', the reference notebook) or
        # left out ('drop'); both AMIs are in zsc.json (ami/<rank> and ami_<other>/<rank>).
        missing_labels="class",
        # '' or a prenorm: single-modality specs are clustered again with it for the per-rank AMI
        # (results-BIOSCAN5M.ipynb cells 56, 59 use 'none'; the main table, cell 44, z-scores).
        per_rank_prenorm="",
    )
    c.plots = dict(
        ami_by_rank=True,
        umap_scatter="all",           # 'all', '' (none) or comma-separated encoder specs
    )

    # On-the-fly BarcodeBERT pretraining for weights='pretrain' (the barcodebert task's pretrain()).
    bb = barcodebert_configs.get_config("tiny" if arg.variant == "tiny" else "paper")
    c.barcodebert = dict(
        model=bb.model,
        pretrain=bb.pretrain,
        pretrain_split=bb.data.pretrain_split,
        dedup_barcodes=True,          # one record per barcode after rstrip('N') (data/data_split.py)
    )
    # paper: CLIBD paper's towers with remat + scan_layers (8.95 GiB per device on fsdp=8; python -m
    # bioscan_jax.plan --config=configs/zsc.py:paper --mesh=fsdp=8), BarcodeBERT paper's model (1.24 GiB).
    c.clibd = clibd_config(c, "tiny" if arg.variant == "tiny" else "paper")
    c.clibd_workdir = ""              # '' = <workdir>/models/clibd_<hash>

    if arg.variant == "tiny":
        c.barcodebert.pretrain.train.epochs = 0
        c.barcodebert.pretrain.train.steps = 200
        # Masking 80% of the k-mers (BarcodeBERT: 50%) makes the short pretraining infer the lineage
        # from few tokens; at 50% the 200-step encoder clusters species no better than random init.
        c.barcodebert.pretrain.mask_prob = 0.8
        c.barcodebert.pretrain.train.progress_bar = False
        c.barcodebert.pretrain.train.tensorboard = False
        c.clibd.train.epochs = 2          # the CLIBD task's tiny run is 6 epochs; 2 keep the run in minutes
        c.models = dict(
            barcodebert_pretrained=model("dna", "pretrain"),
            barcodebert_random=model("dna", "random", variant="tiny"),
            # The same ViT as the CLIBD image tower, untrained.
            vit_random=model("image", "random", variant=c.clibd.model.image.variant,
                             overrides=c.clibd.model.image.overrides, image_size=c.clibd.data.image_size),
            vit_clibd=model("image", "clibd"),
            # Alignment-free references: 4-mer frequencies over BarcodeBERT's own (non-overlapping)
            # tokens and over all overlapping 4-mers.
            kmer4=model("dna", "kmer", k=4),
            kmer4_overlapping=model("dna", "kmer", k=4, stride=1),
            # The same BarcodeBERTs, embeddings averaged over the 4 reading frames of their tokens.
            barcodebert_pretrained_frames=model("dna", "pretrain", frames=4),
            barcodebert_random_frames=model("dna", "random", variant="tiny", frames=4),
        )
        c.encoders = ("dna:barcodebert_pretrained,dna:barcodebert_random,dna:kmer4,dna:kmer4_overlapping,"
                      "dna:barcodebert_pretrained_frames,dna:barcodebert_random_frames,"
                      "image:vit_random,image:vit_clibd,image+dna:vit_clibd+barcodebert_pretrained")
    else:
        c.data.builder_config = "cropped_256"
        c.data.worker_count = 8
        c.cluster.prenorm = "elementwise_zscore"
        c.cluster.per_rank_prenorm = "none"
        c.data.sort_by_processid = True
        c.embed.batch_size = 256
        c.models = dict(
            # BarcodeBERT 8-4-4 from a barcodebert:paper workdir (or weights='hf' + a converted file).
            barcodebert=model("dna", "checkpoint", variant="paper", path="workdirs/barcodebert_paper"),
            # An ImageNet ViT-B/16 (e.g. DINO, timm layout), ImageNet normalisation.
            vit_b16=model("image", "timm", variant="B/16", image_size=224, normalize="imagenet"),
            vit_clibd=model("image", "clibd"),
            dna_clibd=model("dna", "clibd"),
        )
        c.clibd_workdir = "workdirs/clibd_paper"
        c.encoders = "dna:barcodebert,image:vit_b16,image+dna:vit_b16+barcodebert"
    return c
