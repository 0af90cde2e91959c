"""Reading and checking the metadata CSV, and turning its rows into TFDS examples.

Bad input never disappears silently. Each problem has a *reason*:

===================== =================================================================
``malformed_row``     wrong number of fields, an unparseable number, an empty processid
``unknown_split``     a ``split`` value that is not one of :data:`schema.SPLITS`
``duplicate_processid`` a processid seen on an earlier row (the first row is kept)
``bad_chunk``         a ``chunk`` value not of its split's form (:data:`schema.CHUNK_HEX_CHARS`:
                      2 hex characters for pretrain, 1 for train and other_heldout, none for
                      the evaluation splits), e.g. ``0`` for ``00``: a leading zero lost when
                      the CSV went through a tool that read the column as a number
``invalid_barcode``   a ``dna_barcode`` with characters that are not nucleotides (the BOLD
                      import's rule, :func:`bioscan_jax.data.dna.normalize_batch`)
``missing_image``     the image of a record is not in the image folder / zips
``bad_image``         the image is not a JPEG or is truncated
===================== =================================================================

With ``on_bad_record='raise'`` (the default) the first problem raises
:class:`BadRecordError` naming the file and the record; with ``'skip'`` the record
is skipped, logged, and counted per reason (the counts land in the dataset's
metadata). A CSV that lacks a column always raises.

A value outside its valid range keeps its record: ``coord-lat`` outside [-90, 90],
``coord-lon`` outside [-180, 180], a negative ``image_measurement_value``,
``area_fraction`` or ``scale_factor``, or any of them not finite
(:data:`bioscan_jax.data.bold.VALUE_RANGES`) is made missing (NaN) and counted, in both
modes, as ``out_of_range`` (:data:`CLEARED_REASONS`): the metadata's ``cleared``,
``cleared_total``, ``cleared_columns`` (per column) and ``cleared_examples``.

A ``dna_barcode`` is normalised as the BOLD import normalises it
(:func:`bioscan_jax.data.dna.normalize_batch` without truncation: upper case, U -> T, gaps and
IUPAC ambiguity codes as that function reads them; the official barcodes hold ACGTN only and are
unchanged):
a changed barcode keeps its record and is counted, in both modes, as ``normalised``
(``normalised_columns``, ``normalised_examples`` with the record ids).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import io
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
from absl import logging

from bioscan_jax.data import dna
from bioscan_jax.data import schema
from bioscan_jax.data.bold import VALUE_RANGES
from bioscan_jax.data import fields
from tfds_builder.bioscan5m.sources import MetadataFile

REASONS: tuple[str, ...] = (
    "malformed_row",
    "unknown_split",
    "duplicate_processid",
    "bad_chunk",
    "invalid_barcode",
    "missing_image",
    "bad_image",
)
#: Reasons for a value that is cleared (made missing) while its record is kept; never raised.
CLEARED_REASONS: tuple[str, ...] = ("out_of_range",)
ON_BAD_RECORD = ("raise", "skip")
#: How many skipped records per reason are listed (by name) in the metadata and the log.
EXAMPLES_KEPT = 20


class BadRecordError(ValueError):
    """A record of the source data cannot be used (the message names file and record)."""


class BadRecords:
    """Applies the ``on_bad_record`` policy and keeps the per-reason counts."""

    def __init__(self, mode: str, source: str):
        if mode not in ON_BAD_RECORD:
            raise ValueError(f"on_bad_record must be one of {ON_BAD_RECORD}, got {mode!r}")
        self.mode = mode
        self.source = source
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, list[str]] = collections.defaultdict(list)
        self.cleared: collections.Counter[str] = collections.Counter()
        self.cleared_columns: collections.Counter[str] = collections.Counter()
        self.cleared_examples: dict[str, list[str]] = collections.defaultdict(list)
        self.normalised: collections.Counter[str] = collections.Counter()
        self.normalised_examples: list[str] = []

    def report(self, reason: str, record: str, detail: str) -> None:
        """Raises (mode 'raise') or counts and logs a skipped record (mode 'skip')."""
        assert reason in REASONS, reason
        message = f"{self.source}: record {record}: {detail}"
        if self.mode == "raise":
            raise BadRecordError(
                f"{message} [{reason}]. Pass on_bad_record='skip' to the builder to skip and count such records."
            )
        self.counts[reason] += 1
        if len(self.examples[reason]) < EXAMPLES_KEPT:
            self.examples[reason].append(message)
            logging.warning("Skipping %s [%s]", message, reason)

    def clear(self, reason: str, column: str, count: int, examples: Sequence[tuple[str, str]]) -> None:
        """Counts ``count`` values of ``column`` made missing (their records are kept), in either
        mode; ``examples`` are ``(record, detail)`` pairs of the first few, logged and kept."""
        assert reason in CLEARED_REASONS, reason
        if not count:
            return
        self.cleared[reason] += int(count)
        self.cleared_columns[column] += int(count)
        kept = self.cleared_examples[reason]
        for record, detail in examples[: max(0, EXAMPLES_KEPT - len(kept))]:
            message = f"{self.source}: record {record}: {detail}"
            kept.append(message)
            logging.warning("Clearing %s [%s]; the record is kept", message, reason)
        logging.warning("%s: %d %s value(s) made missing [%s]", self.source, count, column, reason)

    def normalise(self, column: str, count: int, examples: Sequence[tuple[str, str]]) -> None:
        """Counts ``count`` values of ``column`` rewritten to their normal form (their records are
        kept), in either mode; ``examples``: ``(record, detail)`` of the first few."""
        if not count:
            return
        self.normalised[column] += int(count)
        for record, detail in examples[: max(0, EXAMPLES_KEPT - len(self.normalised_examples))]:
            self.normalised_examples.append(f"{self.source}: record {record}: {detail}")
        logging.warning("%s: %d %s value(s) normalised; the records are kept", self.source, count, column)

    def summary(self) -> dict:
        """JSON-able counts and first examples, for the dataset metadata."""
        return {
            "on_bad_record": self.mode,
            "skipped": {r: int(self.counts.get(r, 0)) for r in REASONS},
            "skipped_total": int(sum(self.counts.values())),
            "skipped_examples": {r: list(v) for r, v in self.examples.items()},
            "cleared": {r: int(self.cleared.get(r, 0)) for r in CLEARED_REASONS},
            "cleared_total": int(sum(self.cleared.values())),
            "cleared_columns": {c: int(n) for c, n in sorted(self.cleared_columns.items())},
            "cleared_examples": {r: list(v) for r, v in self.cleared_examples.items()},
            "normalised": int(sum(self.normalised.values())),
            "normalised_columns": {c: int(n) for c, n in sorted(self.normalised.items())},
            "normalised_examples": list(self.normalised_examples),
        }


# ----------------------------------------------------------------------------- reading


@dataclasses.dataclass
class Metadata:
    """The checked metadata: one row per usable record, with the official dtypes."""

    frame: pd.DataFrame
    label_names: dict[str, list[str]]
    label_indices: dict[str, np.ndarray]
    #: per row: first row of its barcode after rstrip('N') (:func:`schema.first_of_barcode`)
    first_of_barcode: np.ndarray
    md5: str
    num_rows_read: int


class _HashingReader(io.RawIOBase):
    """A raw reader that feeds every byte it passes on to an md5."""

    def __init__(self, raw, digest):
        self._raw, self._digest = raw, digest

    def readable(self):
        return True

    def readinto(self, buffer):
        data = self._raw.read(len(buffer))
        self._digest.update(data)
        buffer[: len(data)] = data
        return len(data)


def _check_fields(meta: MetadataFile, policy: BadRecords) -> tuple[str, set[int]]:
    """One streaming pass with the csv module: md5 of the bytes and the field count per row.

    Returns the md5 and the (0-based, header = 0) physical line numbers of rows to skip.
    pandas' C parser does not report rows with too few fields, hence this pass.
    """
    digest = hashlib.md5()
    bad_lines: set[int] = set()
    with meta.open() as raw:
        buffered = io.BufferedReader(_HashingReader(raw, digest), buffer_size=1 << 22)
        text = io.TextIOWrapper(buffered, encoding="utf-8-sig", newline="")
        reader = csv.reader(text)
        try:
            header = next(reader, None)
            if header is None:
                raise BadRecordError(f"{meta.name}: empty metadata CSV")
            missing = [c for c in schema.COLUMNS if c not in header]
            if missing:
                raise BadRecordError(
                    f"{meta.name}: metadata CSV is missing column(s) {missing}; expected {list(schema.COLUMNS)}"
                )
            width, pid_at = len(header), header.index("processid")
            line_start = reader.line_num  # 0-based physical line where the next row starts
            for row in reader:
                if row and len(row) != width:
                    record = repr(row[pid_at]) if len(row) > pid_at and row[pid_at] else f"at line {line_start + 1}"
                    policy.report(
                        "malformed_row", record, f"line {line_start + 1} has {len(row)} fields, expected {width}"
                    )
                    bad_lines.update(range(line_start, reader.line_num))
                line_start = reader.line_num
            while buffered.read(1 << 22):  # hash any bytes the parser did not need
                pass
        except UnicodeDecodeError as e:
            raise BadRecordError(f"{meta.name}: not UTF-8 text near line {reader.line_num + 1}: {e}") from None
        except csv.Error as e:
            raise BadRecordError(f"{meta.name}: unreadable CSV at line {reader.line_num}: {e}") from None
    return digest.hexdigest(), bad_lines


def _to_number(df: pd.DataFrame, column: str, dtype: str, policy: BadRecords) -> tuple[pd.Series, np.ndarray]:
    """Converts a string column to its official numeric dtype; flags rows that do not parse."""
    raw = df[column]
    values = pd.to_numeric(raw, errors="coerce")
    bad = values.isna().to_numpy() & raw.notna().to_numpy()
    if dtype in ("uint8", "Int64"):
        finite = values.notna().to_numpy()
        vals = values.to_numpy(dtype=np.float64, na_value=np.nan)
        not_int = finite & (vals != np.round(vals))
        out_of_range = finite & (((vals < 0) | (vals > 255)) if dtype == "uint8" else np.zeros_like(finite))
        bad |= not_int | out_of_range
        if dtype == "uint8":
            bad |= ~finite  # uint8 has no missing value
    for row in np.flatnonzero(bad):
        policy.report(
            "malformed_row",
            repr(df["processid"].iloc[row]),
            f"{column} value {raw.iloc[row]!r} is not a valid {dtype}",
        )
    return values, bad


def _short(text: str, width: int = 24) -> str:
    return repr(text if len(text) <= width else text[:width] + "...")


def _chunk_problem(value, split: str) -> str | None:
    """Why ``value`` is not a ``chunk`` of ``split`` (``None`` if it is one): the image folder
    is ``<split>/<chunk>/`` with the first :data:`schema.CHUNK_HEX_CHARS` hex characters of
    md5(processid) as ``<chunk>`` (lower case, leading zeros kept), or ``<split>/`` without one."""
    width = schema.CHUNK_HEX_CHARS.get(split, 0)
    missing = value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)) or value == ""
    if width == 0:
        if missing:
            return None
        return f"bad chunk value {value!r} for split {split!r}: its images have no chunk folder (expected an empty cell)"
    form = f"{width} hex character{'s' if width > 1 else ''} (0-9, a-f), e.g. {'0' * width!r}"
    if missing:
        return f"no chunk value for split {split!r}: expected {form}"
    text = str(value)
    if len(text) == width and all(c in "0123456789abcdef" for c in text):
        return None
    hint = ""
    if 0 < len(text) < width and all(c in "0123456789abcdefABCDEF" for c in text):
        hint = (f"; a leading zero was lost (the CSV went through a tool that read 'chunk' as a number?): "
                f"it should be {text.lower().zfill(width)!r}")
    return f"bad chunk value {text!r} for split {split!r}: expected {form}{hint}"


#: Barcodes normalised at once (:func:`_normalise_barcodes`): bounds the copies it makes.
NORMALISE_CHUNK = 16_384


def _normalise_barcodes(df: pd.DataFrame, keep: np.ndarray, policy: BadRecords) -> None:
    """The BOLD import's rule on ``dna_barcode`` (:func:`dna.normalize_batch`, no truncation), in
    place: a barcode with characters that are not nucleotides is reported (its ``keep`` cleared
    when skipped), one only rewritten (gaps, IUPAC codes, case) is replaced and counted. Run
    :data:`NORMALISE_CHUNK` rows at a time, keeping only the changed values: the whole column at
    once held two more copies of every barcode (7 GB at BIOSCAN-5M's size)."""
    pid, column = df["processid"], df["dna_barcode"]
    usable = keep & column.notna().to_numpy()
    changed_rows, changed_values, examples = [], [], []
    for start in range(0, len(df), NORMALISE_CHUNK):  # slices: no copy of the (Arrow) column
        ok = usable[start:start + NORMALISE_CHUNK]
        rows = start + np.flatnonzero(ok)
        if not rows.size:
            continue
        raw = column.iloc[start:start + NORMALISE_CHUNK].to_numpy(dtype=object)[ok]
        normalised, report = dna.normalize_batch(raw, max_nucleotides=None, errors="count")
        invalid = np.zeros(rows.size, dtype=bool)
        for i, chars in sorted(report["invalid"].items()):
            invalid[i] = True
            shown = ", ".join(f"{c!r} x{n}" for c, n in sorted(chars.items()))
            policy.report("invalid_barcode", repr(pid.iloc[rows[i]]),
                          f"dna_barcode has characters that are not nucleotides ({shown})")
        keep[rows[invalid]] = False
        normalised = np.asarray(normalised, dtype=object)
        changed = np.flatnonzero(~invalid & (normalised != raw))
        examples += [(repr(pid.iloc[rows[i]]), f"dna_barcode {_short(raw[i])} normalised to {_short(normalised[i])} "
                      "(dna.normalize_batch, as the BOLD import)") for i in changed[:max(0, EXAMPLES_KEPT - len(examples))]]
        changed_rows.append(rows[changed])
        changed_values.extend(normalised[changed].tolist())
    if changed_values:
        policy.normalise("dna_barcode", len(changed_values), examples)
        values = df["dna_barcode"].to_numpy(dtype=object, copy=True)
        values[np.concatenate(changed_rows)] = np.asarray(changed_values, dtype=object)
        df["dna_barcode"] = pd.array(values, dtype="string")


def read(
    meta: MetadataFile,
    policy: BadRecords,
    *,
    check_md5: Callable[[str], object] | None = None,
    label_columns: Sequence[str] = schema.LABEL_COLUMNS,
) -> Metadata:
    """Reads and checks the metadata CSV; builds label names over all usable rows.

    ``check_md5`` is called with the file's md5 after the first (streaming) pass,
    before the CSV is parsed into a frame.
    """
    md5, bad_lines = _check_fields(meta, policy)
    if check_md5 is not None:
        check_md5(md5)
    with meta.open() as f:
        try:
            df = pd.read_csv(
                f,
                dtype=str,  # pandas' default NA strings are missing, as bioscan-dataset reads the file
                skiprows=sorted(bad_lines) if bad_lines else None,
            )
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:  # e.g. a quote left open at the end
            raise BadRecordError(f"{meta.name}: unreadable CSV ({' '.join(str(e).split())})") from None
    num_rows_read = len(df) + len(bad_lines)
    keep = np.ones(len(df), dtype=bool)

    pid = df["processid"]
    empty = pid.isna().to_numpy()
    for row in np.flatnonzero(empty):
        policy.report("malformed_row", f"at data row {row}", "empty processid")
    keep &= ~empty

    numeric = {}
    for column, dtype in schema.COLUMN_DTYPES.items():
        if dtype == "string":
            continue
        values, bad = _to_number(df, column, dtype, policy)
        numeric[column] = values
        keep &= ~bad

    split = df["split"]
    unknown = ~split.isin(schema.SPLITS).to_numpy()
    for row in np.flatnonzero(unknown & keep):
        policy.report(
            "unknown_split", repr(pid.iloc[row]), f"unknown split {split.iloc[row]!r}; valid: {', '.join(schema.SPLITS)}"
        )
    keep &= ~unknown

    dup = pid.duplicated(keep="first").to_numpy() & keep
    if dup.any():
        first_row = {p: i for i, p in reversed(list(enumerate(pid.tolist())))}
        for row in np.flatnonzero(dup):
            p = pid.iloc[row]
            policy.report("duplicate_processid", repr(p), f"duplicate processid (first seen at data row {first_row[p]}, again at {row})")
    keep &= ~dup

    # chunk: the image folder of the record; '0' for '00' would only show as a missing image
    chunk = df["chunk"].fillna("")
    width = split.map(schema.CHUNK_HEX_CHARS).fillna(0).to_numpy(dtype=np.int64)
    well_formed = chunk.str.fullmatch("[0-9a-f]*").to_numpy(dtype=bool) & (chunk.str.len().to_numpy() == width)
    for row in np.flatnonzero(keep & ~well_formed):
        policy.report("bad_chunk", repr(pid.iloc[row]), _chunk_problem(df["chunk"].iloc[row], split.iloc[row]))
    keep &= well_formed

    # dna_barcode: the BOLD import's rule (dna.normalize_batch, no truncation); invalid characters
    # skip (or raise for) the record, a barcode only rewritten (gaps, IUPAC codes, case) is kept
    _normalise_barcodes(df, keep, policy)

    for column, (low, high) in VALUE_RANGES.items():  # out of range -> missing; the record stays
        values = numeric[column].to_numpy(dtype=np.float64, na_value=np.nan)
        with np.errstate(invalid="ignore"):
            outside = keep & ~np.isnan(values) & (~np.isfinite(values) | (values < low) | (values > high))
        rows = np.flatnonzero(outside)
        if rows.size:
            examples = [(repr(pid.iloc[r]), f"{column} value {df[column].iloc[r]!r} is outside [{low:g}, {high:g}]; "
                         "made missing") for r in rows[:EXAMPLES_KEPT]]
            policy.clear("out_of_range", column, rows.size, examples)
            numeric[column] = numeric[column].astype("float64").mask(outside)

    for column, values in numeric.items():
        dtype = schema.COLUMN_DTYPES[column]
        df[column] = values.astype("float64") if dtype.startswith("float") else values
    df = df[keep].reset_index(drop=True)
    df = df.astype({c: schema.COLUMN_DTYPES[c] for c in schema.COLUMNS})
    names = schema.label_maps(df, label_columns)
    indices = schema.label_indices(df, names, label_columns)
    first = schema.first_of_barcode(df["dna_barcode"])
    return Metadata(frame=df, label_names=names, label_indices=indices, first_of_barcode=first, md5=md5,
                    num_rows_read=num_rows_read)


# ----------------------------------------------------------------------------- examples


def _text(value) -> str:
    return "" if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)) else str(value)


def iter_examples(meta: Metadata, rows: np.ndarray, *, chunk_rows: int = 4096) -> Iterator[dict]:
    """The metadata features of the given rows (no image), converting a few thousand rows at a time."""
    df = meta.frame
    for start in range(0, len(rows), chunk_rows):
        part = rows[start : start + chunk_rows]
        sub = df.iloc[part]
        cols = {}
        for column, dtype in schema.COLUMN_DTYPES.items():
            series = sub[column]
            if dtype == "string":
                cols[column] = [_text(v) for v in series.tolist()]
            elif dtype.startswith("float"):
                cols[column] = series.to_numpy(dtype=np.float32, na_value=np.nan)
            elif dtype == "uint8":
                cols[column] = series.to_numpy(dtype=np.uint8)
            else:  # nullable int
                cols[column] = series.to_numpy(dtype=np.int64, na_value=schema.MISSING_INDEX)
        index_cols = {c: idx[part] for c, idx in meta.label_indices.items()}
        first = meta.first_of_barcode[part].astype(np.uint8)
        for i in range(len(part)):
            example = {fields.FIRST_OF_BARCODE: first[i]}
            for column, values in cols.items():
                example[fields.feature_name(column)] = values[i]
            for column, idx in index_cols.items():
                example[fields.name_feature(column)] = example[fields.feature_name(column)]
                example[fields.feature_name(column)] = np.int32(idx[i])
            yield example
