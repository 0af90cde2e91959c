"""Records and metadata of the synthetic BIOSCAN-5M: :func:`simulate`.

Per-species record quotas, the BIN, haplotype and barcode read of every record
(:func:`draw_specimens`), splits assigned per unique barcode (:func:`assign_splits`), and the
other columns: labels, geography, identifiers, BIOSCAN-1M index. :func:`simulate` puts them
together with the taxonomy (:mod:`~bioscan_jax.data.synthetic.taxonomy`) and the DNA
(:mod:`~bioscan_jax.data.synthetic.sequences`) into a :class:`Simulation`; the image size
columns are filled in by :mod:`~bioscan_jax.data.synthetic.layout`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd

from bioscan_jax.data import schema
from bioscan_jax.data.synthetic import images as images_lib
from bioscan_jax.data.synthetic.sequences import (
    ALIGNED_LENGTH,
    BARCODE_LENGTH,
    BARCODE_START,
    BRANCH_LENGTHS,
    MAX_BARCODE_LENGTH,
    MIN_BARCODE_LENGTH,
    SequenceEvolver,
    evolve_species_sequences,
    to_text,
)
from bioscan_jax.data.synthetic.taxonomy import (
    DARK,
    HELDOUT,
    LETTERS,
    PHYLUM,
    SEEN,
    UNSEEN,
    NameMaker,
    RoleCounts,
    Taxonomy,
    build_taxonomy,
)

#: Default number of records: enough for every benchmark to learn something, small enough to
#: generate in well under a minute (60 seen species with ≥ 15 train records each).
DEFAULT_NUM_RECORDS = 6000
#: Fewer records cannot fill all eight splits.
MIN_NUM_RECORDS = 100

#: Splits (and their order of priority when shares are tied) that each role's records go to.
ROLE_SPLITS: dict[str, tuple[str, ...]] = {
    SEEN: ("train", "test", "val", "pretrain"),
    UNSEEN: ("key_unseen", "test_unseen", "val_unseen", "pretrain"),
    HELDOUT: ("other_heldout", "pretrain"),
    DARK: ("pretrain",),
}

#: Ranks below phylum that a record may have filled, top down.
LABEL_RANKS: tuple[str, ...] = ("class", "order", "family", "subfamily", "genus", "species")

#: Probability that an unidentified (pretrain) record is labelled down to each rank, at most.
PRETRAIN_LABEL_DEPTH: dict[str, float] = {
    "phylum": 0.005,
    "class": 0.02,
    "order": 0.30,
    "family": 0.35,
    "subfamily": 0.10,
    "genus": 0.225,
}


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
    codes = list(dict.fromkeys("".join(rng.choice(LETTERS, 4)) for _ in range(max(8, n // 250))))
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


def stream(seed: int, k: int) -> np.random.Generator:
    """The k-th random stream of the simulation for ``seed``."""
    return np.random.default_rng([seed, _STREAM_TAG, k])


def simulate(num_records: int = DEFAULT_NUM_RECORDS, seed: int = 0) -> Simulation:
    """Simulates every column except the image size fields (see :func:`generate`)."""
    if num_records < MIN_NUM_RECORDS:
        raise ValueError(f"num_records must be at least {MIN_NUM_RECORDS}, got {num_records}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    streams = [stream(seed, k) for k in range(8)]
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
