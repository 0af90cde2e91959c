"""BOLD import: BOLD-style TSV and FASTA files -> a frame with the BIOSCAN-5M schema.

:func:`read` picks the reader by file suffix. Both readers return ``(frame, report)``. The frame has the 23 columns of
:data:`~bioscan_jax.data.schema.COLUMNS` with the dtypes of
:data:`~bioscan_jax.data.schema.COLUMN_DTYPES`:

* ``processid``, ``sampleid``, the ranks ``phylum`` .. ``species``, ``dna_bin`` (BOLD's
  ``bin_uri``), ``dna_barcode`` (BOLD's ``nucleotides``), ``country``, ``province_state`` and
  ``coord-lat`` / ``coord-lon`` come from the file when it has them (names in
  :data:`TSV_COLUMN_ALIASES`); every other column is NA.
* ``dna_barcode`` is normalised by :func:`bioscan_jax.data.dna.normalize_batch` without
  truncation (upper case, U -> T, gaps removed, IUPAC codes -> N), so it holds ACGTN only like
  the BIOSCAN-5M barcodes; ``normalize_barcodes=False`` keeps the file's text (validated anyway).
* ``taxon`` is the name at the lowest rank present; ``inferred_ranks`` is 0 (``uint8`` has no
  NA; nothing is inferred); ``split`` is NA until :func:`assign_species_split` assigns it.
* BOLD's ``sequence_len`` is not used: in BOLD exports it often describes the untrimmed read.

Rows that cannot be used are skipped and counted per reason in the report (``missing_processid``,
``missing_barcode`` -- also barcodes that are only gaps --, ``invalid_barcode``,
``duplicate_processid``, ``other_marker``, ``malformed_header``, ``malformed_line``), with the
first few record ids per reason; ``errors="raise"`` raises a ``ValueError`` naming the first one
instead. Nothing is dropped silently.

FASTA header convention (what :func:`write_fasta` writes and :func:`read_fasta` expects)::

    >PROCESSID|key=value|key=value|...
    >SSJAE238-13|phylum=Arthropoda|class=Insecta|order=Diptera|family=Chironomidae|genus=Ablabesmyia|species=Ablabesmyia aspera|dna_bin=BOLD:AAF3628

The first field is the ``processid``; the others are ``key=value`` pairs in any order, keys being
schema column names or the BOLD names of :data:`TSV_COLUMN_ALIASES` (case-insensitive). Missing
keys are NA; empty values are NA; unknown keys are ignored and counted (``notes``). Values may
hold spaces but not ``|`` or newlines. A header whose fields have no ``=`` at all is read as
BOLD's own FASTA export, ``>processid|identification|marker|accession``: the identification
becomes ``taxon``, and also ``species`` (with ``genus`` = its first word) when it has two or more
words. Sequences may span several lines.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import numpy as np
import pandas as pd

from bioscan_jax.data import dna
from bioscan_jax.data.schema import COLUMN_DTYPES, COLUMNS, RANKS

__all__ = [
    "TSV_COLUMN_ALIASES",
    "ImportReport",
    "read",
    "read_bold_tsv",
    "read_fasta",
    "write_fasta",
    "assign_species_split",
    "split_counts",
]

log = logging.getLogger(__name__)

#: Schema column -> the column names it may have in a BOLD TSV (first match wins). BOLD's
#: classic export uses ``<rank>_name``; newer BOLD exports use the bare rank names.
TSV_COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "processid": ("processid", "process_id"),
    "sampleid": ("sampleid", "sample_id"),
    **{rank: (f"{rank}_name", rank) for rank in RANKS},
    "dna_bin": ("bin_uri", "dna_bin", "bin"),
    "dna_barcode": ("nucleotides", "nuc", "dna_barcode", "sequence"),
    "country": ("country", "country/ocean"),
    "province_state": ("province_state", "province/state"),
    "coord-lat": ("lat", "latitude", "coord-lat"),
    "coord-lon": ("lon", "longitude", "coord-lon"),
}
#: BOLD's marker column; rows of another marker are skipped when ``marker`` is set.
MARKER_COLUMNS = ("markercode", "marker_code", "marker")
DEFAULT_MARKER = "COI-5P"

_FASTA_KEYS: dict[str, str] = {
    alias.lower(): column for column, aliases in TSV_COLUMN_ALIASES.items() for alias in (column, *aliases)
}
_FASTA_WRITE_COLUMNS: tuple[str, ...] = ("sampleid", *RANKS, "dna_bin", "country", "province_state")
_EXAMPLES_PER_REASON = 5

Errors = Literal["skip", "raise"]


@dataclasses.dataclass
class ImportReport:
    """What an import read, kept and skipped (with reasons), and what it changed."""

    source: str
    format: str
    rows_read: int = 0
    rows_mapped: int = 0
    #: reason -> number of rows skipped for it.
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    #: reason -> the first few skipped records (processid or line).
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    #: counted changes that kept the row, e.g. ``barcodes_normalised``, ``unknown_header_keys``.
    notes: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def rows_skipped(self) -> int:
        return sum(self.skipped.values())

    def skip(self, reason: str, records: Iterable[str], count: int | None = None) -> None:
        """Counts ``count`` (default: ``len(records)``) skipped rows; keeps a few as examples."""
        records = list(records)
        count = len(records) if count is None else count
        if count:
            self.skipped[reason] = self.skipped.get(reason, 0) + count
            examples = self.examples.setdefault(reason, [])
            examples.extend(records[: max(0, _EXAMPLES_PER_REASON - len(examples))])

    def note(self, what: str, count: int) -> None:
        if count:
            self.notes[what] = self.notes.get(what, 0) + int(count)

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "rows_skipped": self.rows_skipped}

    def __str__(self) -> str:
        return self.summary()

    def summary(self) -> str:
        parts = [f"{self.source} ({self.format}): read {self.rows_read}, mapped {self.rows_mapped}"]
        if self.skipped:
            parts.append("skipped " + ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())))
        if self.notes:
            parts.append("notes " + ", ".join(f"{n} {what}" for what, n in sorted(self.notes.items())))
        return "; ".join(parts)


# ----------------------------------------------------------------------------- readers


def read(path: str | os.PathLike, **kwargs) -> tuple[pd.DataFrame, ImportReport]:
    """Reads a BOLD TSV (``.tsv``, ``.txt``, ``.tab``) or FASTA (``.fa``, ``.fas``, ``.fasta``,
    ``.fna``) by its suffix; ``kwargs`` go to :func:`read_bold_tsv` or :func:`read_fasta`."""
    suffix = os.fspath(path).lower().rsplit(".", 1)[-1]
    if suffix in ("fa", "fas", "fasta", "fna"):
        return read_fasta(path, **kwargs)
    if suffix in ("tsv", "txt", "tab"):
        return read_bold_tsv(path, **kwargs)
    raise ValueError(f"{path}: unknown BOLD file type {suffix!r}; expected .tsv/.txt or .fa/.fas/.fasta")


def read_bold_tsv(
    path: str | os.PathLike,
    *,
    errors: Errors = "skip",
    normalize_barcodes: bool = True,
    marker: str | None = DEFAULT_MARKER,
) -> tuple[pd.DataFrame, ImportReport]:
    """Reads a BOLD-style TSV (one record per line, a header line, no quoting).

    Needs a processid column and a sequence column (see :data:`TSV_COLUMN_ALIASES`). When the
    file has a marker column, rows of a marker other than ``marker`` are skipped
    (``marker=None`` keeps all). Lines with too many fields are skipped as ``malformed_line``.
    """
    _check_errors(errors)
    source = os.fspath(path)
    report = ImportReport(source=source, format="tsv")
    raw = pd.read_csv(
        path,
        sep="\t",
        dtype=str,
        keep_default_na=False,
        na_values=[""],
        quoting=csv.QUOTE_NONE,
        encoding_errors="replace",
        on_bad_lines="skip",
    )
    raw.columns = [c.strip().lower() for c in raw.columns]
    found = {col: next((a for a in aliases if a in raw.columns), None) for col, aliases in TSV_COLUMN_ALIASES.items()}
    for needed in ("processid", "dna_barcode"):
        if found[needed] is None:
            raise ValueError(
                f"{source}: no {needed} column; expected one of {TSV_COLUMN_ALIASES[needed]}, "
                f"found {list(raw.columns)}"
            )
    lines = _count_data_lines(path)
    if lines > len(raw):  # pandas dropped lines with too many fields
        if errors == "raise":
            raise ValueError(f"{source}: {lines - len(raw)} line(s) have more fields than the header")
        report.skip("malformed_line", ["line(s) with more fields than the header"], count=lines - len(raw))
    report.rows_read = lines
    fields = pd.DataFrame({col: raw[name] for col, name in found.items() if name is not None})
    marker_column = next((c for c in MARKER_COLUMNS if c in raw.columns), None)
    markers = raw[marker_column] if marker_column is not None and marker is not None else None
    line_numbers = np.arange(len(raw)) + 2  # 1-based after the header; shifted after a malformed line
    frame = _to_schema_frame(fields, report, line_numbers, errors, normalize_barcodes, markers=markers, marker=marker)
    return frame, report


def read_fasta(
    path: str | os.PathLike,
    *,
    errors: Errors = "skip",
    normalize_barcodes: bool = True,
) -> tuple[pd.DataFrame, ImportReport]:
    """Reads a FASTA file whose headers follow the convention of the module docstring."""
    _check_errors(errors)
    source = os.fspath(path)
    report = ImportReport(source=source, format="fasta")
    records: list[dict[str, Any]] = []
    header_lines: list[int] = []
    orphan_lines: list[int] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        header, header_line, chunks = None, 0, []
        for number, line in enumerate(f, start=1):
            line = line.strip()
            if line.startswith(">"):
                if header is not None:
                    records.append(_parse_header(header, "".join(chunks), report))
                    header_lines.append(header_line)
                header, header_line, chunks = line[1:], number, []
            elif line:
                if header is None:
                    orphan_lines.append(number)
                else:
                    chunks.append("".join(line.split()))
        if header is not None:
            records.append(_parse_header(header, "".join(chunks), report))
            header_lines.append(header_line)
    if orphan_lines:
        if errors == "raise":
            raise ValueError(f"{source}: line {orphan_lines[0]} holds sequence text before any '>' header")
        report.skip("malformed_line", [f"line {n}" for n in orphan_lines])
    report.rows_read = len(records) + len(orphan_lines)
    malformed = [i for i, r in enumerate(records) if r is None]
    if malformed:
        first = header_lines[malformed[0]]
        if errors == "raise":
            raise ValueError(
                f"{source}: line {first}: malformed FASTA header (mixes key=value fields with plain fields); "
                "expected '>PROCESSID|key=value|...'"
            )
        report.skip("malformed_header", [f"line {header_lines[i]}" for i in malformed])
    keep = [i for i, r in enumerate(records) if r is not None]
    fields = pd.DataFrame.from_records([records[i] for i in keep], columns=list(COLUMNS))
    fields = fields.dropna(axis=1, how="all")
    for needed in ("processid", "dna_barcode"):
        if needed not in fields:
            fields[needed] = pd.Series([None] * len(fields), dtype=object)
    frame = _to_schema_frame(fields, report, np.asarray([header_lines[i] for i in keep], dtype=np.int64), errors, normalize_barcodes)
    return frame, report


def _check_errors(errors: str) -> None:
    if errors not in ("skip", "raise"):
        raise ValueError(f"errors must be 'skip' or 'raise', got {errors!r}")


def _count_data_lines(path: str | os.PathLike) -> int:
    """Non-blank lines after the header (pandas skips blank ones too)."""
    with open(path, "rb") as f:
        next(f, None)
        return sum(1 for line in f if line.strip())


def _parse_header(header: str, sequence: str, report: ImportReport) -> dict[str, Any] | None:
    """One FASTA record as ``{schema column: value}``; ``None`` for a malformed header."""
    fields = [f.strip() for f in header.split("|")]
    record: dict[str, Any] = {"processid": fields[0] or None, "dna_barcode": sequence}
    rest = fields[1:]
    keyed = ["=" in f for f in rest]
    if rest and not any(keyed):  # BOLD's export: processid|identification|marker|accession
        identification = rest[0] or None
        record["taxon"] = identification
        if identification and len(identification.split()) >= 2:
            record["species"] = identification
            record["genus"] = identification.split()[0]
        return record
    if not all(keyed):
        return None
    unknown = 0
    for field in rest:
        key, value = (part.strip() for part in field.split("=", 1))
        column = _FASTA_KEYS.get(key.lower())
        if column is None:
            unknown += 1
        else:
            record[column] = value or None
    report.note("unknown_header_keys", unknown)
    return record


# ----------------------------------------------------------------------------- mapping


def _to_schema_frame(
    fields: pd.DataFrame,
    report: ImportReport,
    line_numbers: np.ndarray,
    errors: Errors,
    normalize_barcodes: bool,
    *,
    markers: pd.Series | None = None,
    marker: str | None = None,
) -> pd.DataFrame:
    """Validates the rows of ``fields`` (schema-named string columns) and builds the frame."""
    fields = fields.reset_index(drop=True).astype(object)
    for column in fields.columns:
        stripped = fields[column].str.strip()
        fields[column] = stripped.where(stripped != "", None)
    n = len(fields)
    processid = fields["processid"]
    keep = np.ones(n, dtype=bool)

    def labels(rows: np.ndarray) -> list[str]:
        return [
            f"{processid.iloc[i]} (line {line_numbers[i]})" if pd.notna(processid.iloc[i]) else f"line {line_numbers[i]}"
            for i in rows.tolist()
        ]

    def drop(reason: str, bad: np.ndarray, detail: str = "") -> None:
        rows = np.flatnonzero(bad & keep)
        if rows.size == 0:
            return
        if errors == "raise":
            raise ValueError(f"{report.source}: record {labels(rows[:1])[0]}: {reason}{detail}")
        report.skip(reason, labels(rows[:_EXAMPLES_PER_REASON]), count=rows.size)
        keep[rows] = False

    drop("missing_processid", processid.isna().to_numpy())
    if markers is not None:
        other = markers.fillna("").str.strip().to_numpy() != marker
        drop("other_marker", other, f" (not {marker})")

    barcodes, barcode_report = dna.normalize_batch(fields["dna_barcode"], max_nucleotides=None, errors="count")
    missing = np.zeros(n, dtype=bool)
    missing[np.asarray(barcode_report["missing"], dtype=np.int64)] = True
    drop("missing_barcode", missing)
    invalid = np.zeros(n, dtype=bool)
    invalid_rows = np.fromiter(barcode_report["invalid"], dtype=np.int64, count=len(barcode_report["invalid"]))
    invalid[invalid_rows] = True
    if (invalid & keep).any():
        first = int(np.flatnonzero(invalid & keep)[0])
        detail = f": invalid characters {barcode_report['invalid'][first]}"
        drop("invalid_barcode", invalid, detail if errors == "raise" else "")
    duplicate = np.zeros(n, dtype=bool)  # among the rows still kept: the first valid copy wins
    duplicate[keep] = processid[keep].duplicated().to_numpy()
    drop("duplicate_processid", duplicate)

    kept = np.flatnonzero(keep)
    out = pd.DataFrame(index=pd.RangeIndex(len(kept)))
    for column in COLUMNS:
        dtype = COLUMN_DTYPES[column]
        if column == "dna_barcode":
            values = np.asarray(barcodes, dtype=object)[kept] if normalize_barcodes else fields[column].to_numpy()[kept]
            out[column] = pd.array(values, dtype=dtype)
        elif column in fields and column != "taxon":
            values = fields[column].to_numpy()[kept]
            if dtype == "float64":
                parsed = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(dtype=np.float64)
                report.note(f"unparsed_{column}", int(np.count_nonzero(np.isnan(parsed) & pd.notna(values))))
                out[column] = parsed
            else:
                out[column] = pd.array(values, dtype=dtype)
        elif column == "inferred_ranks":
            out[column] = np.zeros(len(kept), dtype=np.uint8)
        else:
            out[column] = pd.Series(pd.NA, index=out.index, dtype=dtype) if dtype != "float64" else np.nan
    if normalize_barcodes:
        raw = fields["dna_barcode"].to_numpy()[kept].astype(str)
        report.note("barcodes_normalised", int(np.count_nonzero(raw != out["dna_barcode"].to_numpy(dtype=str))))
    out["taxon"] = _lowest_rank_name(out, fallback=fields["taxon"].to_numpy()[kept] if "taxon" in fields else None)
    out = out.astype(COLUMN_DTYPES)[list(COLUMNS)]
    report.rows_mapped = len(out)
    if report.skipped:
        log.warning("BOLD import: %s", report.summary())
    return out


def _lowest_rank_name(frame: pd.DataFrame, fallback: np.ndarray | None = None) -> pd.Series:
    """The name at the lowest rank present in each row (species, then genus, ...)."""
    taxon = pd.Series(pd.NA, index=frame.index, dtype="string")
    for rank in RANKS:  # top down: each lower rank present overwrites
        taxon = frame[rank].astype("string").fillna(taxon)
    if fallback is not None:
        taxon = taxon.fillna(pd.Series(fallback, index=frame.index, dtype="string"))
    return taxon


def write_fasta(
    frame: pd.DataFrame,
    path: str | os.PathLike,
    *,
    columns: Iterable[str] = _FASTA_WRITE_COLUMNS,
    line_width: int = 80,
) -> int:
    """Writes records as FASTA with ``>processid|key=value|...`` headers; returns the count.

    Only non-NA values are written. Raises ``ValueError`` naming the record when a value holds
    ``|`` or a line break, which the header convention cannot carry.
    """
    columns = [c for c in columns if c in frame.columns]
    with open(path, "w", encoding="utf-8") as f:
        for row in frame[["processid", "dna_barcode", *columns]].itertuples(index=False, name=None):
            processid, barcode, *values = row
            fields = [str(processid)]
            for column, value in zip(columns, values, strict=True):
                if pd.isna(value):
                    continue
                text = str(value)
                if "|" in text or "\n" in text or "\r" in text:
                    raise ValueError(f"record {processid!r}: {column} value {text!r} holds '|' or a line break")
                fields.append(f"{column}={text}")
            f.write(">" + "|".join(fields) + "\n")
            sequence = "" if pd.isna(barcode) else str(barcode)
            for start in range(0, len(sequence), line_width):
                f.write(sequence[start : start + line_width] + "\n")
    return len(frame)


# ----------------------------------------------------------------------------- splits


def assign_species_split(
    frame: pd.DataFrame,
    *,
    unseen_fraction: float = 0.2,
    test_fraction: float = 0.2,
    key_unseen_fraction: float = 0.0,
    seed: int = 0,
) -> pd.DataFrame:
    """A seeded species-level split in BIOSCAN-5M's terms; returns a copy with ``split`` set.

    * Records without ``species`` -> ``pretrain``.
    * ``unseen_fraction`` of the species (whole species, chosen at random) are *unseen*: their
      records go to ``test_unseen`` (queries), except ``key_unseen_fraction`` of each species'
      barcodes which go to ``key_unseen`` (keys); at least one barcode stays a query.
    * The other species are *seen*: ``test_fraction`` of each species' barcodes go to ``test``,
      the rest to ``train``; at least one stays in ``train``, a species with one barcode stays
      whole in ``train``.

    Like BIOSCAN-5M, splitting is at barcode level: records of a species that share a barcode
    share a split. Fractions of a species' barcodes are rounded half up. Species are drawn
    from their sorted names and barcodes from their sorted values, so the result depends only
    on the records and the seed, not on row order.
    """
    for name, value in (("unseen_fraction", unseen_fraction), ("test_fraction", test_fraction),
                        ("key_unseen_fraction", key_unseen_fraction)):  # fmt: skip
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    out = frame.copy()
    split = np.full(len(out), "pretrain", dtype=object)
    has_species = out["species"].notna().to_numpy()
    rng = np.random.default_rng(seed)

    units = pd.DataFrame(
        {
            "species": out.loc[has_species, "species"].astype(str).to_numpy(),
            "barcode": out.loc[has_species, "dna_barcode"].fillna("").astype(str).to_numpy(),
        }
    )
    codes = units.groupby(["species", "barcode"], sort=True).ngroup().to_numpy()
    unique_units = units.drop_duplicates().sort_values(["species", "barcode"], ignore_index=True)
    unit_species = unique_units["species"].to_numpy()
    species_names = np.unique(unit_species)
    n_unseen = int(np.floor(unseen_fraction * len(species_names) + 0.5))
    unseen = np.zeros(len(species_names), dtype=bool)
    unseen[rng.permutation(len(species_names))[:n_unseen]] = True
    species_id = np.searchsorted(species_names, unit_species)

    priority = pd.Series(rng.random(len(unique_units)))
    grouped = priority.groupby(species_id)
    rank = grouped.rank(method="first").to_numpy() - 1
    size = grouped.transform("size").to_numpy()
    n_test = np.minimum(np.floor(test_fraction * size + 0.5), size - 1)
    n_key = np.minimum(np.floor(key_unseen_fraction * size + 0.5), size - 1)
    unit_split = np.where(
        unseen[species_id],
        np.where(rank < n_key, "key_unseen", "test_unseen"),
        np.where(rank < n_test, "test", "train"),
    )
    split[has_species] = unit_split[codes]
    out["split"] = pd.array(split, dtype=COLUMN_DTYPES["split"])
    return out


def split_counts(frame: pd.DataFrame) -> Mapping[str, tuple[int, int]]:
    """``{split: (records, species)}`` of a frame, for logs and tests."""
    grouped = frame.groupby("split", dropna=False)
    return {str(k): (int(len(g)), int(g["species"].nunique())) for k, g in grouped}
