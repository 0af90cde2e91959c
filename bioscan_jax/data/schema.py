"""BIOSCAN-5M schema: the one source of truth for columns, ranks, splits and paths.

Every other module (TFDS builder, pipelines, synthetic generator, trainers) imports
these names instead of spelling them again.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

# ----------------------------------------------------------------------------- columns

#: The 23 metadata columns, in the order of the official CSV, with their pandas dtypes.
#: Category columns are read as strings (``object``) so that label maps are built once,
#: explicitly, over the whole CSV (see :func:`label_maps`).
COLUMN_DTYPES: dict[str, str] = {
    "processid": "string",
    "sampleid": "string",
    "taxon": "string",
    "phylum": "string",
    "class": "string",
    "order": "string",
    "family": "string",
    "subfamily": "string",
    "genus": "string",
    "species": "string",
    "dna_bin": "string",
    "dna_barcode": "string",
    "country": "string",
    "province_state": "string",
    "coord-lat": "float64",
    "coord-lon": "float64",
    "image_measurement_value": "float64",  # documented int, but has NaN
    "area_fraction": "float64",
    "scale_factor": "float64",
    "inferred_ranks": "uint8",
    "split": "string",
    "index_bioscan_1M_insect": "Int64",  # nullable int
    "chunk": "string",  # "00" must keep its leading zero
}
COLUMNS: tuple[str, ...] = tuple(COLUMN_DTYPES)

#: Taxonomic ranks, from the top down.
RANKS: tuple[str, ...] = ("phylum", "class", "order", "family", "subfamily", "genus", "species")
#: Columns that carry a label with an integer index: the ranks and the Barcode Index Number.
LABEL_COLUMNS: tuple[str, ...] = RANKS + ("dna_bin",)
#: The ranks that CLIBD evaluates and that make up the taxonomy text.
EVAL_RANKS: tuple[str, ...] = ("order", "family", "genus", "species")
#: Index of a missing label.
MISSING_INDEX = -1

# ----------------------------------------------------------------------------- splits

SPLITS: tuple[str, ...] = (
    "pretrain",
    "train",
    "val",
    "test",
    "key_unseen",
    "val_unseen",
    "test_unseen",
    "other_heldout",
)
SEEN_SPLITS: tuple[str, ...] = ("train", "val", "test")
UNSEEN_SPLITS: tuple[str, ...] = ("key_unseen", "val_unseen", "test_unseen")
METASPLITS: dict[str, tuple[str, ...]] = {
    "all": SPLITS,
    "seen": SEEN_SPLITS,
    "unseen": UNSEEN_SPLITS,
}
SPLIT_ALIASES: dict[str, str] = {"validation": "val"}

#: Record counts of the official release (used for documentation and sanity checks only).
OFFICIAL_SPLIT_SIZES: dict[str, int] = {
    "pretrain": 4_677_756,
    "train": 289_203,
    "val": 14_757,
    "test": 39_373,
    "key_unseen": 36_465,
    "val_unseen": 8_819,
    "test_unseen": 7_887,
    "other_heldout": 76_590,
}
OFFICIAL_NUM_RECORDS = 5_150_850


def resolve_split(name: str) -> tuple[str, ...]:
    """Expands a split expression into canonical split names, in :data:`SPLITS` order.

    Accepts a split, a metasplit (``all``, ``seen``, ``unseen``), the alias ``validation``,
    and ``a+b`` joins of any of these. Raises ``ValueError`` listing the valid names.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"Split must be a non-empty string, got {name!r}. {_valid_split_names()}")
    wanted: set[str] = set()
    for part in (p.strip() for p in name.split("+")):
        part = SPLIT_ALIASES.get(part, part)
        if part in METASPLITS:
            wanted.update(METASPLITS[part])
        elif part in SPLITS:
            wanted.add(part)
        else:
            raise ValueError(f"Unknown split {part!r} in {name!r}. {_valid_split_names()}")
    return tuple(s for s in SPLITS if s in wanted)


def _valid_split_names() -> str:
    names = list(SPLITS) + list(METASPLITS) + list(SPLIT_ALIASES)
    return "Valid names: " + ", ".join(names) + " (join several with '+')."


# ----------------------------------------------------------------------------- images

IMAGE_PACKAGES: tuple[str, ...] = ("cropped_256", "original_256", "cropped", "original_full")
DEFAULT_IMAGE_PACKAGE = "cropped_256"

#: Number of hex characters of md5(processid) that name the chunk directory, per split.
CHUNK_HEX_CHARS: dict[str, int] = {"pretrain": 2, "train": 1, "other_heldout": 1}

#: Per-channel RGB statistics of BIOSCAN-5M images (0..1 scale).
RGB_MEAN: tuple[float, float, float] = (0.76281859, 0.76503749, 0.76373138)
RGB_STD: tuple[float, float, float] = (0.14205404, 0.15642502, 0.17309470)

METADATA_RELPATH = "bioscan5m/metadata/csv/BIOSCAN_5M_Insect_Dataset_metadata.csv"
METADATA_MD5 = "603020b433ef566946efba7a08dbb23d"
IMAGES_RELDIR = "bioscan5m/images"

#: DNA barcodes are truncated to this many nucleotides (COI-5P is ~658 bp).
MAX_NUCLEOTIDES = 660


def chunk_for(processid: str, split: str) -> str:
    """The chunk directory of an image: leading hex chars of md5(processid), or '' if none."""
    n = CHUNK_HEX_CHARS.get(split, 0)
    if n == 0:
        return ""
    return hashlib.md5(processid.encode("utf-8")).hexdigest()[:n]


def image_relpath(package: str, split: str, chunk: str | None, processid: str) -> str:
    """Path of an image relative to the dataset root (the folder holding ``bioscan5m/``)."""
    if package not in IMAGE_PACKAGES:
        raise ValueError(f"Unknown image package {package!r}; valid: {', '.join(IMAGE_PACKAGES)}")
    parts = [IMAGES_RELDIR, package, split]
    if not pd.isna(chunk) and chunk != "":
        parts.append(str(chunk))
    parts.append(f"{processid}.jpg")
    return "/".join(parts)


# ----------------------------------------------------------------------------- metadata


def read_metadata(path: str | os.PathLike, *, split: str | None = None, **read_csv_kwargs) -> pd.DataFrame:
    """Reads the metadata CSV with the official dtypes; optionally keeps one split expression.

    Raises ``ValueError`` naming the file when a column is missing, or when a ``split``
    value is not one of :data:`SPLITS`.
    """
    header = pd.read_csv(path, nrows=0).columns.tolist()
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise ValueError(f"{path}: metadata CSV is missing column(s) {missing}; expected {list(COLUMNS)}")
    dtypes = {c: COLUMN_DTYPES[c] for c in header if c in COLUMN_DTYPES}
    # pandas' default NA strings ("", "NA", "N/A", "nan", "null", ...) are missing, as
    # bioscan-dataset's load_bioscan5m_metadata reads the file; 'chunk' stays a string ("00").
    df = pd.read_csv(path, dtype=dtypes, **read_csv_kwargs)
    bad = ~df["split"].isin(SPLITS)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise ValueError(
            f"{path}: record {df['processid'].iloc[row]!r} (row {row}) has unknown split "
            f"{df['split'].iloc[row]!r}. {_valid_split_names()}"
        )
    if split is not None:
        df = df[df["split"].isin(resolve_split(split))].reset_index(drop=True)
    return df


#: Record field (a TFDS feature, not a CSV column) flagging the rows :func:`first_of_barcode` keeps.
FIRST_OF_BARCODE = "first_of_barcode"


def first_of_barcode(barcodes: pd.Series | Sequence[Any]) -> np.ndarray:
    """True for the first row of each barcode after ``rstrip("N")``, in row order.

    BarcodeBERT's evaluation data (``data/data_split.py::split_df``, BIOSCAN-5M branch) strips
    trailing N from ``dna_barcode`` and calls ``drop_duplicates(subset=["nucleotides"])`` (first row
    kept) over the *whole* metadata before it forms the pretraining, fine-tuning, test and 1-NN sets.
    The barcode is taken as written (no truncation, case kept); missing barcodes are all one value,
    as pandas treats NaN, so only the first of them is kept.

    Each stripped barcode is reduced to its 128-bit BLAKE2b digest (a collision among BIOSCAN-5M's
    2.5M distinct barcodes has a probability of about 1e-26) and the first row of each digest is
    kept: memory is 16 bytes per row, where the pandas string operations held two or three copies
    of every barcode (4 KB per row, 20 GB at 5.15M rows, in the TFDS build of the ``dna`` config).
    """
    n = len(barcodes)
    digests = bytearray(16 * n)
    i = 0
    for start in range(0, n, _DIGEST_CHUNK):  # Arrow-backed strings become Python strings a chunk at a time
        part = barcodes.iloc[start:start + _DIGEST_CHUNK].tolist() if isinstance(barcodes, pd.Series) \
            else barcodes[start:start + _DIGEST_CHUNK]
        for value in part:
            text = "" if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)) else str(value)
            digests[16 * i:16 * i + 16] = hashlib.blake2b(text.rstrip("N").encode("utf-8"), digest_size=16).digest()
            i += 1
    keys = np.frombuffer(bytes(digests), dtype=[("high", ">u8"), ("low", ">u8")])
    _, first = np.unique(keys, return_index=True)  # a stable sort: the first row of each digest
    keep = np.zeros(n, dtype=bool)
    keep[first] = True
    return keep


#: Barcodes :func:`first_of_barcode` turns into Python strings at once.
_DIGEST_CHUNK = 65_536


def label_maps(df: pd.DataFrame, columns: Sequence[str] = LABEL_COLUMNS) -> dict[str, list[str]]:
    """Label names per column, in lexical order, over the rows given (use the whole CSV)."""
    return {c: sorted(df[c].dropna().unique().tolist()) for c in columns}


def label_indices(
    df: pd.DataFrame, maps: Mapping[str, Sequence[str]], columns: Iterable[str] | None = None
) -> dict[str, np.ndarray]:
    """Integer index per row and column (``int32``; missing = -1) using ``maps``.

    A label absent from its map raises ``ValueError`` naming the record.
    """
    out = {}
    for c in columns if columns is not None else maps.keys():
        names = pd.Index(maps[c])
        values = df[c]
        idx = names.get_indexer(values.fillna("\x00"))  # NA -> not found -> -1
        unknown = (idx < 0) & values.notna().to_numpy()
        if unknown.any():
            row = int(np.flatnonzero(unknown)[0])
            raise ValueError(
                f"record {df['processid'].iloc[row]!r}: {c} label {values.iloc[row]!r} is not in the label map"
            )
        out[c] = idx.astype(np.int32)
    return out


def taxonomy_text(df: pd.DataFrame, ranks: Sequence[str] = EVAL_RANKS, missing: str = "not_classified") -> list[str]:
    """CLIBD's taxonomy string, "order family genus species", with ``missing`` for empty ranks."""
    cols = [df[r].fillna(missing).astype(str) for r in ranks]
    return [" ".join(t) for t in zip(*cols, strict=True)]
