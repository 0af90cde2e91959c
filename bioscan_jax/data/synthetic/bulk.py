"""A BIOSCAN-5M-sized metadata CSV, fast: vectorised numpy, no images, no phylogeny.

The default synthetic generator (:mod:`bioscan_jax.data.synthetic.specimens`) simulates
evolution and draws images: right for thousands of records, far too slow for millions. This
one writes the official metadata CSV at the real size (5,150,850 rows by default) in minutes, for
benchmarks of the data and evaluation path at scale (``benchmarks/scale_benchmark.py``)::

    python -m bioscan_jax.data.synthetic --fast --out DIR [--records N] [--seed S]

What it keeps of the real release (DESIGN.md §5), scaled by ``rows / 5,150,850``:

* the 23 columns of :data:`schema.COLUMNS`, in order, with their types and empty cells for
  missing values; the ``chunk`` of each split (md5 of the processid) with its leading zeros;
* the split sizes (:data:`schema.OFFICIAL_SPLIT_SIZES`; pretrain takes the rounding);
* the fraction of distinct barcodes (2,486,492 of 5,150,850), distinct also after
  ``rstrip('N')``, each barcode in one split only (splits are assigned per barcode); a few
  barcodes are repeated many times (a skewed repeat count), most once or twice;
* barcodes of 500-660 nt (658 for most) over ACGT, each a species consensus with a few
  substitutions, some with internal N and some with a trailing N run;
* per split, the real number of species (train 11,846 seen species, unseen species in
  key/val/test_unseen, other_heldout's own), unseen species with placeholder names in seen
  genera, and the real number of taxa per rank over the whole CSV (class 10 ... species 22,622,
  BINs 324,411) where the size allows;
* missing labels where the real data has them: pretrain records are unlabelled at species and
  mostly below order; some genera have no subfamily; a few BINs are missing.

The CSV's row order is a random permutation (splits interleaved). Output is a pure function of
``(rows, seed, unique_barcodes)``. Memory: the distinct barcodes as one uint8 matrix (660 bytes
each: 1.6 GB at the full size) plus a few bytes of numbers per row; rows are written in chunks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping

import numpy as np
import pandas as pd

from bioscan_jax.data import schema

#: Distinct barcodes of the real release.
REAL_UNIQUE_BARCODES = 2_486_492
#: Species per labelled split (DESIGN.md §5).
REAL_SPLIT_SPECIES: dict[str, int] = {
    "train": 11_846, "val": 3_378, "test": 3_483, "key_unseen": 914, "val_unseen": 903, "test_unseen": 880,
    "other_heldout": 9_862,
}
#: Taxa per rank over the whole CSV.
REAL_RANK_COUNTS: dict[str, int] = {"class": 10, "order": 55, "family": 934, "subfamily": 1_542, "genus": 7_605,
                                    "species": 22_622}
REAL_BINS = 324_411
#: Smallest size honoured: every split needs records, and the evaluation splits a few species.
MIN_ROWS = 2_000
WIDTH = schema.MAX_NUCLEOTIDES
#: Leading positions that spell the barcode's (permuted) index in base 4 (4**12 > 16 M): distinct barcodes.
TAG = 12
#: Pretrain records: the lowest labelled rank (index into RANK_ORDER) and its probability.
PRETRAIN_DEPTH = {1: 0.005, 2: 0.445, 3: 0.35, 4: 0.10, 5: 0.10}
RANK_ORDER = ("phylum", "class", "order", "family", "subfamily", "genus", "species")
_CODES = np.frombuffer(b"ACGTN", np.uint8)


@dataclasses.dataclass(frozen=True)
class BulkSpec:
    """The sizes a CSV of ``rows`` records gets (:func:`plan`)."""

    rows: int
    unique_barcodes: int
    split_rows: dict[str, int]
    split_barcodes: dict[str, int]
    split_species: dict[str, int]
    rank_counts: dict[str, int]
    bins: int
    seed: int = 0


def _scaled(real: Mapping[str, int], total: int, fix: str) -> dict[str, int]:
    """``real`` scaled to sum to ``total`` (every entry >= 1; ``fix`` takes the rounding)."""
    real_total = sum(real.values())
    out = {k: max(1, round(v * total / real_total)) for k, v in real.items()}
    out[fix] += total - sum(out.values())
    return out


def plan(rows: int = schema.OFFICIAL_NUM_RECORDS, *, unique_barcodes: int | None = None, seed: int = 0) -> BulkSpec:
    """The sizes of a CSV of ``rows`` records; ``ValueError`` (one line) for a size it cannot honour."""
    if rows < MIN_ROWS:
        raise ValueError(f"{rows} rows: the bulk generator needs at least {MIN_ROWS} (every split a few species)")
    if unique_barcodes is None:
        unique_barcodes = round(rows * REAL_UNIQUE_BARCODES / schema.OFFICIAL_NUM_RECORDS)
    if unique_barcodes > rows:
        raise ValueError(f"{unique_barcodes} distinct barcodes is more than the {rows} records: every distinct "
                         f"barcode needs a record")
    if unique_barcodes > 4**TAG:
        raise ValueError(f"{unique_barcodes} distinct barcodes: the bulk generator writes at most {4**TAG}")
    split_rows = _scaled(schema.OFFICIAL_SPLIT_SIZES, rows, "pretrain")
    if unique_barcodes < len(split_rows):
        raise ValueError(f"{unique_barcodes} distinct barcodes: every one of the {len(split_rows)} splits needs one")
    barcodes = {s: min(n, max(1, round(n * unique_barcodes / rows))) for s, n in split_rows.items()}
    barcodes["pretrain"] += unique_barcodes - sum(barcodes.values())
    if not 1 <= barcodes["pretrain"] <= split_rows["pretrain"]:
        raise ValueError(f"{unique_barcodes} distinct barcodes cannot be split over the {rows} records by split size")
    f = rows / schema.OFFICIAL_NUM_RECORDS
    species = {s: min(barcodes[s], max(1, round(k * f))) for s, k in REAL_SPLIT_SPECIES.items()}
    species["val"] = min(species["val"], species["train"])
    species["test"] = min(species["test"], species["train"])
    for s in ("val_unseen", "test_unseen"):
        species[s] = min(species[s], species["key_unseen"])
    total_species = species["train"] + species["key_unseen"] + species["other_heldout"]
    counts = {r: max(min(k, 2), round(k * total_species / REAL_RANK_COUNTS["species"])) for r, k in REAL_RANK_COUNTS.items()}
    counts["species"] = total_species
    counts["genus"] = min(counts["genus"], species["train"])  # every genus has a seen species
    for upper, lower in (("subfamily", "genus"), ("family", "subfamily"), ("order", "family"), ("class", "order")):
        counts[upper] = min(counts[upper], counts[lower])
    bins = min(unique_barcodes, max(total_species, round(REAL_BINS * f)))
    return BulkSpec(rows, unique_barcodes, split_rows, barcodes, species, counts, bins, seed)


# ============================================================================= taxonomy


@dataclasses.dataclass
class Taxonomy:
    """The tree as index arrays (child -> parent; ``genus_subfamily`` -1: the genus has none),
    the names of every rank, and the species pools (seen, unseen, held-out)."""

    species_genus: np.ndarray
    genus_subfamily: np.ndarray
    genus_family: np.ndarray
    family_order: np.ndarray
    order_class: np.ndarray
    names: dict[str, np.ndarray]  # rank -> object array of names
    pools: dict[str, np.ndarray]  # 'seen' | 'unseen' | 'heldout' -> species ids


def _cover(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` draws from ``range(k)`` with every value at least once (``n >= k``), shuffled; the
    extra draws are skewed towards low values (a few taxa or barcodes get many)."""
    extra = (k * rng.random(n - k) ** 3).astype(np.int64)
    out = np.concatenate([np.arange(k), extra])
    rng.shuffle(out)
    return out


def _names(prefix: str, n: int, suffix: str = "") -> np.ndarray:
    return np.array([f"{prefix}{i:05d}{suffix}" for i in range(n)], dtype=object)


def build_taxonomy(spec: BulkSpec, rng: np.random.Generator) -> Taxonomy:
    """A random tree with :attr:`BulkSpec.rank_counts` taxa per rank; unseen species in genera
    of seen species, with placeholder names ("Genus00012 sp. BIOUG01234")."""
    c = spec.rank_counts
    seen, unseen = spec.split_species["train"], spec.split_species["key_unseen"]
    heldout = spec.split_species["other_heldout"]
    subfamily_family = _cover(c["subfamily"], c["family"], rng)
    genus_subfamily = _cover(c["genus"], c["subfamily"], rng)
    seen_genus = _cover(seen, c["genus"], rng)
    species_genus = np.concatenate([seen_genus, seen_genus[rng.integers(0, seen, unseen)],
                                    rng.integers(0, c["genus"], heldout)])
    genus_names = _names("Genus", c["genus"])
    placeholder = (np.arange(species_genus.size) >= seen) & (np.arange(species_genus.size) < seen + unseen)
    species_names = np.array([f"{genus_names[g]} {'sp. BIOUG' if p else 'species'}{i:05d}"
                              for i, (g, p) in enumerate(zip(species_genus, placeholder))], dtype=object)
    names = {"class": _names("Class", c["class"]), "order": _names("Order", c["order"]),
             "family": _names("Family", c["family"], "idae"), "subfamily": _names("Subfamily", c["subfamily"], "inae"),
             "genus": genus_names, "species": species_names}
    pools = {"seen": np.arange(seen), "unseen": np.arange(seen, seen + unseen),
             "heldout": np.arange(seen + unseen, seen + unseen + heldout)}
    return Taxonomy(species_genus=species_genus,
                    genus_subfamily=np.where(rng.random(c["genus"]) < 0.4, genus_subfamily, -1),
                    genus_family=subfamily_family[genus_subfamily], family_order=_cover(c["family"], c["order"], rng),
                    order_class=_cover(c["order"], c["class"], rng), names=names, pools=pools)


# ============================================================================= barcodes and records


#: The species pool of each split (pretrain: every species, unlabelled below order mostly).
SPLIT_POOLS = {"train": "seen", "val": "seen", "test": "seen", "key_unseen": "unseen", "val_unseen": "unseen",
               "test_unseen": "unseen", "other_heldout": "heldout"}


def assign_records(spec: BulkSpec, tax: Taxonomy, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per record (in CSV order): split code, barcode index, species; per barcode: species."""
    all_species = np.concatenate(list(tax.pools.values()))
    split_code, barcode, barcode_species = [], [], []
    first_barcode = 0
    for code, split in enumerate(schema.SPLITS):
        n, u = spec.split_rows[split], spec.split_barcodes[split]
        if split == "pretrain":
            species = all_species[rng.integers(0, all_species.size, u)]
        else:
            pool = tax.pools[SPLIT_POOLS[split]]
            chosen = rng.choice(pool, size=spec.split_species[split], replace=False)
            species = chosen[_cover(u, chosen.size, rng)]
        barcode_species.append(species)
        barcode.append(first_barcode + _cover(n, u, rng))
        split_code.append(np.full(n, code, np.int8))
        first_barcode += u
    perm = rng.permutation(spec.rows)
    barcode_of_row = np.concatenate(barcode)[perm].astype(np.int64)
    bspecies = np.concatenate(barcode_species)
    return {"split": np.concatenate(split_code)[perm], "barcode": barcode_of_row,
            "barcode_species": bspecies, "species": bspecies[barcode_of_row]}


def barcode_matrix(spec: BulkSpec, barcode_species: np.ndarray, rng: np.random.Generator,
                   chunk: int = 200_000) -> tuple[np.ndarray, np.ndarray]:
    """``(codes [U, WIDTH] uint8 into b'ACGTN', lengths [U])``: each barcode its species'
    consensus with a few substitutions, its index spelt in the first :data:`TAG` positions."""
    n_species = int(barcode_species.max()) + 1
    consensus = rng.integers(0, 4, (n_species, WIDTH), dtype=np.uint8)
    u = barcode_species.size
    codes = np.empty((u, WIDTH), np.uint8)
    lengths = np.where(rng.random(u) < 0.8, 658, rng.integers(500, WIDTH + 1, u)).astype(np.int64)
    # an odd multiplier permutes range(4**TAG): distinct tags that do not all start with 'AAAA'
    tags = (np.arange(u, dtype=np.int64) * 0x9E3779B1 + 0x7F4A7C15) % 4**TAG
    digits = (tags[:, None] // 4 ** np.arange(TAG - 1, -1, -1)) % 4
    for start in range(0, u, chunk):
        part = slice(start, min(start + chunk, u))
        block = consensus[barcode_species[part]]
        rows = np.arange(block.shape[0])[:, None]
        block[rows, rng.integers(TAG, WIDTH, (block.shape[0], 8))] = rng.integers(0, 4, (block.shape[0], 8))
        with_n = rng.random(block.shape[0]) < 0.02  # a few internal N
        block[np.flatnonzero(with_n), rng.integers(TAG, 500, int(with_n.sum()))] = 4
        block[:, :TAG] = digits[part]
        codes[part] = block
    trailing = rng.random(u) < 0.03  # a trailing N run (stripped by rstrip('N'))
    runs = rng.integers(1, 30, u)
    for i in np.flatnonzero(trailing):
        codes[i, lengths[i] - runs[i]:lengths[i]] = 4
    return codes, lengths


def barcode_bins(spec: BulkSpec, barcode_species: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The BIN of every barcode (``-1``: none, about 0.5%), BINs nested in species."""
    n_species = int(barcode_species.max()) + 1
    bin_species = _cover(max(spec.bins, n_species), n_species, rng)
    order = np.argsort(bin_species, kind="stable")
    counts = np.bincount(bin_species, minlength=n_species)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    s = barcode_species
    picked = order[start[s] + (rng.random(s.size) * counts[s]).astype(np.int64)]
    return np.where(rng.random(s.size) < 0.005, -1, picked)


def _labels(tax: Taxonomy, species: np.ndarray, split: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Label indices per rank (``-1`` missing) of records of ``species`` in ``split`` (codes)."""
    genus = tax.species_genus[species]
    family = tax.genus_family[genus]
    order = tax.family_order[family]
    idx = {"class": tax.order_class[order], "order": order, "family": family,
           "subfamily": tax.genus_subfamily[genus], "genus": genus, "species": species}
    depth = np.full(species.size, RANK_ORDER.index("species"))
    pretrain = split == schema.SPLITS.index("pretrain")
    levels, probs = zip(*PRETRAIN_DEPTH.items())
    depth[pretrain] = rng.choice(levels, size=int(pretrain.sum()), p=probs)
    return {r: np.where(depth >= RANK_ORDER.index(r), v, -1) for r, v in idx.items()}


def _texts(names: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return np.where(idx >= 0, names[np.maximum(idx, 0)], "")


def _barcode_texts(codes: np.ndarray, lengths: np.ndarray) -> list[str]:
    raw = _CODES[codes]
    raw[np.arange(WIDTH)[None, :] >= lengths[:, None]] = 0  # the 'S' view drops trailing NULs
    return [b.decode("ascii") for b in raw.view(f"S{WIDTH}").ravel().tolist()]


_COUNTRIES = np.array(["Canada", "Costa Rica", "South Africa", "Pakistan", "Thailand", "United States", "Australia",
                       "Germany", "Kenya", "Brazil"], dtype=object)
_COUNTRY_P = np.array([0.45, 0.2, 0.08, 0.07, 0.05, 0.05, 0.04, 0.03, 0.02, 0.01])


def _other_columns(rows: np.ndarray, split_names: np.ndarray, rng: np.random.Generator) -> dict[str, object]:
    """processid, sampleid, geography, image sizes, index_bioscan_1M_insect and chunk of ``rows``."""
    n = rows.size
    pid = [f"BIOUG{10_000_000 + r}-{'ABCDEFGH'[r % 8]}{r // 8 % 12 + 1:02d}" for r in rows.tolist()]
    country = _COUNTRIES[rng.choice(_COUNTRIES.size, n, p=_COUNTRY_P)]
    province = np.array([f"{c} region {k}" for c, k in zip(country, rng.integers(1, 6, n))], dtype=object)
    missing = rng.random(n) < 0.02
    lat = np.round(rng.uniform(-35, 60, n), 4)
    lat[rng.random(n) < 0.01] = np.nan
    lon = np.round(rng.uniform(-120, 100, n), 4)
    lon[np.isnan(lat)] = np.nan
    size = np.round(np.exp(rng.normal(9, 1, n)))
    size[rng.random(n) < 0.03] = np.nan
    in_1m = rng.random(n) < 0.22
    index_1m = pd.array(np.where(in_1m, rows, 0), dtype="Int64")
    index_1m[~in_1m] = pd.NA
    width = [schema.CHUNK_HEX_CHARS.get(s, 0) for s in split_names.tolist()]
    chunk = [hashlib.md5(p.encode()).hexdigest()[:w] if w else "" for p, w in zip(pid, width)]
    return {"processid": pid, "sampleid": [p.replace("BIOUG", "BIOUG-S", 1) for p in pid],
            "country": np.where(missing, "", country), "province_state": np.where(missing, "", province),
            "coord-lat": lat, "coord-lon": lon, "image_measurement_value": size,
            "area_fraction": np.round(rng.uniform(0.02, 0.95, n), 4), "scale_factor": np.round(rng.uniform(0.2, 4, n), 4),
            "index_bioscan_1M_insect": index_1m, "chunk": chunk}


def _frame(start: int, stop: int, data: Mapping[str, np.ndarray], tax: Taxonomy, codes: np.ndarray,
           lengths: np.ndarray, bins: np.ndarray, seed: int) -> pd.DataFrame:
    """Rows ``start:stop`` of the CSV (their randomness seeded by ``(seed, start)``)."""
    rng = np.random.default_rng([seed, start])
    rows = np.arange(start, stop)
    split = data["split"][start:stop]
    labels = _labels(tax, data["species"][start:stop], split, rng)
    names = {r: _texts(tax.names[r], labels[r]) for r in labels}
    taxon = names["class"].copy()
    for rank in ("order", "family", "subfamily", "genus", "species"):
        taxon = np.where(labels[rank] >= 0, names[rank], taxon)
    barcode = data["barcode"][start:stop]
    split_names = np.array(schema.SPLITS, dtype=object)[split]
    b = bins[barcode]
    cols = {"taxon": np.where(taxon == "", "Arthropoda", taxon), "phylum": np.full(rows.size, "Arthropoda", object),
            **names, "dna_bin": np.where(b >= 0, np.char.add("BOLD:A", np.char.zfill(np.maximum(b, 0).astype(str), 7)), ""),
            "dna_barcode": _barcode_texts(codes[barcode], lengths[barcode]),
            "inferred_ranks": sum((labels[r] >= 0).astype(np.uint8) for r in RANK_ORDER[1:]),
            "split": split_names, **_other_columns(rows, split_names, rng)}
    return pd.DataFrame({c: cols[c] for c in schema.COLUMNS})


def write_metadata(out_dir: str | os.PathLike, spec: BulkSpec, *, chunk_rows: int = 100_000) -> str:
    """Write ``<out_dir>/bioscan5m/metadata/csv/BIOSCAN_5M_Insect_Dataset_metadata.csv`` of
    ``spec`` (:func:`plan`); returns its path."""
    rng = np.random.default_rng(spec.seed)
    tax = build_taxonomy(spec, rng)
    data = assign_records(spec, tax, rng)
    codes, lengths = barcode_matrix(spec, data["barcode_species"], rng)
    bins = barcode_bins(spec, data["barcode_species"], rng)
    path = os.path.join(os.fspath(out_dir), schema.METADATA_RELPATH)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".part", "w", newline="") as f:
        for start in range(0, spec.rows, chunk_rows):
            frame = _frame(start, min(start + chunk_rows, spec.rows), data, tax, codes, lengths, bins, spec.seed)
            frame.to_csv(f, header=start == 0, index=False)
    os.replace(path + ".part", path)
    return path
