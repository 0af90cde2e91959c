"""BOLD import: BOLD-style TSV and FASTA files -> a frame with the BIOSCAN-5M schema.

:func:`read` picks the reader by file suffix (``.gz`` files are read compressed). Both readers
return ``(frame, report)``. The frame has the 23 columns of
:data:`~bioscan_jax.data.schema.COLUMNS` with the dtypes of
:data:`~bioscan_jax.data.schema.COLUMN_DTYPES`:

* ``processid``, ``sampleid``, the ranks ``phylum`` .. ``species``, ``dna_bin`` (BOLD's
  ``bin_uri``), ``dna_barcode`` (BOLD's ``nucleotides``), ``country``, ``province_state``,
  ``coord-lat`` / ``coord-lon`` and the size columns ``image_measurement_value``,
  ``area_fraction``, ``scale_factor`` come from the file when it has them (names in
  :data:`TSV_COLUMN_ALIASES`); every other column is NA.
* ``dna_barcode`` is normalised by :func:`bioscan_jax.data.dna.normalize_batch` without
  truncation (upper case, U -> T, gaps removed, IUPAC codes -> N), so it holds ACGTN only like
  the BIOSCAN-5M barcodes; ``normalize_barcodes=False`` keeps the file's text (validated anyway).
* ``taxon`` is the name at the lowest rank present; ``inferred_ranks`` is 0 (``uint8`` has no
  NA; nothing is inferred); ``split`` is NA until :func:`assign_species_split` assigns it.
* BOLD's ``sequence_len`` is not used: in BOLD exports it often describes the untrimmed read.

Rows that cannot be used are skipped and counted per reason in the report (``missing_processid``,
``missing_barcode`` -- also barcodes that are only gaps --, ``invalid_barcode``, ``too_short``,
``too_few_acgt``, ``duplicate_processid``, ``other_marker``, ``malformed_header``,
``malformed_line``), with the first few record ids per reason; ``errors="raise"`` raises a
``ValueError`` naming the first one instead. Nothing is dropped silently.

Barcode length (after normalisation; see :func:`read_bold_tsv`): ``min_length`` (off by default;
the training import :func:`bioscan_jax.data.sources.open_splits` uses :data:`MIN_LENGTH`, 200 nt)
skips shorter barcodes as ``too_short``; a barcode with fewer ACGT letters than ``min_length``
(at least 1: an all-N barcode never passes) is skipped as ``too_few_acgt``. Long barcodes are
kept whole: with ``max_length`` (the training import passes ``config.data.max_nucleotides``,
660) those longer are counted as the note ``longer_than_<max_length>``, since the tokenizer
will cut them there.

Values kept with the row but changed are counted as *notes*, with the first few records or
lines in ``examples``: ``barcodes_normalised``, ``unknown_header_keys``, ``unparsed_<column>``
(a number that does not parse -> NA), ``out_of_range_<column>`` (outside
:data:`VALUE_RANGES` or not finite -> NA), ``longer_than_<n>``, ``non_utf8_lines`` (bytes that
are not UTF-8, read as U+FFFD) and, in a TSV, ``stray_quote_lines`` (a ``"`` is text: BOLD
TSVs have no quoting, so a quote never joins lines; such lines are listed to check).

Files that cannot be imported at all raise a one-line ``ValueError`` naming the file when they
are read: an empty file or one without records, gzip bytes under a name without ``.gz``, a TSV
without a processid / barcode column (or without a column of ``require``), a FASTA file whose
headers carry no taxonomy, or a file none of whose records is usable.

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

import contextlib
import csv
import dataclasses
import gzip
import logging
import os
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, BinaryIO, Literal

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
    "check_species_split",
    "min_barcodes_for_test",
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
    "image_measurement_value": ("image_measurement_value",),
    "area_fraction": ("area_fraction",),
    "scale_factor": ("scale_factor",),
}
#: The valid range of each numeric column (inclusive); a value outside it, or not finite, is
#: made missing and counted (``out_of_range_<column>``). The TFDS builder's metadata reader
#: (``tfds_builder/bioscan5m/records.py``) applies the same ranges.
VALUE_RANGES: dict[str, tuple[float, float]] = {
    "coord-lat": (-90.0, 90.0),
    "coord-lon": (-180.0, 180.0),
    "image_measurement_value": (0.0, np.inf),
    "area_fraction": (0.0, np.inf),
    "scale_factor": (0.0, np.inf),
}
#: The minimum barcode length (nt, after normalisation) of the training import
#: (:func:`bioscan_jax.data.sources.open_splits`, ``config.data.min_length``); the readers take
#: ``min_length`` and check nothing by default.
MIN_LENGTH = 200
#: BOLD's marker column; rows of another marker are skipped when ``marker`` is set.
MARKER_COLUMNS = ("markercode", "marker_code", "marker")
DEFAULT_MARKER = "COI-5P"

_FASTA_KEYS: dict[str, str] = {
    alias.lower(): column for column, aliases in TSV_COLUMN_ALIASES.items() for alias in (column, *aliases)
}
_FASTA_WRITE_COLUMNS: tuple[str, ...] = ("sampleid", *RANKS, "dna_bin", "country", "province_state")
_EXAMPLES_PER_REASON = 5
_GZIP_MAGIC = b"\x1f\x8b"

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
    #: reason or note -> the first few records concerned (processid and line, or line).
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    #: counted changes that kept the row, e.g. ``barcodes_normalised``, ``out_of_range_coord-lat``.
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

    def note(self, what: str, count: int, records: Iterable[str] = ()) -> None:
        """Counts ``count`` rows kept but changed (or worth a look); keeps a few as examples."""
        if count:
            self.notes[what] = self.notes.get(what, 0) + int(count)
            records = list(records)
            if records:
                examples = self.examples.setdefault(what, [])
                examples.extend(records[: max(0, _EXAMPLES_PER_REASON - len(examples))])

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
    ``.fna``), optionally gzip-compressed (``.tsv.gz``, ...), by its suffix; ``kwargs`` go to
    :func:`read_bold_tsv` or :func:`read_fasta`."""
    name = os.fspath(path).lower()
    suffix = name.removesuffix(".gz").rsplit(".", 1)[-1]
    if suffix in ("fa", "fas", "fasta", "fna"):
        return read_fasta(path, **kwargs)
    if suffix in ("tsv", "txt", "tab"):
        return read_bold_tsv(path, **kwargs)
    raise ValueError(
        f"{path}: unknown BOLD file type {suffix!r}; expected .tsv/.txt or .fa/.fas/.fasta (optionally .gz)"
    )


def read_bold_tsv(
    path: str | os.PathLike,
    *,
    errors: Errors = "skip",
    normalize_barcodes: bool = True,
    marker: str | None = DEFAULT_MARKER,
    min_length: int | None = None,
    max_length: int | None = None,
    require: Iterable[str] = (),
) -> tuple[pd.DataFrame, ImportReport]:
    """Reads a BOLD-style TSV (one record per line, a header line, no quoting; ``.gz`` allowed).

    Needs a processid column and a sequence column (see :data:`TSV_COLUMN_ALIASES`), and a
    column for each schema column in ``require`` (e.g. ``("species", "genus")``); a missing one
    raises ``ValueError`` naming it and the columns found. When the file has a marker column,
    rows of a marker other than ``marker`` are skipped (``marker=None`` keeps all). Lines with
    more fields than the header are skipped as ``malformed_line``.

    Barcode length, after normalisation: with ``min_length`` (nt; ``None``: no minimum) shorter
    barcodes are skipped as ``too_short``, and barcodes with fewer than ``min_length`` ACGT
    letters as ``too_few_acgt`` -- without ``min_length`` that still skips barcodes with no ACGT
    at all (only ``N``). Nothing is truncated: with ``max_length`` (e.g. the tokenizer's
    ``max_nucleotides``, 660) the barcodes longer than it are counted in the note
    ``longer_than_<max_length>``, as the tokenizer will cut them there.

    A ``"`` is read as text (no quoting), so it never joins lines; lines holding one are noted
    (``stray_quote_lines``, with line numbers). Bytes that are not UTF-8 are read as U+FFFD and
    noted (``non_utf8_lines``). Raises ``ValueError`` for an empty file or a header without
    records, and for gzip bytes under a name without ``.gz``.
    """
    _check_errors(errors)
    source = os.fspath(path)
    report = ImportReport(source=source, format="tsv")
    scan = _scan_tsv(path)
    _note_lines(report, "non_utf8_lines", scan.non_utf8_lines)
    _note_lines(report, "stray_quote_lines", scan.quote_lines)
    if scan.wide_lines and errors == "raise":
        raise ValueError(f"{source}: line {scan.wide_lines[0]} has more fields than the header ({scan.width})")
    raw = pd.read_csv(
        path,
        sep="\t",
        dtype=str,
        keep_default_na=False,
        na_values=[""],
        quoting=csv.QUOTE_NONE,
        encoding_errors="replace",
        index_col=False,  # never take the first column as an index (a first row with an extra field)
        skiprows=[n - 1 for n in scan.wide_lines] or None,
        on_bad_lines="skip",
    )
    raw.columns = [c.strip().lower() for c in raw.columns]
    found = {col: next((a for a in aliases if a in raw.columns), None) for col, aliases in TSV_COLUMN_ALIASES.items()}
    for needed in ("processid", "dna_barcode", *require):
        if found.get(needed) is None:
            raise ValueError(
                f"{source}: no {needed} column; expected one of {TSV_COLUMN_ALIASES[needed]}, "
                f"found {list(raw.columns)}"
            )
    lines = len(scan.data_lines)
    kept_lines = np.setdiff1d(np.asarray(scan.data_lines, dtype=np.int64), np.asarray(scan.wide_lines, dtype=np.int64))
    if len(kept_lines) == len(raw):
        line_numbers = kept_lines
        dropped = [f"line {n}" for n in scan.wide_lines]
    else:  # pandas split the lines otherwise (e.g. on a lone carriage return): count, approximate lines
        line_numbers = np.arange(len(raw)) + 2
        dropped = ["line(s) with more fields than the header"]
    if lines > len(raw):
        if errors == "raise":
            raise ValueError(f"{source}: {lines - len(raw)} line(s) have more fields than the header")
        report.skip("malformed_line", dropped, count=lines - len(raw))
    report.rows_read = max(lines, len(raw))
    fields = pd.DataFrame({col: raw[name] for col, name in found.items() if name is not None})
    marker_column = next((c for c in MARKER_COLUMNS if c in raw.columns), None)
    markers = raw[marker_column] if marker_column is not None and marker is not None else None
    frame = _to_schema_frame(fields, report, line_numbers, errors, normalize_barcodes, markers=markers, marker=marker,
                             min_length=min_length, max_length=max_length)
    return frame, report


def read_fasta(
    path: str | os.PathLike,
    *,
    errors: Errors = "skip",
    normalize_barcodes: bool = True,
    min_length: int | None = None,
    max_length: int | None = None,
    require: Iterable[str] = (),
) -> tuple[pd.DataFrame, ImportReport]:
    """Reads a FASTA file whose headers follow the convention of the module docstring.

    ``min_length``, ``max_length`` and ``require`` as for :func:`read_bold_tsv` (a column of
    ``require`` is missing when no header has it). Raises ``ValueError`` for a file without
    records and for one whose headers carry no taxonomy at all (no rank, no identification),
    naming the header formats it reads.
    """
    _check_errors(errors)
    source = os.fspath(path)
    report = ImportReport(source=source, format="fasta")
    records: list[dict[str, Any]] = []
    header_lines: list[int] = []
    headers: list[str] = []
    orphan_lines: list[int] = []
    non_utf8: list[int] = []
    with _open_bytes(path) as f, _gzip_errors(source):
        header, header_line, chunks = None, 0, []
        for number, data in enumerate(f, start=1):
            try:
                line = data.decode("utf-8")
            except UnicodeDecodeError:
                line = data.decode("utf-8", errors="replace")
                non_utf8.append(number)
            line = line.strip().lstrip("\ufeff") if number == 1 else line.strip()
            if line.startswith(">"):
                if header is not None:
                    records.append(_parse_header(header, "".join(chunks), report))
                    header_lines.append(header_line)
                    headers.append(header)
                header, header_line, chunks = line[1:], number, []
            elif line:
                if header is None:
                    orphan_lines.append(number)
                else:
                    chunks.append("".join(line.split()))
        if header is not None:
            records.append(_parse_header(header, "".join(chunks), report))
            header_lines.append(header_line)
            headers.append(header)
    _note_lines(report, "non_utf8_lines", non_utf8)
    if not records:
        what = "only sequence text" if orphan_lines else "nothing"
        raise ValueError(f"{source}: no FASTA record (no line starts with '>'; the file holds {what})")
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
    if keep and not any(c in fields for c in (*RANKS, "taxon")):
        raise ValueError(
            f"{source}: no FASTA header carries a taxonomy (line {header_lines[keep[0]]}: "
            f"{'>' + headers[keep[0]][:80]!r}); expected '>PROCESSID|species=Aus bus|genus=Aus|...' "
            "or BOLD's '>PROCESSID|Aus bus|COI-5P|ACCESSION'"
        )
    for needed in require:
        if needed not in fields:
            raise ValueError(
                f"{source}: no FASTA header has a {needed} (found {sorted(c for c in fields if c in COLUMNS)}); "
                f"add '|{needed}=...' to the headers"
            )
    for needed in ("processid", "dna_barcode"):
        if needed not in fields:
            fields[needed] = pd.Series([None] * len(fields), dtype=object)
    frame = _to_schema_frame(fields, report, np.asarray([header_lines[i] for i in keep], dtype=np.int64), errors,
                             normalize_barcodes, min_length=min_length, max_length=max_length)
    return frame, report


def _check_errors(errors: str) -> None:
    if errors not in ("skip", "raise"):
        raise ValueError(f"errors must be 'skip' or 'raise', got {errors!r}")


def _open_bytes(path: str | os.PathLike) -> BinaryIO:
    """The file's bytes, decompressed for a ``.gz`` name; a name/content mismatch raises."""
    source = os.fspath(path)
    with open(path, "rb") as f:
        magic = f.read(2)
    compressed = source.lower().endswith(".gz")
    if magic == _GZIP_MAGIC and not compressed:
        name = os.path.basename(source)
        suffix = "." + name.rsplit(".", 1)[-1] if "." in name else ""
        raise ValueError(f"{source}: is gzip-compressed; decompress it (gunzip) or name it {suffix or name}.gz")
    if compressed and magic != _GZIP_MAGIC:
        raise ValueError(f"{source}: is named .gz but is not gzip-compressed; remove the .gz from its name")
    return gzip.open(path, "rb") if compressed else open(path, "rb")  # type: ignore[return-value]


@contextlib.contextmanager
def _gzip_errors(source: str) -> Iterator[None]:
    """Turns a corrupt gzip stream into a one-line ``ValueError`` naming the file."""
    try:
        yield
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{source}: unreadable gzip data ({e}); download or compress it again") from None


@dataclasses.dataclass
class _TsvScan:
    """One pass over a TSV's bytes: what pandas will see, by physical (1-based) line number."""

    width: int  # fields of the header
    data_lines: list[int]  # non-blank lines after the header (pandas skips blank ones)
    wide_lines: list[int]  # of those, lines with more fields than the header
    quote_lines: list[int]
    non_utf8_lines: list[int]


def _scan_tsv(path: str | os.PathLike) -> _TsvScan:
    source = os.fspath(path)
    scan = _TsvScan(0, [], [], [], [])
    header_seen = False
    with _open_bytes(path) as f, _gzip_errors(source):
        for number, line in enumerate(f, start=1):
            if not line.strip(b" \r\n"):  # what pandas skips as a blank line
                continue
            if not line.isascii():
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError:
                    scan.non_utf8_lines.append(number)
            width = line.rstrip(b"\r\n").count(b"\t") + 1
            if not header_seen:
                header_seen, scan.width = True, width
                continue
            scan.data_lines.append(number)
            if width > scan.width:
                scan.wide_lines.append(number)
            if b'"' in line:
                scan.quote_lines.append(number)
    if not header_seen:
        raise ValueError(f"{source}: is empty; expected a BOLD TSV with a header line (processid, nucleotides, ...)")
    if not scan.data_lines:
        raise ValueError(f"{source}: has a header line but no records")
    return scan


def _note_lines(report: ImportReport, what: str, lines: list[int]) -> None:
    report.note(what, len(lines), [f"line {n}" for n in lines[:_EXAMPLES_PER_REASON]])


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
    min_length: int | None = None,
    max_length: int | None = None,
) -> pd.DataFrame:
    """Validates the rows of ``fields`` (schema-named string columns) and builds the frame."""
    for name, value in (("min_length", min_length), ("max_length", max_length)):
        if value is not None and (not isinstance(value, (int, np.integer)) or value < 0):
            raise ValueError(f"{name} must be a non-negative int or None, got {value!r}")
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

    def drop(reason: str, bad: np.ndarray, detail: str | Callable[[int], str] = "") -> None:
        rows = np.flatnonzero(bad & keep)
        if rows.size == 0:
            return
        if errors == "raise":
            text = detail(int(rows[0])) if callable(detail) else detail
            raise ValueError(f"{report.source}: record {labels(rows[:1])[0]}: {reason}{text}")
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
    lengths = np.fromiter((len(b) for b in barcodes), dtype=np.int64, count=n)
    acgt = lengths - np.fromiter((b.count("N") for b in barcodes), dtype=np.int64, count=n)
    if min_length:
        drop("too_short", lengths < min_length,
             lambda i: f" ({lengths[i]} nt after normalisation < min_length={min_length})")
    need = max(1, min_length or 0)
    drop("too_few_acgt", acgt < need,
         lambda i: f" ({acgt[i]} of {lengths[i]} nt are A/C/G/T; need {need})")
    duplicate = np.zeros(n, dtype=bool)  # among the rows still kept: the first valid copy wins
    duplicate[keep] = processid[keep].duplicated().to_numpy()
    drop("duplicate_processid", duplicate)
    if max_length is not None:
        long = np.flatnonzero(keep & (lengths > max_length))
        report.note(f"longer_than_{max_length}", long.size, labels(long[:_EXAMPLES_PER_REASON]))

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
                parsed = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(dtype=np.float64, copy=True)
                unparsed = np.flatnonzero(np.isnan(parsed) & pd.notna(values))
                report.note(f"unparsed_{column}", unparsed.size, labels(kept[unparsed[:_EXAMPLES_PER_REASON]]))
                low, high = VALUE_RANGES.get(column, (-np.inf, np.inf))
                with np.errstate(invalid="ignore"):
                    outside = ~np.isnan(parsed) & (~np.isfinite(parsed) | (parsed < low) | (parsed > high))
                bad = np.flatnonzero(outside)
                report.note(f"out_of_range_{column}", bad.size, labels(kept[bad[:_EXAMPLES_PER_REASON]]))
                parsed[outside] = np.nan
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
    if len(out) == 0:
        skipped = ", ".join(f"{count} {reason}" for reason, count in sorted(report.skipped.items()))
        first = next(iter(report.examples.get(max(report.skipped, key=report.skipped.get), [])), "") if report.skipped else ""
        raise ValueError(
            f"{report.source}: none of its {report.rows_read} record(s) is usable (skipped: {skipped or 'none'}"
            f"{'; e.g. ' + first if first else ''}); fix the file or the reader's options"
        )
    if report.skipped or set(report.notes) - {"barcodes_normalised"}:
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

    A species needs :func:`min_barcodes_for_test` distinct barcodes to get a ``test`` barcode;
    :func:`check_species_split` (called by the training import before this) raises when no
    species has that many.
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


def min_barcodes_for_test(test_fraction: float) -> int:
    """The fewest distinct barcodes a seen species needs for :func:`assign_species_split` to give
    it a ``test`` barcode besides its ``train`` ones (2 or more; e.g. 3 for ``test_fraction=0.2``)."""
    if not 0.0 < test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in (0, 1] for a test split, got {test_fraction}")
    size = max(2, int(np.ceil(0.5 / test_fraction)) - 1)
    while np.floor(test_fraction * size + 0.5) < 1:  # the rounding of assign_species_split
        size += 1
    return size


def check_species_split(frame: pd.DataFrame, source: str, *, test_fraction: float = 0.2) -> None:
    """Raises a one-line ``ValueError`` naming ``source`` when no species of ``frame`` has enough
    distinct barcodes (:func:`min_barcodes_for_test`) for both a ``train`` and a ``test`` record
    under :func:`assign_species_split`; a no-op for ``test_fraction=0``."""
    if test_fraction <= 0:
        return
    need = min_barcodes_for_test(test_fraction)
    labelled = frame.loc[frame["species"].notna(), ["species", "dna_barcode"]]
    barcodes = labelled.groupby("species", sort=False)["dna_barcode"].nunique()
    if not (barcodes >= need).any():
        most = int(barcodes.max()) if len(barcodes) else 0
        raise ValueError(
            f"{source}: no species has the {need} distinct barcodes needed for a train and a test record at "
            f"test_fraction={test_fraction} ({len(barcodes)} species in {len(labelled)} records with a species, "
            f"at most {most} barcodes each); add records of the same species or raise test_fraction"
        )


def split_counts(frame: pd.DataFrame) -> Mapping[str, tuple[int, int]]:
    """``{split: (records, species)}`` of a frame, for logs and tests."""
    grouped = frame.groupby("split", dropna=False)
    return {str(k): (int(len(g)), int(g["species"].nunique())) for k, g in grouped}
