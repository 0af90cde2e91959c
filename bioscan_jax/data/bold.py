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
``malformed_line`` -- a TSV line with more or fewer fields than the header, a FASTA sequence
line before any header), with the first few record ids per reason; ``errors="raise"`` raises a
``ValueError`` naming the first one instead. Nothing is dropped silently. Line numbers count
LF, CRLF and a lone CR as line ends, as pandas does.

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
are read: an empty file or one without records, gzip bytes under a name without ``.gz``, a file
that is not text (:func:`check_text`: a NUL byte anywhere, mostly control characters or
non-UTF-8 bytes in its first 64 KB -- decompressed for ``.gz`` --, or UTF-16), a TSV without a
processid / barcode column (or without a column of ``require``), a FASTA file whose headers
carry no taxonomy, or a file none of whose records is usable. A path that does not exist raises
``FileNotFoundError`` ("<path>: no such file or directory").

Memory: a file is read :data:`CHUNK_ROWS` rows at a time (a TSV: a line scan, then only the
columns the schema needs), so an import's peak memory is the frame it returns plus a bounded
working set; every chunk size gives the same frame, report and errors.

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

import bisect
import contextlib
import csv
import dataclasses
import gzip
import logging
import os
import re
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
#: The schema columns a FASTA header can set (and the sequence).
_FASTA_COLUMNS: tuple[str, ...] = tuple(c for c in COLUMNS if c in {*_FASTA_KEYS.values(), "taxon", "dna_barcode"})
_FASTA_WRITE_COLUMNS: tuple[str, ...] = ("sampleid", *RANKS, "dna_bin", "country", "province_state")
_EXAMPLES_PER_REASON = 5
_GZIP_MAGIC = b"\x1f\x8b"
#: Rows (TSV lines, FASTA records) parsed and mapped at a time: memory grows with the frame, not
#: the file (an import's working set is a few KB per row of a chunk).
CHUNK_ROWS = 10_000
#: How much of a file (decompressed) :func:`check_text` looks at to tell text from binary data.
SNIFF_BYTES = 64 * 1024
#: Control characters that text files do not hold (tab, LF, VT, FF, CR and ESC are text).
_CONTROL_BYTES = bytes([*range(0, 9), *range(14, 27), *range(28, 32), 127])
#: A file whose first bytes are more than this fraction control characters or non-UTF-8 is binary.
_MAX_NON_TEXT = 0.3
_NUL = b"\0"
_UTF8_BOM = b"\xef\xbb\xbf"

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
    :func:`read_bold_tsv` or :func:`read_fasta`. A path that does not exist raises
    ``FileNotFoundError`` ("<path>: no such file or directory"), whatever its suffix."""
    _check_file(path)
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
    chunk_rows: int | None = None,
) -> tuple[pd.DataFrame, ImportReport]:
    """Reads a BOLD-style TSV (one record per line, a header line, no quoting; ``.gz`` allowed).

    Needs a processid column and a sequence column (see :data:`TSV_COLUMN_ALIASES`), and a
    column for each schema column in ``require`` (e.g. ``("species", "genus")``); a missing one
    raises ``ValueError`` naming it and the columns found. When the file has a marker column,
    rows of a marker other than ``marker`` are skipped (``marker=None`` keeps all). Lines with
    more or fewer fields than the header (a tab added or lost) are skipped as ``malformed_line``.

    Barcode length, after normalisation: with ``min_length`` (nt; ``None``: no minimum) shorter
    barcodes are skipped as ``too_short``, and barcodes with fewer than ``min_length`` ACGT
    letters as ``too_few_acgt`` -- without ``min_length`` that still skips barcodes with no ACGT
    at all (only ``N``). Nothing is truncated: with ``max_length`` (e.g. the tokenizer's
    ``max_nucleotides``, 660) the barcodes longer than it are counted in the note
    ``longer_than_<max_length>``, as the tokenizer will cut them there.

    A ``"`` is read as text (no quoting), so it never joins lines; lines holding one are noted
    (``stray_quote_lines``, with line numbers). Bytes that are not UTF-8 are read as U+FFFD and
    noted (``non_utf8_lines``). Raises ``ValueError`` for an empty file or a header without
    records, for gzip bytes under a name without ``.gz`` and for a file that is not text.

    Memory is bounded: the file is scanned once line by line, then only the columns the schema
    needs are parsed, ``chunk_rows`` rows at a time (default :data:`CHUNK_ROWS`); the result
    (frame and report) is the same for every chunk size.
    """
    _check_errors(errors)
    _check_lengths(min_length, max_length)
    chunk_rows = _check_chunk_rows(chunk_rows)
    source = os.fspath(path)
    report = ImportReport(source=source, format="tsv")
    scan = _scan_tsv(path)
    _note_lines(report, "non_utf8_lines", scan.non_utf8_lines)
    _note_lines(report, "stray_quote_lines", scan.quote_lines)
    if scan.bad_lines and errors == "raise":
        raise ValueError(scan.bad_line_message(source))
    # index_col=False: never take the first column as an index
    options: dict[str, Any] = dict(sep="\t", dtype=str, keep_default_na=False, na_values=[""], quoting=csv.QUOTE_NONE,
                                   encoding_errors="replace", index_col=False)  # fmt: skip
    positions, marker_at = _tsv_columns(path, source, options, require, marker)
    usecols = sorted({*positions.values(), *([] if marker_at is None else [marker_at])})
    lines = scan.data_count
    for exact in (True, False):  # exact line numbers, unless pandas split the lines otherwise (a lone CR)
        mapper = _Mapper(report, errors, normalize_barcodes, marker=marker, min_length=min_length,
                         max_length=max_length)  # fmt: skip
        rows = 0
        skiprows = [n - 1 for n in scan.bad_lines] or None
        with _pandas_errors(source), pd.read_csv(path, usecols=usecols, chunksize=chunk_rows, on_bad_lines="skip",
                                                 skiprows=skiprows, **options) as chunks:  # fmt: skip
            for chunk in chunks:
                if exact and rows + len(chunk) > lines - len(scan.bad_lines):
                    break
                columns = {pos: chunk.iloc[:, i] for i, pos in enumerate(usecols)}
                fields = pd.DataFrame({col: columns[pos] for col, pos in positions.items()})
                stop = rows + len(chunk)
                line_numbers = scan.line_numbers(rows, stop) if exact else np.arange(rows, stop) + 2
                mapper.add(fields, line_numbers, markers=None if marker_at is None else columns[marker_at])
                rows += len(chunk)
            else:
                if not exact or rows == lines - len(scan.bad_lines):
                    break
    _count_unread_lines(report, source, errors, scan, exact=exact, lines=lines, rows=rows)
    if not mapper.chunks:  # every line was skipped: map no rows, for the same report and error
        mapper.add(pd.DataFrame({col: pd.Series([], dtype=object) for col in positions}), np.zeros(0, np.int64),
                   markers=None if marker_at is None else pd.Series([], dtype=object))  # fmt: skip
    return mapper.finish(), report


def _count_unread_lines(report: ImportReport, source: str, errors: Errors, scan, *, exact: bool, lines: int,
                        rows: int) -> None:
    """Lines of the file that pandas did not return as rows (fields missing or too many):
    ``malformed_line`` with their line numbers (or a one-line error); ``rows_read`` counts them."""
    if exact:
        dropped = [f"line {n}" for n in scan.bad_lines[:_EXAMPLES_PER_REASON]]
    else:
        dropped = ["line(s) with more or fewer fields than the header"]
    if lines > rows:
        if errors == "raise":
            raise ValueError(f"{source}: {lines - rows} line(s) have more fields than the header")
        report.skip("malformed_line", dropped, count=lines - rows)
    report.rows_read = max(lines, rows)


def _tsv_columns(path, source: str, options: Mapping[str, Any], require: Iterable[str],
                 marker: str | None) -> tuple[dict[str, int], int | None]:
    """The header's position of each schema column the file has (the first of a name that
    appears twice) and of the marker column (``None`` without one, or when ``marker`` is None);
    a missing processid, sequence or ``require`` column is a one-line error naming the file."""
    with _pandas_errors(source):
        names = [str(c).strip().lower() for c in pd.read_csv(path, nrows=0, **options).columns]
    found = {col: next((a for a in aliases if a in names), None) for col, aliases in TSV_COLUMN_ALIASES.items()}
    for needed in ("processid", "dna_barcode", *require):
        if found.get(needed) is None:
            raise ValueError(
                f"{source}: no {needed} column; expected one of {TSV_COLUMN_ALIASES[needed]}, found {names}"
            )
    positions = {col: names.index(name) for col, name in found.items() if name is not None}
    marker_column = next((c for c in MARKER_COLUMNS if c in names), None)
    marker_at = names.index(marker_column) if marker_column is not None and marker is not None else None
    return positions, marker_at


def read_fasta(
    path: str | os.PathLike,
    *,
    errors: Errors = "skip",
    normalize_barcodes: bool = True,
    min_length: int | None = None,
    max_length: int | None = None,
    require: Iterable[str] = (),
    chunk_rows: int | None = None,
) -> tuple[pd.DataFrame, ImportReport]:
    """Reads a FASTA file whose headers follow the convention of the module docstring.

    ``min_length``, ``max_length``, ``require`` and ``chunk_rows`` as for :func:`read_bold_tsv` (a
    column of ``require`` is missing when no header has it). Raises ``ValueError`` for a file
    without records, for one that is not text, and for one whose headers carry no taxonomy at all
    (no rank, no identification), naming the header formats it reads.
    """
    _check_errors(errors)
    _check_lengths(min_length, max_length)
    chunk_rows = _check_chunk_rows(chunk_rows)
    source = os.fspath(path)
    report = ImportReport(source=source, format="fasta")
    mapper = _Mapper(report, errors, normalize_barcodes, min_length=min_length, max_length=max_length)
    pending: list[dict[str, Any]] = []  # well-formed records not mapped yet, and their header lines
    pending_lines: list[int] = []
    present: set[str] = set()  # the columns some well-formed record has a value for
    first_record: tuple[int, str] | None = None  # line and text of the first well-formed header
    orphan_lines, malformed_lines, non_utf8 = _Lines(), _Lines(), _Lines()
    records = 0

    def flush() -> None:
        fields = pd.DataFrame.from_records(pending, columns=list(_FASTA_COLUMNS))
        mapper.add(fields, np.asarray(pending_lines, dtype=np.int64))
        pending.clear()
        pending_lines.clear()

    def add(header: str, line: int, sequence: str) -> None:
        nonlocal records, first_record
        records += 1
        record = _parse_header(header, sequence, report)
        if record is None:
            malformed_lines.add(line)
            return
        if first_record is None:
            first_record = (line, header)
        present.update(column for column, value in record.items() if value is not None)
        pending.append(record)
        pending_lines.append(line)
        if len(pending) >= chunk_rows:
            flush()

    with _open_bytes(path) as f, _gzip_errors(source):
        for header, header_line, sequence in _fasta_entries(f, source, non_utf8, orphan_lines):
            add(header, header_line, sequence)
    if pending or not mapper.chunks:
        flush()
    _note_lines(report, "non_utf8_lines", non_utf8)
    _check_fasta(source, errors, report, records, orphan_lines, malformed_lines, first_record, present, require)
    return mapper.finish(), report


def _fasta_entries(f: BinaryIO, source: str, non_utf8: "_Lines", orphan_lines: "_Lines"):
    """``(header without '>', its line number, sequence)`` of each FASTA entry, sequences joined
    over lines without whitespace; undecodable lines and sequence text before any header are
    counted in ``non_utf8`` and ``orphan_lines``."""
    header, header_line, chunks = None, 0, []
    for number, data in _lines(f, source):
        try:
            line = data.decode("utf-8")
        except UnicodeDecodeError:
            line = data.decode("utf-8", errors="replace")
            non_utf8.add(number)
        line = line.strip().lstrip("\ufeff") if number == 1 else line.strip()
        if line.startswith(">"):
            if header is not None:
                yield header, header_line, "".join(chunks)
            header, header_line, chunks = line[1:], number, []
        elif line:
            if header is None:
                orphan_lines.add(number)
            else:
                chunks.append("".join(line.split()))
    if header is not None:
        yield header, header_line, "".join(chunks)


def _check_fasta(source: str, errors: Errors, report: ImportReport, records: int, orphan_lines: "_Lines",
                 malformed_lines: "_Lines", first_record: tuple[int, str] | None, present: set[str],
                 require: Iterable[str]) -> None:
    """The whole-file checks of :func:`read_fasta` after every entry was read: one-line errors
    for a file without records or taxonomy or a required column, and the counted skips."""
    if not records:
        what = "only sequence text" if orphan_lines.count else "nothing"
        raise ValueError(f"{source}: no FASTA record (no line starts with '>'; the file holds {what})")
    if orphan_lines.count:
        if errors == "raise":
            raise ValueError(f"{source}: line {orphan_lines.first[0]} holds sequence text before any '>' header")
        report.skip("malformed_line", [f"line {n}" for n in orphan_lines.first], count=orphan_lines.count)
    report.rows_read = records + orphan_lines.count
    if malformed_lines.count:
        if errors == "raise":
            raise ValueError(
                f"{source}: line {malformed_lines.first[0]}: malformed FASTA header (mixes key=value fields with plain "
                "fields); expected '>PROCESSID|key=value|...'"
            )
        report.skip("malformed_header", [f"line {n}" for n in malformed_lines.first], count=malformed_lines.count)
    if first_record is not None and not any(c in present for c in (*RANKS, "taxon")):
        raise ValueError(
            f"{source}: no FASTA header carries a taxonomy (line {first_record[0]}: "
            f"{'>' + first_record[1][:80]!r}); expected '>PROCESSID|species=Aus bus|genus=Aus|...' "
            "or BOLD's '>PROCESSID|Aus bus|COI-5P|ACCESSION'"
        )
    for needed in require:
        if needed not in present:
            raise ValueError(
                f"{source}: no FASTA header has a {needed} (found {sorted(c for c in present if c in COLUMNS)}); "
                f"add '|{needed}=...' to the headers"
            )


def _check_errors(errors: str) -> None:
    if errors not in ("skip", "raise"):
        raise ValueError(f"errors must be 'skip' or 'raise', got {errors!r}")


def _check_lengths(min_length: Any, max_length: Any) -> None:
    for name, value in (("min_length", min_length), ("max_length", max_length)):
        if value is not None and (not isinstance(value, (int, np.integer)) or value < 0):
            raise ValueError(f"{name} must be a non-negative int or None, got {value!r}")


def _check_chunk_rows(chunk_rows: int | None) -> int:
    chunk_rows = CHUNK_ROWS if chunk_rows is None else chunk_rows
    if not isinstance(chunk_rows, (int, np.integer)) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
    return int(chunk_rows)


def _check_file(path: str | os.PathLike) -> None:
    """A missing path raises ``FileNotFoundError``, a directory ``ValueError``, naming it."""
    source = os.fspath(path)
    if not os.path.exists(source):
        raise FileNotFoundError(f"{source}: no such file or directory")
    if os.path.isdir(source):
        raise ValueError(f"{source}: is a directory, not a file")


def binary_offset(head: bytes) -> int | None:
    """Where ``head`` (the first bytes of a file) shows it is not text: the offset of its first NUL
    byte, or, when more than :data:`_MAX_NON_TEXT` of it is control characters or bytes that are not
    UTF-8, of the first such byte; ``None`` for text (UTF-8, or mostly ASCII with a few Latin-1
    letters)."""
    nul = head.find(b"\0")
    if nul >= 0:
        return nul
    if not head:
        return None
    control = len(head) - len(head.translate(None, _CONTROL_BYTES))
    text = head.decode("utf-8", errors="replace")
    invalid = text.count("\ufffd") - head.count("\ufffd".encode())
    if control + invalid <= _MAX_NON_TEXT * len(head):
        return None
    first = re.search(b"[" + re.escape(_CONTROL_BYTES) + b"]", head)
    offsets = [first.start()] if first else []
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        offsets.append(e.start)
    return min(offsets) if offsets else 0


_LINE_BREAKS = {ord(c): repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"}


def one_line(text: str) -> str:
    """``text`` with the characters that break a line (for ``str.splitlines``) escaped, for an
    error message that quotes a file's content."""
    return text.translate(_LINE_BREAKS)


def check_text(source: str, head: bytes) -> None:
    """Raises a one-line ``ValueError`` naming ``source`` when ``head``, its first bytes
    (decompressed), are not text: binary data (:func:`binary_offset`) or UTF-16."""
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise ValueError(f"{source}: is UTF-16 text; save it as UTF-8")
    offset = binary_offset(head)
    if offset is not None:
        raise ValueError(f"{source}: not a text file (binary data at byte {offset})")


def _open_bytes(path: str | os.PathLike) -> BinaryIO:
    """The file's bytes, decompressed for a ``.gz`` name; a name/content mismatch, a missing
    file and a file that is not text (:func:`check_text`, on the first :data:`SNIFF_BYTES`) raise."""
    source = os.fspath(path)
    _check_file(source)
    with open(path, "rb") as f:
        magic = f.read(2)
    compressed = source.lower().endswith(".gz")
    if magic == _GZIP_MAGIC and not compressed:
        name = os.path.basename(source)
        suffix = "." + name.rsplit(".", 1)[-1] if "." in name else ""
        raise ValueError(f"{source}: is gzip-compressed; decompress it (gunzip) or name it {suffix or name}.gz")
    if compressed and magic != _GZIP_MAGIC:
        raise ValueError(f"{source}: is named .gz but is not gzip-compressed; remove the .gz from its name")

    def opener() -> BinaryIO:
        return gzip.open(path, "rb") if compressed else open(path, "rb")  # type: ignore[return-value]

    with opener() as f, _gzip_errors(source):
        head = f.read(SNIFF_BYTES)
    check_text(source, head)
    return opener()


@contextlib.contextmanager
def _pandas_errors(source: str) -> Iterator[None]:
    """A parse error of pandas (which the line scan should have prevented) as one line naming the file."""
    try:
        yield
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise ValueError(f"{source}: unreadable TSV ({one_line(str(e).strip())})") from None


@contextlib.contextmanager
def _gzip_errors(source: str) -> Iterator[None]:
    """Turns a corrupt gzip stream into a one-line ``ValueError`` naming the file."""
    try:
        yield
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{source}: unreadable gzip data ({e}); download or compress it again") from None


class _Lines:
    """Line numbers of one kind: how many, and the first few (for the report's examples)."""

    def __init__(self) -> None:
        self.count = 0
        self.first: list[int] = []

    def add(self, number: int) -> None:
        self.count += 1
        if len(self.first) < _EXAMPLES_PER_REASON:
            self.first.append(number)


@dataclasses.dataclass
class _TsvScan:
    """One pass over a TSV's bytes: what pandas will see, by physical (1-based) line number. It
    keeps a few numbers per file, not per line: the blank and malformed lines (few), counts."""

    header_line: int = 0
    width: int = 0  # fields of the header
    data_count: int = 0  # non-blank lines after the header (pandas skips blank ones)
    blank_lines: list[int] = dataclasses.field(default_factory=list)  # after the header
    wide_lines: list[int] = dataclasses.field(default_factory=list)  # more fields than the header
    narrow_lines: list[int] = dataclasses.field(default_factory=list)  # fewer fields (a lost tab)
    narrow_fields: int = 0  # fields of the first narrow line
    quote_lines: _Lines = dataclasses.field(default_factory=_Lines)
    non_utf8_lines: _Lines = dataclasses.field(default_factory=_Lines)
    bad_lines: list[int] = dataclasses.field(default_factory=list)  # wide and narrow, sorted
    _skipped: np.ndarray | None = None  # per excluded line: data lines before it

    def finish(self) -> None:
        self.bad_lines = sorted(self.wide_lines + self.narrow_lines)
        excluded = np.asarray(sorted(self.blank_lines + self.bad_lines), dtype=np.int64)
        self._skipped = excluded - np.arange(len(excluded)) - (self.header_line + 1)

    def line_numbers(self, start: int, stop: int) -> np.ndarray:
        """The line numbers of the rows ``start`` .. ``stop`` that pandas parses (0-based,
        blank and malformed lines left out)."""
        assert self._skipped is not None
        rows = np.arange(start, stop, dtype=np.int64)
        return self.header_line + 1 + rows + np.searchsorted(self._skipped, rows, side="right")

    def bad_line_message(self, source: str) -> str:
        if self.wide_lines and (not self.narrow_lines or self.wide_lines[0] < self.narrow_lines[0]):
            return f"{source}: line {self.wide_lines[0]} has more fields than the header ({self.width})"
        return (f"{source}: line {self.narrow_lines[0]} has fewer fields ({self.narrow_fields}) than the header "
                f"({self.width}); a tab may be missing")  # fmt: skip


def _lines(f: BinaryIO, source: str) -> Iterator[tuple[int, bytes]]:
    """The lines of a text file as pandas splits them -- at LF, CRLF and a lone CR -- numbered from
    1, each with its line end or none. A NUL byte raises: the file is not text (and pandas would
    drop the rest of its line)."""
    number, offset = 0, 0
    for raw in f:
        nul = raw.find(_NUL)
        if nul >= 0:
            raise ValueError(f"{source}: not a text file (binary data at byte {offset + nul})")
        offset += len(raw)
        cr = raw.find(b"\r")
        if cr < 0 or (cr >= len(raw) - 2 and raw[cr + 1 :] in (b"\n", b"")):  # no CR but the line end
            number += 1
            yield number, raw
            continue
        body = raw[:-1] if raw.endswith(b"\n") else raw
        body = body[:-1] if body.endswith(b"\r") else body
        for piece in body.split(b"\r"):  # lone CRs end lines too
            number += 1
            yield number, piece


def _scan_tsv(path: str | os.PathLike) -> _TsvScan:
    source = os.fspath(path)
    scan = _TsvScan()
    with _open_bytes(path) as f, _gzip_errors(source):
        for number, line in _lines(f, source):
            if number == 1 and line.startswith(_UTF8_BOM):  # pandas drops it
                line = line[len(_UTF8_BOM) :]
            if line[:1] in b" \r\n" and not line.strip(b" \r\n"):  # what pandas skips as a blank line
                if scan.header_line:
                    scan.blank_lines.append(number)
                continue
            if not line.isascii():
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError:
                    scan.non_utf8_lines.add(number)
            width = line.count(b"\t") + 1
            if not scan.header_line:
                scan.header_line, scan.width = number, width
                continue
            scan.data_count += 1
            if width > scan.width:
                scan.wide_lines.append(number)
            elif width < scan.width:
                if not scan.narrow_lines:
                    scan.narrow_fields = width
                scan.narrow_lines.append(number)
            if b'"' in line:
                scan.quote_lines.add(number)
    if not scan.header_line:
        raise ValueError(f"{source}: is empty; expected a BOLD TSV with a header line (processid, nucleotides, ...)")
    if not scan.data_count:
        raise ValueError(f"{source}: has a header line but no records")
    scan.finish()
    return scan


def _note_lines(report: ImportReport, what: str, lines: _Lines) -> None:
    report.note(what, lines.count, [f"line {n}" for n in lines.first])


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


class _SeenIds:
    """A set of processids, compactly: sorted 64-bit hashes and, per hash, the row of the frame
    its processid was kept in (16 bytes per id, where a set of strings takes about 110); a hash
    that matches is checked against that row's processid (``lookup``), so the set is exact."""

    def __init__(self, lookup: Callable[[int], str]) -> None:
        self._lookup = lookup
        self._hashes = np.empty(0, dtype=np.uint64)
        self._rows = np.empty(0, dtype=np.int64)
        self._count = 0

    @staticmethod
    def _hash(ids: np.ndarray) -> np.ndarray:
        return pd.util.hash_array(np.asarray(ids, dtype=object), categorize=False)

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """Per id: whether it is in the set."""
        hashes = self._hash(ids)
        left = np.searchsorted(self._hashes, hashes, side="left")
        right = np.searchsorted(self._hashes, hashes, side="right")
        found = np.zeros(len(ids), dtype=bool)
        for i in np.flatnonzero(right > left).tolist():
            found[i] = any(self._lookup(int(row)) == ids[i] for row in self._rows[left[i] : right[i]])
        return found

    def add(self, ids: np.ndarray) -> None:
        """Adds ids (not in the set yet), kept in the next ``len(ids)`` rows of the frame."""
        hashes = self._hash(ids)
        order = np.argsort(hashes, kind="stable")
        at = np.searchsorted(self._hashes, hashes[order], side="right")
        self._hashes = np.insert(self._hashes, at, hashes[order])
        self._rows = np.insert(self._rows, at, self._count + order)
        self._count += len(ids)


class _Mapper:
    """Validates the rows of a file (schema-named string columns) and builds the frame, one chunk
    of rows at a time (:meth:`add`), with the same frame, report and errors as one pass over all
    rows: the report's counts and examples are gathered per reason and written in the order of
    the checks by :meth:`finish`; with ``errors='raise'`` the error raised (by :meth:`finish`) is
    the first row of the first check that any row fails; the first valid copy of a processid wins
    over all chunks."""

    def __init__(
        self,
        report: ImportReport,
        errors: Errors,
        normalize_barcodes: bool,
        *,
        marker: str | None = None,
        min_length: int | None = None,
        max_length: int | None = None,
    ) -> None:
        self.report = report
        self.errors = errors
        self.normalize_barcodes = normalize_barcodes
        self.marker = marker
        self.min_length = min_length
        self.max_length = max_length
        self.chunks: list[dict[str, Any]] = []  # per chunk: column -> array
        #: reason or note -> [kind ('skip' or 'note'), count, first examples], in the order of the checks
        self._events: dict[str, list[Any]] = {}
        self._errors: dict[str, str] = {}  # reason -> the error of its first row (errors='raise')
        self._seen = _SeenIds(self._kept_processid)  # the processids kept so far
        self._offsets: list[int] = [0]  # the first row of each chunk in the frame

    def _kept_processid(self, row: int) -> str:
        chunk = bisect.bisect_right(self._offsets, row) - 1
        return self.chunks[chunk]["processid"][row - self._offsets[chunk]]

    def _record(self, kind: str, what: str, count: int, examples: list[str]) -> None:
        event = self._events.setdefault(what, [kind, 0, []])
        event[1] += int(count)
        event[2].extend(examples[: max(0, _EXAMPLES_PER_REASON - len(event[2]))])

    def add(self, fields: pd.DataFrame, line_numbers: np.ndarray, markers: pd.Series | None = None) -> None:
        """Validates and maps the rows of one chunk (``line_numbers``: their lines in the file)."""
        fields = fields.reset_index(drop=True).astype(object)
        for column in fields.columns:
            stripped = fields[column].str.strip()
            fields[column] = stripped.where(stripped != "", None)
        n = len(fields)
        processid = fields["processid"]
        keep = np.ones(n, dtype=bool)
        min_length, max_length = self.min_length, self.max_length

        def labels(rows: np.ndarray) -> list[str]:
            return [
                f"{processid.iloc[i]} (line {line_numbers[i]})" if pd.notna(processid.iloc[i])
                else f"line {line_numbers[i]}"
                for i in rows.tolist()
            ]  # fmt: skip

        def note(what: str, rows: np.ndarray) -> None:
            self._record("note", what, rows.size, labels(rows[:_EXAMPLES_PER_REASON]))

        def drop(reason: str, bad: np.ndarray, detail: str | Callable[[int], str] = "") -> None:
            rows = np.flatnonzero(bad & keep)
            if self.errors == "raise" and rows.size and reason not in self._errors:
                text = detail(int(rows[0])) if callable(detail) else detail
                self._errors[reason] = f"{self.report.source}: record {one_line(labels(rows[:1])[0])}: {reason}{text}"
            self._record("skip", reason, rows.size, labels(rows[:_EXAMPLES_PER_REASON]))
            keep[rows] = False

        drop("missing_processid", processid.isna().to_numpy())
        if markers is not None:
            other = markers.reset_index(drop=True).fillna("").str.strip().to_numpy() != self.marker
            drop("other_marker", other, f" (not {self.marker})")

        barcodes, barcode_report = dna.normalize_batch(fields["dna_barcode"], max_nucleotides=None, errors="count")
        missing = np.zeros(n, dtype=bool)
        missing[np.asarray(barcode_report["missing"], dtype=np.int64)] = True
        drop("missing_barcode", missing)
        invalid = np.zeros(n, dtype=bool)
        invalid_rows = np.fromiter(barcode_report["invalid"], dtype=np.int64, count=len(barcode_report["invalid"]))
        invalid[invalid_rows] = True
        drop("invalid_barcode", invalid, lambda i: f": invalid characters {barcode_report['invalid'][i]}")
        lengths = np.fromiter((len(b) for b in barcodes), dtype=np.int64, count=n)
        acgt = lengths - np.fromiter((b.count("N") for b in barcodes), dtype=np.int64, count=n)
        if min_length:
            drop("too_short", lengths < min_length,
                 lambda i: f" ({lengths[i]} nt after normalisation < min_length={min_length})")
        need = max(1, min_length or 0)
        drop("too_few_acgt", acgt < need,
             lambda i: f" ({acgt[i]} of {lengths[i]} nt are A/C/G/T; need {need})")
        duplicate = np.zeros(n, dtype=bool)  # among the rows still kept: the first valid copy wins
        ids = processid[keep]
        duplicate[keep] = ids.duplicated().to_numpy() | self._seen.contains(ids.to_numpy())
        drop("duplicate_processid", duplicate)
        self._seen.add(processid[keep].to_numpy())
        if max_length is not None:
            note(f"longer_than_{max_length}", np.flatnonzero(keep & (lengths > max_length)))

        kept = np.flatnonzero(keep)
        arrays = self._chunk_arrays(fields, kept, np.asarray(barcodes, dtype=object), note)
        self.chunks.append({column: arrays[column] for column in COLUMNS})
        self._offsets.append(self._offsets[-1] + len(kept))

    def _chunk_arrays(self, fields: pd.DataFrame, kept: np.ndarray, normalized: np.ndarray,
                      note: Callable[[str, np.ndarray], None]) -> dict[str, Any]:
        """The schema's columns of the kept rows of one chunk, as arrays (numbers parsed and range
        checked, the barcode normalised or as written, ``taxon`` the lowest rank present)."""
        size = len(kept)
        strings: dict[str, np.ndarray] = {}  # the string columns, as object arrays until the end
        arrays: dict[str, Any] = {}  # the columns (the chunk is kept as arrays, not as a frame)
        for column in COLUMNS:
            dtype = COLUMN_DTYPES[column]
            if column == "dna_barcode":
                strings[column] = normalized[kept] if self.normalize_barcodes else fields[column].to_numpy()[kept]
            elif column in fields and column != "taxon":
                values = fields[column].to_numpy()[kept]
                if dtype == "float64":
                    parsed = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(dtype=np.float64, copy=True)
                    note(f"unparsed_{column}", kept[np.flatnonzero(np.isnan(parsed) & pd.notna(values))])
                    low, high = VALUE_RANGES.get(column, (-np.inf, np.inf))
                    with np.errstate(invalid="ignore"):
                        outside = ~np.isnan(parsed) & (~np.isfinite(parsed) | (parsed < low) | (parsed > high))
                    note(f"out_of_range_{column}", kept[np.flatnonzero(outside)])
                    parsed[outside] = np.nan
                    arrays[column] = parsed
                elif dtype == "string":
                    strings[column] = values
                else:
                    arrays[column] = pd.array(values, dtype=dtype)
            elif column == "inferred_ranks":
                arrays[column] = np.zeros(size, dtype=np.uint8)
            elif dtype == "float64":
                arrays[column] = np.full(size, np.nan)
            elif dtype == "string":
                strings[column] = np.full(size, None, dtype=object)
            else:
                arrays[column] = pd.array(np.full(size, None, dtype=object), dtype=dtype)
        if self.normalize_barcodes:
            raw = fields["dna_barcode"].to_numpy()[kept]
            self._record("note", "barcodes_normalised", int(np.count_nonzero(raw != normalized[kept])), [])
        # taxon: the name at the lowest rank present, else the file's own (a BOLD FASTA identification)
        taxon = np.full(size, None, dtype=object)
        for rank in RANKS:  # top down: each lower rank present overwrites
            taxon = np.where(pd.notna(strings[rank]), strings[rank], taxon)
        if "taxon" in fields:
            taxon = np.where(pd.isna(taxon), fields["taxon"].to_numpy()[kept], taxon)
        strings["taxon"] = taxon
        for column, values in strings.items():
            arrays[column] = _string_array(values, COLUMN_DTYPES[column])
        return arrays

    def finish(self) -> pd.DataFrame:
        """The frame of all chunks; writes the counts to the report; raises the first error."""
        report = self.report
        for reason in self._events:  # in the order of the checks
            if reason in self._errors:
                raise ValueError(self._errors[reason])
        for what, (kind, count, examples) in self._events.items():
            if kind == "skip":
                report.skip(what, examples, count=count)
            else:
                report.note(what, count, examples)
        columns: dict[str, Any] = {}
        for column in COLUMNS:  # one column at a time, its chunks freed as it is joined
            parts = [chunk.pop(column) for chunk in self.chunks]
            if len(parts) == 1:
                columns[column] = parts[0]
            elif isinstance(parts[0], np.ndarray):
                columns[column] = np.concatenate(parts)
            else:  # extension arrays; arrow-backed strings are joined without a copy
                columns[column] = type(parts[0])._concat_same_type(parts)
            del parts
        self.chunks = []
        out = pd.DataFrame(columns, copy=False)
        report.rows_mapped = len(out)
        if len(out) == 0:
            skipped = ", ".join(f"{count} {reason}" for reason, count in sorted(report.skipped.items()))
            most = max(report.skipped, key=report.skipped.get) if report.skipped else None
            first = next(iter(report.examples.get(most, [])), "") if most else ""
            raise ValueError(
                f"{report.source}: none of its {report.rows_read} record(s) is usable (skipped: {skipped or 'none'}"
                f"{'; e.g. ' + one_line(first) if first else ''}); fix the file or the reader's options"
            )
        if report.skipped or set(report.notes) - {"barcodes_normalised"}:
            log.warning("BOLD import: %s", report.summary())
        return out


def _string_array(values: np.ndarray, dtype: str) -> Any:
    """``pd.array(values, dtype)`` of an object array of str and missing values. When ``dtype``
    is stored by pyarrow, the array is made from exact-size buffers: arrow's builders grow theirs
    by doubling, and arrow's default allocator (mimalloc) keeps the unused part of a shrunk
    buffer, about a third more memory for a frame read in chunks."""
    resolved = pd.api.types.pandas_dtype(dtype)
    if getattr(resolved, "storage", None) != "pyarrow" or len(values) == 0:
        return pd.array(values, dtype=dtype)
    import pyarrow as pa

    missing = np.asarray(pd.isna(values), dtype=bool)
    present = values[~missing]
    try:
        data = "".join(present).encode("utf-8")
    except (TypeError, UnicodeEncodeError):  # not all str, or lone surrogates: pandas decides
        return pd.array(values, dtype=dtype)
    lengths = np.zeros(len(values), dtype=np.int64)
    chars = np.fromiter(map(len, present), dtype=np.int64, count=len(present))
    if len(data) != int(chars.sum()):  # not ASCII: lengths in bytes
        chars = np.fromiter((len(s.encode("utf-8")) for s in present), dtype=np.int64, count=len(present))
    lengths[~missing] = chars
    offsets = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    nulls = int(missing.sum())
    validity = pa.py_buffer(np.packbits(~missing, bitorder="little")) if nulls else None
    array = pa.LargeStringArray.from_buffers(len(values), pa.py_buffer(offsets), pa.py_buffer(data), validity, nulls)
    out = pd.arrays.ArrowStringArray(array)
    return out if out.dtype == resolved else pd.array(values, dtype=dtype)


def lowest_rank_name(frame: pd.DataFrame, fallback: np.ndarray | None = None) -> pd.Series:
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
