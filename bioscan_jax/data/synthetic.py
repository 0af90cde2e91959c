"""Synthetic BIOSCAN-5M: a small simulated dataset in the official on-disk layout.

It is the project's embedded default dataset: every benchmark runs on it without the 200 GB
download. :func:`generate` writes

    <out>/bioscan5m/metadata/csv/BIOSCAN_5M_Insect_Dataset_metadata.csv
    <out>/bioscan5m/images/<package>/<split>/<chunk>/<processid>.jpg

with the 23 columns, 8 splits and chunk directories of the real release (all from
:mod:`bioscan_jax.data.schema`).

How it is simulated
-------------------
* **Taxonomy.** A tree under phylum Arthropoda (class → order → family → subfamily → genus →
  species → BIN), mostly Insecta, with made-up Latin-like names. Some families have no
  subfamilies, as in BOLD. Higher ranks grow by a nested Chinese-restaurant process, so group
  sizes are heavy-tailed.
* **Species roles**, as in the BIOSCAN-5M split rules:
  *seen* species have scientific names ("Genus epithet") and records in train/val/test;
  *unseen* species have BOLD-style placeholder names ("Genus sp. ABC1234") in a seen genus and
  records in key_unseen/val_unseen/test_unseen; *held-out* species (placeholders in genera
  with no seen species, or scientific names with few records) go to other_heldout; *dark*
  species are never identified and only occur in pretrain. Every species may also contribute
  unidentified records to pretrain, whose labels stop above species (often above genus).
  Splits are assigned **per unique barcode**: records sharing an identical ``dna_barcode`` are
  always in the same split.
* **DNA.** An ancestral COI-like sequence (codon-structured, A+T ≈ 67%) evolves down the tree
  under an HKY-like model (transitions favoured, third codon positions fastest, gamma site
  rates, per-lineage rate noise): p-distances are about 1% within species, 9% within genus and
  20–30% across orders. About a quarter of species descend from the ancestor of another genus
  of their subfamily (paraphyletic genera and misplaced species, as in real BOLD data). Within a
  species, BINs and haplotypes differ by a few substitutions; haplotype frequencies are skewed,
  so identical barcodes recur. Each record reads a 500–700 nt window (658 nt for most), with
  occasional internal and trailing N runs. Calibration, as on real COI barcodes: cosine 1-NN on
  k-mer counts (k = 4..6) finds the species of seen test records essentially always, and the
  genus of unseen species (queries test_unseen, keys train) about 70% of the time (60–80%
  across seeds at the default size).
* **Images.** See :mod:`bioscan_jax.data.synthetic_images`: insect-like drawings whose traits
  are inherited order → family → genus → species, with per-specimen pose and lighting.
* **Everything else:** plausible geography (country, province/state, coordinates; some
  missing), ``sampleid``/``processid`` in BIOSCAN style, ``index_bioscan_1M_insect`` for about
  a quarter of Insecta records.

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

or :func:`generate` (writes files) and :func:`simulate` (metadata in memory, without the image
size columns). The default size (6,000 records) takes about 20 CPU-seconds with images.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import math
import multiprocessing
import os
import pathlib
import sys
import threading
import time
from collections.abc import Sequence

import numpy as np
import pandas as pd

from bioscan_jax.data import schema
from bioscan_jax.data import synthetic_images as images_lib

#: Default number of records: enough for every benchmark to learn something, small enough to
#: generate in well under a minute (60 seen species with ≥ 15 train records each).
DEFAULT_NUM_RECORDS = 6000
#: Fewer records cannot fill all eight splits.
MIN_NUM_RECORDS = 100

# Species roles.
SEEN, UNSEEN, HELDOUT, DARK = "seen", "unseen", "heldout", "dark"
#: A held-out species with a placeholder name in a genus without seen species (while building).
PLACEHOLDER_HELDOUT = "heldout:placeholder"

#: Splits (and their order of priority when shares are tied) that each role's records go to.
ROLE_SPLITS: dict[str, tuple[str, ...]] = {
    SEEN: ("train", "test", "val", "pretrain"),
    UNSEEN: ("key_unseen", "test_unseen", "val_unseen", "pretrain"),
    HELDOUT: ("other_heldout", "pretrain"),
    DARK: ("pretrain",),
}

#: Ranks below phylum that a record may have filled, top down.
LABEL_RANKS: tuple[str, ...] = ("class", "order", "family", "subfamily", "genus", "species")
PHYLUM = "Arthropoda"

#: Classes and their share of genera (BIOSCAN-5M is mostly Insecta).
CLASS_WEIGHTS: dict[str, float] = {
    "Insecta": 0.84,
    "Arachnida": 0.08,
    "Collembola": 0.03,
    "Malacostraca": 0.015,
    "Diplopoda": 0.012,
    "Chilopoda": 0.008,
    "Branchiopoda": 0.008,
    "Ostracoda": 0.007,
}

#: Probability that an unidentified (pretrain) record is labelled down to each rank, at most.
PRETRAIN_LABEL_DEPTH: dict[str, float] = {
    "phylum": 0.005,
    "class": 0.02,
    "order": 0.30,
    "family": 0.35,
    "subfamily": 0.10,
    "genus": 0.225,
}


# ============================================================================= names

_ONSETS = ("b", "c", "d", "g", "l", "m", "n", "p", "r", "s", "t", "v", "h", "f", "x", "z",
           "ch", "ph", "th", "tr", "pr", "cr", "st", "sc", "gl", "pl", "br", "dr", "")
_SIMPLE_ONSETS = ("b", "c", "d", "g", "l", "m", "n", "p", "r", "t", "v", "ph", "th")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "i", "o", "ae", "y", "eu")
_CODAS = ("n", "r", "l", "s")
_GENUS_ENDINGS = ("us", "a", "ia", "ella", "omyia", "ops", "odes", "ina", "ura", "ix", "opsis", "ides", "onia")
_EPITHET_ENDINGS = ("i", "ae", "us", "a", "um", "ensis", "ata", "atus", "icola", "iformis", "oides", "ianus")
_ORDER_ENDINGS_NON_INSECT = ("ida", "ones", "morpha", "poda")
_LETTERS = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))


class NameMaker:
    """Deterministic, unique Latin-looking names for every rank, and BOLD-style codes."""

    def __init__(self, rng: np.random.Generator):
        self._rng = rng
        self._used: set[str] = set()

    def _pick(self, options: Sequence[str]) -> str:
        return options[int(self._rng.integers(len(options)))]

    def _root(self) -> str:
        """Two or three syllables, without a final vowel, ready for a suffix."""
        parts, after_coda = [], False
        syllables = int(self._rng.integers(2, 4))
        for i in range(syllables):
            onset = self._pick(_SIMPLE_ONSETS if after_coda else _ONSETS)
            coda = self._pick(_CODAS) if i < syllables - 2 and self._rng.random() < 0.5 else ""
            parts.append(onset + self._pick(_VOWELS) + coda)
            after_coda = bool(coda)
        stem = "".join(parts)
        return stem.rstrip("aeiouy") or stem

    def _unique(self, make) -> str:
        while True:
            name = make()
            if name not in self._used and 4 <= len(name) <= 22:
                self._used.add(name)
                return name

    def order(self, class_name: str) -> str:
        ending = "ptera" if class_name == "Insecta" else self._pick(_ORDER_ENDINGS_NON_INSECT)
        return self._unique(lambda: (self._root() + "o" + ending).capitalize())

    def family(self) -> str:
        return self._unique(lambda: (self._root() + "idae").capitalize())

    def subfamily(self) -> str:
        return self._unique(lambda: (self._root() + "inae").capitalize())

    def genus(self) -> str:
        return self._unique(lambda: (self._root() + self._pick(_GENUS_ENDINGS)).capitalize())

    def species(self, genus: str) -> str:
        """A scientific name, "Genus epithet", unique in the dataset."""
        return self._unique(lambda: f"{genus} {self._root()}{self._pick(_EPITHET_ENDINGS)}")

    def placeholder_species(self, genus: str) -> str:
        """A BOLD-style interim name, "Genus sp. ABC1234"."""
        return f"{genus} sp. {self.code()}"

    def code(self) -> str:
        """An unused code of three letters and four digits, like 'ABC1234'."""

        def make():
            letters = "".join(self._rng.choice(_LETTERS, 3))
            return letters + "".join(str(d) for d in self._rng.integers(0, 10, 4))

        return self._unique(make)


# ============================================================================= taxonomy


@dataclasses.dataclass
class Taxonomy:
    """The simulated tree. Integer arrays point each node to its parent one rank up."""

    class_names: list[str]
    order_names: list[str]
    order_class: np.ndarray
    order_plan: list[str]  # body plan of the order's drawings (synthetic_images.BODY_PLANS)
    family_names: list[str]
    family_order: np.ndarray
    subfamily_names: list[str | None]  # None: the family has no named subfamilies
    subfamily_family: np.ndarray
    genus_names: list[str]
    genus_subfamily: np.ndarray
    species_names: list[str]
    species_genus: np.ndarray
    species_role: np.ndarray  # SEEN / UNSEEN / HELDOUT / DARK
    species_dna_genus: np.ndarray  # genus whose ancestor the species' DNA descends from

    @property
    def num_species(self) -> int:
        return len(self.species_names)

    def species_nodes(self) -> dict[str, np.ndarray]:
        """Node index of every species' ancestor at each rank (and the species itself)."""
        genus = self.species_genus
        subfamily = self.genus_subfamily[genus]
        family = self.subfamily_family[subfamily]
        order = self.family_order[family]
        return {
            "class": self.order_class[order],
            "order": order,
            "family": family,
            "subfamily": subfamily,
            "genus": genus,
            "species": np.arange(self.num_species),
        }

    def species_rank_names(self) -> dict[str, np.ndarray]:
        """Name of every species' ancestor at each rank (None for an absent subfamily)."""
        names = {
            "class": self.class_names,
            "order": self.order_names,
            "family": self.family_names,
            "subfamily": self.subfamily_names,
            "genus": self.genus_names,
            "species": self.species_names,
        }
        return {r: np.array(names[r], dtype=object)[nodes] for r, nodes in self.species_nodes().items()}


@dataclasses.dataclass(frozen=True)
class RoleCounts:
    """How many species of each role, and how many labelled records each role gets in all."""

    seen: int
    unseen: int
    heldout: int
    dark: int
    seen_records: int
    unseen_records: int
    heldout_records: int

    @classmethod
    def for_size(cls, num_records: int) -> RoleCounts:
        """Scales with the dataset: one seen species per 100 records, 28% of records seen,
        6% unseen, 4.5% held out, the rest (about 61%) pretrain."""
        n = num_records
        seen, unseen, heldout = max(6, round(n / 100)), max(3, round(n / 200)), max(2, round(n / 200))
        return cls(
            seen=seen,
            unseen=unseen,
            heldout=heldout,
            dark=max(3, round(n / 50)),
            seen_records=max(round(0.28 * n), 3 * seen),
            unseen_records=max(round(0.06 * n), 3 * unseen),
            heldout_records=max(round(0.045 * n), heldout),
        )


def _genus_contents(roles: RoleCounts, rng: np.random.Generator) -> list[list[str]]:
    """The species roles in each genus.

    Seen genera come first and hold one or more seen species (1.7 on average) and all the
    unseen species, spread evenly; the other genera hold the placeholder held-out species (the unseen genera
    of BIOSCAN-5M). Dark species and scientifically named held-out species go anywhere.
    """
    n_seen_genera = max(2, round(roles.seen / 1.7))
    extra = rng.multinomial(roles.seen - n_seen_genera, np.full(n_seen_genera, 1 / n_seen_genera))
    genera: list[list[str]] = [[SEEN] * (1 + int(k)) for k in extra]
    for i in range(roles.unseen):  # spread over the seen genera, one each before any gets two
        if i % n_seen_genera == 0:
            spread = rng.permutation(n_seen_genera)
        genera[spread[i % n_seen_genera]].append(UNSEEN)
    n_placeholder = max(1, roles.heldout // 2)
    n_other = max(1, round(n_placeholder / 1.5)) + max(1, round(0.3 * roles.dark))
    genera += [[] for _ in range(n_other)]
    for i in range(n_placeholder):
        g = i if i < n_other else int(rng.integers(n_other))
        genera[n_seen_genera + g].append(PLACEHOLDER_HELDOUT)
    for _ in range(roles.heldout - n_placeholder):
        genera[int(rng.integers(len(genera)))].append(HELDOUT)
    for _ in range(roles.dark):
        seen_genus = rng.random() < 0.4
        g = int(rng.integers(n_seen_genera)) if seen_genus else n_seen_genera + int(rng.integers(n_other))
        genera[g].append(DARK)
    for species in genera:
        if not species:
            species.append(DARK)
    return genera


class _RankLevel:
    """Nodes of one rank, each under a parent node, grown by a Chinese-restaurant process:
    a new member joins an existing node with probability ∝ its size, a new one ∝ ``alpha``."""

    def __init__(self, alpha: float):
        self.alpha = alpha
        self.parent: list[int] = []
        self.size: list[int] = []
        self._children: dict[int, list[int]] = {}

    def place(self, parent: int, rng: np.random.Generator, single: bool = False) -> int:
        """Node for a new member under ``parent``; ``single`` keeps one node per parent."""
        own = self._children.setdefault(parent, [])
        if single:
            k = 0
        else:
            weights = np.array([self.size[i] for i in own] + [self.alpha], dtype=np.float64)
            k = int(rng.choice(len(weights), p=weights / weights.sum()))
        if k == len(own):
            own.append(len(self.parent))
            self.parent.append(parent)
            self.size.append(0)
        node = own[k]
        self.size[node] += 1
        return node


#: Share of families that have named subfamilies.
SUBFAMILY_FRACTION = 0.65


def build_taxonomy(roles: RoleCounts, rng: np.random.Generator) -> Taxonomy:
    """Draws the tree, its names, each species' role and each species' DNA ancestry."""
    contents = _genus_contents(roles, rng)
    n_genera = len(contents)
    class_names = list(CLASS_WEIGHTS)
    class_p = np.array(list(CLASS_WEIGHTS.values()))
    orders, families, subfamilies = _RankLevel(2.5), _RankLevel(2.0), _RankLevel(1.0)
    family_has_subfamilies: list[bool] = []
    genus_subfamily = np.zeros(n_genera, dtype=np.int64)
    for i, g in enumerate(rng.permutation(n_genera)):  # seen and other genera mixed in the tree
        c = 0 if i == 0 else int(rng.choice(len(class_names), p=class_p / class_p.sum()))
        f = families.place(orders.place(c, rng), rng)
        if f == len(family_has_subfamilies):
            family_has_subfamilies.append(bool(rng.random() < SUBFAMILY_FRACTION))
        genus_subfamily[g] = subfamilies.place(f, rng, single=not family_has_subfamilies[f])

    names = NameMaker(rng)
    order_class = np.array(orders.parent)
    order_plan = []
    for c in order_class:
        plans = images_lib.BODY_PLANS_BY_CLASS[class_names[c]]
        order_plan.append(plans[int(rng.integers(len(plans)))])
    subfamily_family = np.array(subfamilies.parent)
    genus_names = [names.genus() for _ in range(n_genera)]
    species_names, species_genus, species_role = [], [], []
    for g, roles_here in enumerate(contents):
        for role in roles_here:
            placeholder = role in (UNSEEN, PLACEHOLDER_HELDOUT)
            make = names.placeholder_species if placeholder else names.species
            species_names.append(make(genus_names[g]))
            species_genus.append(g)
            species_role.append(HELDOUT if role == PLACEHOLDER_HELDOUT else role)
    tax = Taxonomy(
        class_names=class_names,
        order_names=[names.order(class_names[c]) for c in order_class],
        order_class=order_class,
        order_plan=order_plan,
        family_names=[names.family() for _ in families.parent],
        family_order=np.array(families.parent),
        subfamily_names=[names.subfamily() if family_has_subfamilies[f] else None for f in subfamily_family],
        subfamily_family=subfamily_family,
        genus_names=genus_names,
        genus_subfamily=genus_subfamily,
        species_names=species_names,
        species_genus=np.array(species_genus),
        species_role=np.array(species_role),
        species_dna_genus=np.array(species_genus),
    )
    tax.species_dna_genus = _paraphyletic_ancestry(tax, rng)
    return tax


#: Fraction of species (per role) whose DNA descends from another genus of their subfamily.
PARAPHYLY_FRACTION = 0.26


def _paraphyletic_ancestry(tax: Taxonomy, rng: np.random.Generator) -> np.ndarray:
    """The genus each species' DNA descends from.

    Its own genus, except for a fixed fraction of each role, whose DNA descends from a related
    genus (same subfamily, else family, else order): the genus is paraphyletic, or the species
    is misplaced in it. Unseen species are misplaced towards genera with seen species, so that
    DNA reads them as that genus; seen species only in genera that keep another seen species,
    so that every seen genus stays recognisable by DNA.
    """
    dna_genus = tax.species_genus.copy()
    g_sub = tax.genus_subfamily
    g_fam = tax.subfamily_family[g_sub]
    g_ord = tax.family_order[g_fam]
    genus_ids = np.arange(len(g_sub))
    seen_per_genus = np.bincount(tax.species_genus[tax.species_role == SEEN], minlength=len(g_sub))
    for role in (SEEN, UNSEEN, HELDOUT, DARK):
        members = np.flatnonzero(tax.species_role == role)
        targets = seen_per_genus > 0 if role == UNSEEN else np.ones(len(g_sub), dtype=bool)
        if role == SEEN:
            members = members[seen_per_genus[tax.species_genus[members]] > 1]
        n_moved = round(PARAPHYLY_FRACTION * int(np.sum(tax.species_role == role)))
        for s in rng.permutation(members)[:n_moved]:
            g = tax.species_genus[s]
            on_own_lineage = (tax.species_role == SEEN) & (tax.species_genus == g) & (dna_genus == g)
            if role == SEEN and on_own_lineage.sum() <= 1:
                continue  # keep one seen species on the genus' own lineage
            for group in (g_sub, g_fam, g_ord):
                relatives = np.flatnonzero((group == group[g]) & (genus_ids != g) & targets)
                if len(relatives):
                    dna_genus[s] = relatives[int(rng.integers(len(relatives)))]
                    break
    return dna_genus


# ============================================================================= DNA

#: Alignment length; the standard 658-nt COI-5P window starts at BARCODE_START.
ALIGNED_LENGTH = 720
BARCODE_START = 39
BARCODE_LENGTH = 658
MIN_BARCODE_LENGTH, MAX_BARCODE_LENGTH = 500, 700
#: Stationary base frequencies (A, C, G, T) per codon position: COI is A+T rich, most at 3rd.
BASE_FREQS = np.array(
    [
        [0.28, 0.17, 0.27, 0.28],
        [0.17, 0.24, 0.16, 0.43],
        [0.44, 0.08, 0.05, 0.43],
    ]
)
#: Relative substitution rate per codon position (mean 1), and gamma shape across sites.
CODON_RATES = np.array([0.45, 0.12, 2.43])
GAMMA_SHAPE = 0.5
#: Transition / transversion rate ratio.
KAPPA = 4.0
#: Expected substitutions per site on the branch above a node of each rank.
BRANCH_LENGTHS: dict[str, float] = {
    "class": 0.3,
    "order": 0.25,
    "family": 0.12,
    "subfamily": 0.06,
    "genus": 0.07,
    "species": 0.03,
    "bin": 0.008,
    "haplotype": 0.0025,
}
#: Log-normal sd of per-branch rate noise (lineages evolve at different speeds).
LINEAGE_RATE_SD = 0.35
_NUCLEOTIDES = np.frombuffer(b"ACGT", dtype=np.uint8)
_TRANSITION = np.array([[0, 0, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0], [0, 1, 0, 0]], dtype=bool)  # A<->G, C<->T


def _hky_jumps() -> tuple[np.ndarray, np.ndarray]:
    """HKY jump chain per codon position: (3, 4, 4) cumulative P(new | old) and (3, 4) exit rates.

    Rates Q_ij ∝ π_j · (κ if i→j is a transition else 1); exit rates are scaled so that one
    unit of branch length is one expected substitution per site at stationarity.
    """
    q = BASE_FREQS[:, None, :] * np.where(_TRANSITION, KAPPA, 1.0)[None] * (1.0 - np.eye(4))[None]
    exit_rates = q.sum(axis=-1)
    exit_rates /= (BASE_FREQS * exit_rates).sum(axis=-1, keepdims=True)
    return np.cumsum(q / q.sum(axis=-1, keepdims=True), axis=-1), exit_rates


class SequenceEvolver:
    """Evolves aligned uint8 sequences (0..3 = ACGT) along branches.

    On a branch, a site is hit with probability 1 - exp(-length × site rate × exit rate of its
    base) and then jumps to a new base by the HKY jump chain. With exit rates q_i = Σ_j π_j κ_ij
    this approximates the HKY process (one substitution per site per branch at most), whose
    stationary frequencies are :data:`BASE_FREQS`.
    """

    _BLOCK = 4096

    def __init__(self, rng: np.random.Generator):
        self._rng = rng
        positions = np.arange(ALIGNED_LENGTH) % 3
        gamma = rng.gamma(GAMMA_SHAPE, 1.0 / GAMMA_SHAPE, ALIGNED_LENGTH)
        rates = CODON_RATES[positions] * gamma
        self.site_rates = rates / rates.mean()
        self.positions = positions
        self._cdf, self._exit = _hky_jumps()

    def root(self) -> np.ndarray:
        """An ancestral sequence drawn from the per-position base frequencies."""
        u = self._rng.random(ALIGNED_LENGTH)
        cdf = np.cumsum(BASE_FREQS, axis=1)[self.positions]
        return (u[:, None] > cdf).sum(axis=1).clip(0, 3).astype(np.uint8)

    def evolve(self, parents: np.ndarray, branch_length: float, noise: bool = True) -> np.ndarray:
        """Children of ``parents`` (m, L) after a branch of the given expected length.

        ``noise`` multiplies each branch by a log-normal rate (mean 1, sd LINEAGE_RATE_SD).
        """
        m = parents.shape[0]
        lengths = np.full(m, branch_length)
        if noise:
            lengths = lengths * self._rng.lognormal(-0.5 * LINEAGE_RATE_SD**2, LINEAGE_RATE_SD, m)
        children = parents.copy()
        for start in range(0, m, self._BLOCK):  # blocks bound the memory of the (m, L) draws
            block = slice(start, start + self._BLOCK)
            old = parents[block]
            rates = lengths[block, None] * self.site_rates[None, :] * self._exit[self.positions[None, :], old]
            rows, cols = np.nonzero(self._rng.random(old.shape) < -np.expm1(-rates))
            cdf = self._cdf[self.positions[cols], old[rows, cols]]
            new = (self._rng.random(len(rows))[:, None] > cdf).sum(axis=1).clip(0, 3)
            children[rows + start, cols] = new
        return children


def to_text(codes: np.ndarray) -> str:
    """ACGT string of a uint8 code sequence."""
    return _NUCLEOTIDES[codes].tobytes().decode("ascii")


def evolve_species_sequences(tax: Taxonomy, rng: np.random.Generator) -> tuple[np.ndarray, SequenceEvolver]:
    """Aligned ancestral sequence of every species, evolved down the tree (paraphyly included)."""
    evo = SequenceEvolver(rng)
    root = evo.root()[None]
    classes = evo.evolve(np.repeat(root, len(tax.class_names), axis=0), BRANCH_LENGTHS["class"])
    orders = evo.evolve(classes[tax.order_class], BRANCH_LENGTHS["order"])
    families = evo.evolve(orders[tax.family_order], BRANCH_LENGTHS["family"])
    subfamilies = evo.evolve(families[tax.subfamily_family], BRANCH_LENGTHS["subfamily"])
    genera = evo.evolve(subfamilies[tax.genus_subfamily], BRANCH_LENGTHS["genus"])
    species = evo.evolve(genera[tax.species_dna_genus], BRANCH_LENGTHS["species"])
    return species, evo


# ============================================================================= records


def _allocate(total: int, n: int, base: int, rng: np.random.Generator, sd: float) -> np.ndarray:
    """Splits ``total`` records over ``n`` species: ``base`` each, the rest ∝ log-normal weights."""
    base = min(base, total // n)
    w = rng.lognormal(0.0, sd, n)
    return base + rng.multinomial(total - base * n, w / w.sum())


def _role_split_quotas(role: str, n: int) -> dict[str, int]:
    """Intended labelled records per split for a species with ``n`` labelled records."""
    if role == SEEN:
        test, val = max(1, round(0.17 * n)), max(1, round(0.06 * n))
        return {"train": n - test - val, "test": test, "val": val}
    if role == UNSEEN:
        test, val = max(1, round(0.25 * n)), max(1, round(0.12 * n))
        return {"key_unseen": n - test - val, "test_unseen": test, "val_unseen": val}
    if role == HELDOUT:
        return {"other_heldout": n}
    return {}


#: Labelled records per species of each role, at least (when the dataset is large enough).
MIN_LABELLED_RECORDS: dict[str, int] = {SEEN: 22, UNSEEN: 8, HELDOUT: 1}
#: Log-normal sd of the weights that share the remaining labelled records among a role's species.
LABELLED_RECORDS_SD: dict[str, float] = {SEEN: 0.7, UNSEEN: 0.3, HELDOUT: 0.7}


def species_quotas(
    tax: Taxonomy, roles: RoleCounts, num_records: int, rng: np.random.Generator
) -> list[dict[str, int]]:
    """Intended records per split of every species, pretrain included; they sum to num_records.

    Pretrain takes what the labelled splits leave, spread over all species with log-normal
    weights (doubled for dark species).
    """
    labelled = np.zeros(tax.num_species, dtype=np.int64)
    totals = {SEEN: roles.seen_records, UNSEEN: roles.unseen_records, HELDOUT: roles.heldout_records}
    for role, total in totals.items():
        members = np.flatnonzero(tax.species_role == role)
        labelled[members] = _allocate(total, len(members), MIN_LABELLED_RECORDS[role], rng, LABELLED_RECORDS_SD[role])
    pretrain_total = num_records - int(labelled.sum())
    if pretrain_total < 0:
        raise ValueError(f"num_records={num_records} is too small for {labelled.sum()} labelled records")
    weights = rng.lognormal(0.0, 1.0, tax.num_species) * np.where(tax.species_role == DARK, 2.0, 1.0)
    pretrain = rng.multinomial(pretrain_total, weights / weights.sum())
    quotas = []
    for s in range(tax.num_species):
        q = _role_split_quotas(str(tax.species_role[s]), int(labelled[s]))
        q["pretrain"] = int(pretrain[s])
        quotas.append(q)
    return quotas


@dataclasses.dataclass
class SpecimenDraws:
    """Per-record draws before splits are known (one entry per record, grouped by species)."""

    species: np.ndarray
    bin_id: np.ndarray  # global BIN index
    haplotype: np.ndarray  # global haplotype index
    barcode: list[str]


def _read_windows(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Aligned [start, end) read by each of ``n`` records: 658 nt for most, else 500–700 nt."""
    standard = rng.random(n) < 0.65
    trim_5p = np.clip(np.round(rng.exponential(25.0, n)) - 15, -BARCODE_START, 150).astype(np.int64)
    trim_3p = np.clip(np.round(rng.exponential(20.0, n)) - 10, -22, 160).astype(np.int64)
    start = BARCODE_START + trim_5p
    end = BARCODE_START + BARCODE_LENGTH - trim_3p
    end = np.minimum(np.clip(end, start + MIN_BARCODE_LENGTH, start + MAX_BARCODE_LENGTH), ALIGNED_LENGTH)
    start = np.where(standard, BARCODE_START, start)
    end = np.where(standard, BARCODE_START + BARCODE_LENGTH, end)
    return start, end


def _sequencing_noise(seq: str, rng: np.random.Generator) -> str:
    """Internal N runs (about 30% of reads) and trailing N (about 8%), in place of bases."""
    internal, trailing = rng.random(2) < (0.3, 0.08)
    if not (internal or trailing):
        return seq
    chars = list(seq)
    if internal:
        for _ in range(1 + rng.poisson(0.5)):
            run = int(rng.integers(1, 4)) if rng.random() < 0.6 else int(rng.integers(5, 31))
            at = int(rng.integers(0, len(chars) - run))
            chars[at : at + run] = "N" * run
    if trailing:
        run = int(rng.integers(1, 31))
        chars[-run:] = "N" * run
    return "".join(chars)


def _draw_bins(counts: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """BINs of each species (1–3, one dominant): (species of each BIN, BIN of each record).

    Records are numbered species by species: species 0's records first.
    """
    bin_species, record_bin = [], []
    for s, n in enumerate(counts):
        n_bins = 1 + int(rng.random() < 0.2) + int(rng.random() < 0.05)
        w = np.array([1.0, 0.3, 0.15][:n_bins])
        local = rng.choice(n_bins, size=n, p=w / w.sum())
        present = np.unique(local)  # BINs that drew records
        record_bin.append(len(bin_species) + np.searchsorted(present, local))
        bin_species.extend([s] * len(present))
    return np.array(bin_species, dtype=np.int64), np.concatenate(record_bin)


def _draw_haplotypes(record_bin: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Haplotypes of each BIN: (BIN of each haplotype, haplotype of each record).

    A BIN with n records has ceil(3·log(1 + n/3)) haplotypes with Zipf frequencies, the first
    being the commonest, so identical barcodes recur.
    """
    by_bin = np.argsort(record_bin, kind="stable")
    groups = np.split(by_bin, np.flatnonzero(np.diff(record_bin[by_bin])) + 1)  # every BIN has records
    hap_bin, record_hap = [], np.empty(len(record_bin), dtype=np.int64)
    for b, members in enumerate(groups):
        n_hap = max(1, math.ceil(3.0 * math.log1p(len(members) / 3.0)))
        w = 1.0 / np.arange(1, n_hap + 1)
        record_hap[members] = len(hap_bin) + rng.choice(n_hap, size=len(members), p=w / w.sum())
        hap_bin.extend([b] * n_hap)
    return np.array(hap_bin, dtype=np.int64), record_hap


def draw_specimens(
    tax: Taxonomy,
    quotas: list[dict[str, int]],
    species_seqs: np.ndarray,
    evo: SequenceEvolver,
    names: NameMaker,
    rng: np.random.Generator,
) -> tuple[SpecimenDraws, list[str]]:
    """BIN, haplotype and barcode of every record (numbered species by species); BIN names."""
    counts = np.array([sum(q.values()) for q in quotas])
    bin_species, record_bin = _draw_bins(counts, rng)
    bin_seqs = evo.evolve(species_seqs[bin_species], BRANCH_LENGTHS["bin"])
    bin_names = [f"BOLD:{names.code()}" for _ in bin_species]

    hap_bin, record_hap = _draw_haplotypes(record_bin, rng)
    hap_seqs = evo.evolve(bin_seqs[hap_bin], BRANCH_LENGTHS["haplotype"], noise=False)
    first = np.r_[True, hap_bin[1:] != hap_bin[:-1]]
    hap_seqs[first] = bin_seqs[hap_bin[first]]  # each BIN's commonest haplotype is its consensus
    hap_text = [to_text(h) for h in hap_seqs]

    starts, ends = _read_windows(len(record_hap), rng)
    reads = zip(record_hap.tolist(), starts.tolist(), ends.tolist(), strict=True)
    barcodes = [_sequencing_noise(hap_text[h][a:b], rng) for h, a, b in reads]
    draws = SpecimenDraws(bin_species[record_bin], record_bin, record_hap, barcodes)
    _separate_species_barcodes(draws)
    return draws, bin_names


def _separate_species_barcodes(draws: SpecimenDraws) -> None:
    """Guarantees that no barcode is shared by two species (so that a barcode's split and its
    species agree): a clash, vanishingly rare, is resolved by trimming the later read."""
    owner: dict[str, int] = {}
    for i, (code, s) in enumerate(zip(draws.barcode, draws.species, strict=True)):
        while owner.setdefault(code, int(s)) != s:
            code = code[:-1]
        draws.barcode[i] = code


def assign_groups(group_sizes: np.ndarray, quotas: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Assigns groups of records (one group per unique barcode) to splits.

    Largest groups first (ties in random order); each goes to the split with the largest
    unfilled share of its quota, ties to the earlier split. Returns a split position per group.
    """
    order = np.lexsort((rng.random(len(group_sizes)), -group_sizes))
    quotas = np.asarray(quotas, dtype=np.float64)
    filled = np.zeros_like(quotas)
    out = np.empty(len(group_sizes), dtype=np.int64)
    for g in order:
        share = np.where(quotas > 0, (quotas - filled) / np.maximum(quotas, 1.0), -np.inf)
        k = int(np.argmax(share))
        out[g] = k
        filled[k] += group_sizes[g]
    return out


def assign_splits(
    tax: Taxonomy, quotas: list[dict[str, int]], draws: SpecimenDraws, rng: np.random.Generator
) -> np.ndarray:
    """Split name of every record, decided per unique barcode within each species."""
    splits = np.empty(len(draws.barcode), dtype=object)
    groups: dict[str, list[int]] = {}
    for i, code in enumerate(draws.barcode):
        groups.setdefault(code, []).append(i)
    by_species: dict[int, list[list[int]]] = {}
    for members in groups.values():  # insertion order: deterministic
        by_species.setdefault(int(draws.species[members[0]]), []).append(members)
    for s in range(tax.num_species):
        members = by_species.get(s, [])
        if not members:
            continue
        names = ROLE_SPLITS[str(tax.species_role[s])]
        target = [quotas[s].get(n, 0) for n in names]
        chosen = assign_groups(np.array([len(m) for m in members]), np.array(target), rng)
        for m, k in zip(members, chosen, strict=True):
            splits[m] = names[k]
    return splits


# ============================================================================= metadata


#: Countries (share of records) with provinces/states and their approximate centres.
GEOGRAPHY: dict[str, tuple[float, tuple[tuple[str, float, float], ...]]] = {
    "Costa Rica": (0.30, (("Guanacaste", 10.6, -85.4), ("Alajuela", 10.4, -84.4), ("Puntarenas", 9.0, -83.4),
                          ("Limon", 10.0, -83.2), ("San Jose", 9.9, -84.0))),
    "Canada": (0.25, (("Ontario", 45.5, -79.5), ("Quebec", 46.8, -71.2), ("British Columbia", 49.3, -123.0),
                      ("Alberta", 51.0, -114.0), ("Manitoba", 49.9, -97.1), ("Nova Scotia", 44.6, -63.6),
                      ("Yukon Territory", 60.7, -135.0))),
    "South Africa": (0.10, (("Western Cape", -33.9, 18.9), ("KwaZulu-Natal", -29.6, 30.4), ("Limpopo", -23.9, 29.5),
                            ("Mpumalanga", -25.5, 30.9))),
    "Thailand": (0.08, (("Chiang Mai", 18.8, 98.9), ("Nakhon Ratchasima", 14.5, 101.4), ("Chanthaburi", 12.6, 102.1))),
    "Pakistan": (0.07, (("Punjab", 31.5, 73.1), ("Khyber Pakhtunkhwa", 34.0, 71.6), ("Sindh", 25.4, 68.3))),
    "Kenya": (0.05, (("Nairobi", -1.3, 36.8), ("Kakamega", 0.3, 34.8))),
    "Madagascar": (0.04, (("Toamasina", -18.1, 49.4), ("Fianarantsoa", -21.4, 47.1))),
    "Panama": (0.03, (("Colon", 9.3, -79.9), ("Chiriqui", 8.4, -82.4))),
    "Argentina": (0.03, (("Misiones", -27.4, -55.9), ("Salta", -24.8, -65.4))),
    "Australia": (0.025, (("Queensland", -19.3, 146.8), ("New South Wales", -33.9, 151.1))),
    "Malaysia": (0.025, (("Sabah", 5.98, 116.07), ("Pahang", 3.8, 103.3))),
}


def _geography(tax: Taxonomy, species: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Country, province/state and coordinates of every record.

    Genera have a home country that most of their species share; 85% of a species' records
    come from its home country and 60% from its home province. Some cells are left empty.
    """
    countries = list(GEOGRAPHY)
    p = np.array([GEOGRAPHY[c][0] for c in countries])
    p /= p.sum()
    genus_home = rng.choice(len(countries), size=len(tax.genus_names), p=p)
    own_country = rng.random(tax.num_species) < 0.7
    elsewhere = rng.choice(len(countries), tax.num_species, p=p)
    species_home = np.where(own_country, genus_home[tax.species_genus], elsewhere)
    species_province = rng.integers(0, 1 << 30, tax.num_species)
    n = len(species)
    country = np.where(rng.random(n) < 0.85, species_home[species], rng.choice(len(countries), size=n, p=p))
    province_pick = np.where(rng.random(n) < 0.6, species_province[species], rng.integers(0, 1 << 30, n))
    jitter = rng.normal(0.0, 0.5, (n, 2))
    no_country, no_province, no_coords = (rng.random((3, n)) < np.array([[0.005], [0.04], [0.06]]))
    out = {k: np.full(n, None, dtype=object) for k in ("country", "province_state")}
    lat, lon = np.full(n, np.nan), np.full(n, np.nan)
    for i in np.flatnonzero(~no_country):
        name = countries[country[i]]
        provinces = GEOGRAPHY[name][1]
        province, p_lat, p_lon = provinces[province_pick[i] % len(provinces)]
        out["country"][i] = name
        out["province_state"][i] = None if no_province[i] else province
        if not no_coords[i]:
            lat[i], lon[i] = round(p_lat + jitter[i, 0], 3), round(p_lon + jitter[i, 1], 3)
    out["coord-lat"], out["coord-lon"] = lat, lon
    return out


def _label_depths(splits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Index into ("phylum",) + LABEL_RANKS of the lowest labelled rank of every record."""
    ranks = ("phylum",) + LABEL_RANKS
    depth = np.full(len(splits), ranks.index("species"))
    pre = np.flatnonzero(splits == "pretrain")
    p = np.array([PRETRAIN_LABEL_DEPTH.get(r, 0.0) for r in ranks])
    depth[pre] = rng.choice(len(ranks), size=len(pre), p=p / p.sum())
    return depth


def _labels(tax: Taxonomy, species: np.ndarray, depth: np.ndarray) -> dict[str, np.ndarray]:
    """Rank columns, ``taxon`` and ``inferred_ranks`` (number of filled ranks class … species)."""
    names = tax.species_rank_names()
    cols: dict[str, np.ndarray] = {}
    taxon = np.full(len(species), PHYLUM, dtype=object)
    filled = np.zeros(len(species), dtype=np.uint8)
    for level, rank in enumerate(LABEL_RANKS, start=1):
        values = names[rank][species]
        values[depth < level] = None
        present = np.not_equal(values, None)
        taxon[present] = values[present]
        filled += present
        cols[rank] = values
    cols["taxon"] = taxon
    cols["inferred_ranks"] = filled
    return cols


def _identifiers(n: int, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """BIOSCAN-style ``processid`` ('ABCD123-22': project, serial, year) and ``sampleid``
    ('BIOUG12345-A01': plate and well, 95 specimens per plate), all unique."""
    codes = list(dict.fromkeys("".join(rng.choice(_LETTERS, 4)) for _ in range(max(8, n // 250))))
    years = rng.integers(19, 24, len(codes))
    project = rng.integers(0, len(codes), n)
    serial = np.empty(n, dtype=np.int64)
    next_serial = rng.integers(1, 500, len(codes))
    steps = 1 + (rng.random(n) < 0.2)  # some serials are skipped
    for i, p in enumerate(project):
        serial[i] = next_serial[p]
        next_serial[p] += steps[i]
    processids = [f"{codes[p]}{s}-{years[p]:02d}" for p, s in zip(project.tolist(), serial.tolist(), strict=True)]
    plates = n // 95 + 1
    first_plate = int(rng.integers(10000, max(10001, 100000 - plates)))
    plate, well = np.divmod(np.arange(n), 95)
    row, col = np.divmod(well, 12)
    sampleids = [
        f"BIOUG{first_plate + p:05d}-{'ABCDEFGH'[r]}{c + 1:02d}"
        for p, r, c in zip(plate.tolist(), row.tolist(), col.tolist(), strict=True)
    ]
    return processids, sampleids


def _bioscan_1m_index(is_insect: np.ndarray, rng: np.random.Generator) -> pd.array:
    """Nullable index into BIOSCAN-1M for about a quarter of the Insecta records."""
    chosen = np.flatnonzero(is_insect & (rng.random(len(is_insect)) < 0.25))
    values = pd.array([pd.NA] * len(is_insect), dtype="Int64")
    if len(chosen):
        values[chosen] = rng.choice(int(len(chosen) * 1.1) + 1, size=len(chosen), replace=False)
    return values


@dataclasses.dataclass
class Simulation:
    """A simulated dataset before images: metadata (size columns empty) and drawing inputs."""

    metadata: pd.DataFrame
    record_species: np.ndarray  # true species of every row (also for unlabelled records)
    body_plans: list[str]  # body plan per row
    traits: np.ndarray  # (num_records, NUM_TRAITS) latent traits of each row's species
    taxonomy: Taxonomy


#: Standard deviation of the latent traits added at each rank below order.
TRAIT_SD: dict[str, float] = {"family": 0.6, "genus": 0.5, "species": 0.3}


def species_traits(tax: Taxonomy, rng: np.random.Generator) -> np.ndarray:
    """Latent image traits per species: an order template perturbed per family, genus, species."""
    k = images_lib.NUM_TRAITS
    order = rng.normal(0.0, 1.0, (len(tax.order_names), k))
    family = order[tax.family_order] + rng.normal(0.0, TRAIT_SD["family"], (len(tax.family_names), k))
    genus_family = tax.subfamily_family[tax.genus_subfamily]
    genus = family[genus_family] + rng.normal(0.0, TRAIT_SD["genus"], (len(tax.genus_names), k))
    return genus[tax.species_genus] + rng.normal(0.0, TRAIT_SD["species"], (tax.num_species, k))


#: Tag that keeps the simulation's random streams apart from the per-record image streams,
#: which are seeded (seed, record index, k) with record indices far below it.
_STREAM_TAG = 0xB105CA0


def _stream(seed: int, k: int) -> np.random.Generator:
    """The k-th random stream of the simulation for ``seed``."""
    return np.random.default_rng([seed, _STREAM_TAG, k])


def simulate(num_records: int = DEFAULT_NUM_RECORDS, seed: int = 0) -> Simulation:
    """Simulates every column except the image size fields (see :func:`generate`)."""
    if num_records < MIN_NUM_RECORDS:
        raise ValueError(f"num_records must be at least {MIN_NUM_RECORDS}, got {num_records}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    streams = [_stream(seed, k) for k in range(8)]
    roles = RoleCounts.for_size(num_records)
    tax = build_taxonomy(roles, streams[0])
    names = NameMaker(streams[1])
    quotas = species_quotas(tax, roles, num_records, streams[2])
    species_seqs, evo = evolve_species_sequences(tax, streams[3])
    draws, bin_names = draw_specimens(tax, quotas, species_seqs, evo, names, streams[4])
    splits = assign_splits(tax, quotas, draws, streams[5])

    rng = streams[6]
    order = rng.permutation(num_records)  # CSV rows in random order
    species = draws.species[order]
    splits = splits[order]
    depth = _label_depths(splits, rng)
    cols = _labels(tax, species, depth)
    processids, sampleids = _identifiers(num_records, rng)
    bins = np.array(bin_names, dtype=object)[draws.bin_id[order]]
    bins[rng.random(num_records) < 0.03] = None
    geo = _geography(tax, species, rng)

    df = pd.DataFrame(
        {
            "processid": processids,
            "sampleid": sampleids,
            "taxon": cols["taxon"],
            "phylum": PHYLUM,
            **{r: cols[r] for r in LABEL_RANKS},
            "dna_bin": bins,
            "dna_barcode": np.array(draws.barcode, dtype=object)[order],
            **geo,
            "image_measurement_value": np.nan,
            "area_fraction": np.nan,
            "scale_factor": np.nan,
            "inferred_ranks": cols["inferred_ranks"],
            "split": splits,
            "index_bioscan_1M_insect": _bioscan_1m_index(cols["class"] == "Insecta", rng),
            "chunk": [schema.chunk_for(p, s) or None for p, s in zip(processids, splits, strict=True)],
        }
    )
    df = df[list(schema.COLUMNS)].astype({c: t for c, t in schema.COLUMN_DTYPES.items()})
    species_plan = np.array(tax.order_plan, dtype=object)[tax.species_nodes()["order"]]
    return Simulation(
        metadata=df,
        record_species=species,
        body_plans=species_plan[species].tolist(),
        traits=species_traits(tax, streams[7])[species],
        taxonomy=tax,
    )


# ============================================================================= images and files


#: Libraries that start native threads: a process that imported one is not forked.
_THREADED_LIBRARIES = ("jax", "tensorflow", "torch")


def _pool_context() -> multiprocessing.context.BaseContext:
    """'fork' when it is safe (no threads in this process), else 'spawn'.

    Forking needs no ``if __name__ == "__main__"`` guard in the calling script; spawning is
    the safe choice once a threaded runtime such as JAX is loaded (such programs have the guard).
    """
    threaded = threading.active_count() > 1 or any(name in sys.modules for name in _THREADED_LIBRARIES)
    if "fork" in multiprocessing.get_all_start_methods() and not threaded:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _run_jobs(jobs: list[images_lib.SpecimenJob], workers: int) -> list[images_lib.SpecimenSize]:
    """Runs specimen jobs in order, in a process pool when ``workers > 1``."""
    if workers <= 1 or len(jobs) < 4 * workers:
        return [images_lib.process_job(j) for j in jobs]
    chunksize = max(8, min(256, len(jobs) // (workers * 8)))
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context()) as pool:
        return list(pool.map(images_lib.process_job, jobs, chunksize=chunksize))


def specimen_jobs(sim: Simulation, seed: int, paths: Sequence[str] | None = None) -> list[images_lib.SpecimenJob]:
    """The drawing job of every row (``paths``: where to write each JPEG; None measures only)."""
    traits = sim.traits.tolist()
    return [
        images_lib.SpecimenJob(seed, i, sim.body_plans[i], tuple(traits[i]), None if paths is None else paths[i])
        for i in range(len(sim.metadata))
    ]


def add_image_sizes(sim: Simulation, seed: int, paths: Sequence[str] | None, workers: int) -> None:
    """Measures (and when ``paths`` is given, draws and writes) every record's specimen, then
    fills image_measurement_value, area_fraction and scale_factor."""
    sizes = _run_jobs(specimen_jobs(sim, seed, paths), workers)
    df = sim.metadata
    pixels = np.array([s.pixel_count for s in sizes], dtype=np.float64)
    pixels[_stream(seed, 8).random(len(pixels)) < 0.03] = np.nan
    df["image_measurement_value"] = pixels
    df["area_fraction"] = [s.area_fraction for s in sizes]
    df["scale_factor"] = [s.scale_factor for s in sizes]


def default_workers() -> int:
    """Worker processes for drawing: the usable CPUs, at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def write_metadata(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Writes the metadata CSV in the official column order; missing values are empty cells.

    The file appears at once (written beside it, then renamed).
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    df.to_csv(partial, index=False, columns=list(schema.COLUMNS), na_rep="", lineterminator="\n")
    os.replace(partial, path)


def generate(
    out_dir: str | os.PathLike,
    *,
    num_records: int = DEFAULT_NUM_RECORDS,
    seed: int = 0,
    image_package: str = schema.DEFAULT_IMAGE_PACKAGE,
    images: bool = True,
    workers: int | None = None,
) -> pathlib.Path:
    """Writes a synthetic BIOSCAN-5M under ``out_dir``; returns the metadata CSV path.

    ``images=False`` writes the metadata only (the CSV is byte-identical either way).
    ``workers`` sets the drawing processes (default: usable CPUs, at most 8); it does not change
    the output. Pools fork, or spawn once JAX, TensorFlow or PyTorch is imported: a script that
    imports those and then calls this needs the usual ``if __name__ == "__main__":`` guard.
    Existing files are overwritten, others left alone; the CSV is written last (atomically), so
    its presence means the dataset is complete.
    """
    out = pathlib.Path(out_dir)
    if image_package not in schema.IMAGE_PACKAGES:
        raise ValueError(f"Unknown image package {image_package!r}; valid: {', '.join(schema.IMAGE_PACKAGES)}")
    sim = simulate(num_records, seed)
    df = sim.metadata
    paths = None
    if images:
        chunks = df["chunk"].fillna("").tolist()
        paths = [
            str(out / schema.image_relpath(image_package, s, c, p))
            for s, c, p in zip(df["split"].tolist(), chunks, df["processid"].tolist(), strict=True)
        ]
    add_image_sizes(sim, seed, paths, default_workers() if workers is None else workers)
    csv_path = out / schema.METADATA_RELPATH
    write_metadata(df, csv_path)
    return csv_path


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m bioscan_jax.data.synthetic --out DIR [--records N] [--seed S] [--no-images]``."""
    parser = argparse.ArgumentParser(description="Write a synthetic BIOSCAN-5M dataset in the official layout.")
    parser.add_argument("--out", required=True, help="output folder (bioscan5m/ is created inside)")
    parser.add_argument("--records", type=int, default=DEFAULT_NUM_RECORDS, help="number of records")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--package", default=schema.DEFAULT_IMAGE_PACKAGE, choices=schema.IMAGE_PACKAGES)
    parser.add_argument("--no-images", action="store_true", help="write the metadata CSV only")
    parser.add_argument("--workers", type=int, default=None, help="drawing processes (default: CPUs, max 8)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    path = generate(
        args.out,
        num_records=args.records,
        seed=args.seed,
        image_package=args.package,
        images=not args.no_images,
        workers=args.workers,
    )
    print(f"wrote {args.records} records to {path} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
