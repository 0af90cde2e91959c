"""Synthetic BIOSCAN-5M: a small simulated dataset in the official on-disk layout.

It is the project's embedded default dataset: every benchmark runs on it without the 200 GB
download. :func:`generate` writes

    <out>/bioscan5m/metadata/csv/BIOSCAN_5M_Insect_Dataset_metadata.csv
    <out>/bioscan5m/images/<package>/<split>/<chunk>/<processid>.jpg

with the 23 columns, 8 splits and chunk directories of the real release (all from
:mod:`bioscan_jax.data.schema`).

How it is simulated
-------------------
* **Taxonomy** (:mod:`~bioscan_jax.data.synthetic.taxonomy`). A tree under phylum Arthropoda
  (class → order → family → subfamily → genus → species → BIN), mostly Insecta, with made-up
  Latin-like names. Some families have no subfamilies, as in BOLD. Higher ranks grow by a
  nested Chinese-restaurant process, so group sizes are heavy-tailed.
* **Species roles**, as in the BIOSCAN-5M split rules (roles in
  :mod:`~bioscan_jax.data.synthetic.taxonomy`, records and splits in
  :mod:`~bioscan_jax.data.synthetic.specimens`):
  *seen* species have scientific names ("Genus epithet") and records in train/val/test;
  *unseen* species have BOLD-style placeholder names ("Genus sp. ABC1234") in a seen genus and
  records in key_unseen/val_unseen/test_unseen; *held-out* species (placeholders in genera
  with no seen species, or scientific names with few records) go to other_heldout; *dark*
  species are never identified and only occur in pretrain. Every species may also contribute
  unidentified records to pretrain, whose labels stop above species (often above genus).
  Splits are assigned **per unique barcode**: records sharing an identical ``dna_barcode`` are
  always in the same split.
* **DNA** (:mod:`~bioscan_jax.data.synthetic.sequences`; BINs, haplotypes and reads in
  :mod:`~bioscan_jax.data.synthetic.specimens`). An ancestral COI-like sequence
  (codon-structured, A+T ≈ 67%) evolves down the tree under an HKY-like model (transitions
  favoured, third codon positions fastest, gamma site rates, per-lineage rate noise):
  p-distances are about 1% within species, 9% within genus and 20–30% across orders. About a
  quarter of species descend from the ancestor of another genus of their subfamily
  (paraphyletic genera and misplaced species, as in real BOLD data). Within a species, BINs and
  haplotypes differ by a few substitutions; haplotype frequencies are skewed, so identical
  barcodes recur. Each record reads a 500–700 nt window (658 nt for most), with occasional
  internal and trailing N runs. Calibration, as on real COI barcodes: cosine 1-NN on k-mer
  counts (k = 4..6) finds the species of seen test records essentially always, and the genus of
  unseen species (queries test_unseen, keys train) about 70% of the time (60–80% across seeds
  at the default size).
* **Images.** See :mod:`bioscan_jax.data.synthetic.images`: insect-like drawings whose traits
  are inherited order → family → genus → species, with per-specimen pose and lighting.
* **Everything else** (:mod:`~bioscan_jax.data.synthetic.specimens`): plausible geography
  (country, province/state, coordinates; some missing), ``sampleid``/``processid`` in BIOSCAN
  style, ``index_bioscan_1M_insect`` for about a quarter of Insecta records.

Column conventions
------------------
``taxon`` is the name at the lowest filled rank (class … species; "Arthropoda" if none).
``inferred_ranks`` is the **number of filled ranks among class, order, family, subfamily,
genus, species** (0–6, uint8). ``image_measurement_value`` is the pixel count of the specimen
mask (about 3% left empty); ``area_fraction`` and ``scale_factor`` follow the BIOSCAN-5M
formulas on the specimen's bounding box in the written image. The image package only names
the directory: every package gets the same 256-px drawings.

Output is a pure function of ``(num_records, seed)``: every record's picture is seeded by
``(seed, row index)``, so the bytes do not depend on the number of worker processes, and the
CSV is the same whether or not images are written.

Use::

    python -m bioscan_jax.data.synthetic --out DIR [--records N] [--seed S] [--no-images]

(:mod:`~bioscan_jax.data.synthetic.cli`), or :func:`generate` (writes files; in
:mod:`~bioscan_jax.data.synthetic.layout`, with the worker pool that draws the images) and
:func:`simulate` (metadata in memory, without the image size columns; in
:mod:`~bioscan_jax.data.synthetic.specimens`). The default size (6,000 records) takes about
20 CPU-seconds with images.

At BIOSCAN-5M's size (millions of records) use the fast mode instead,
``python -m bioscan_jax.data.synthetic --fast --out DIR [--records N]``
(:mod:`~bioscan_jax.data.synthetic.bulk`): the metadata CSV only, vectorised, with the real split
sizes, fraction of distinct barcodes and taxa per rank, but random taxonomy and barcodes (no
simulated evolution, no images); the 5,150,850 rows take a few minutes.
"""

from bioscan_jax.data.synthetic.cli import main
from bioscan_jax.data.synthetic.layout import generate, specimen_jobs
from bioscan_jax.data.synthetic.specimens import (
    DEFAULT_NUM_RECORDS,
    LABEL_RANKS,
    MIN_NUM_RECORDS,
    Simulation,
    simulate,
)

__all__ = [
    "DEFAULT_NUM_RECORDS",
    "LABEL_RANKS",
    "MIN_NUM_RECORDS",
    "Simulation",
    "generate",
    "main",
    "simulate",
    "specimen_jobs",
]
