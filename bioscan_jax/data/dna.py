"""DNA barcodes: normalisation, the BarcodeBERT k-mer tokenizer, MLM masking and k-mer counts.

Normalisation rules (one place, used by everything that reads a barcode):

1. Missing barcodes (``None``, NaN, ``pd.NA``, ``""``) are *missing*: an error naming the
   record, or (lenient mode) an all-zero attention mask plus an entry in ``report["missing"]``.
2. Case is ignored, ``U`` becomes ``T``, and the IUPAC ambiguity codes ``RYSWKMBDHV`` and the
   gap characters ``-`` and ``.`` become ``N``. Gaps keep their position, so the reading frame of
   the k-mers after them is the reference's: BarcodeBERT's tokenizer (``barcodebert/datasets.py::
   KmerTokenizer``) reads every character as written and maps any k-mer that is not pure ACGT to
   ``[UNK]``.
3. Any other character is *invalid*: a ``ValueError`` naming the record, the character and its
   position, or (lenient mode, ``errors="count"``) it becomes ``N`` and is counted per record
   in ``report["invalid"]``.
4. Optionally, trailing ``N`` are stripped from the whole barcode (BarcodeBERT's
   ``data/data_split.py`` strips before its tokenizer cuts), then
5. the sequence is truncated to ``max_nucleotides`` (660: the COI-5P barcode is ~658 bp).

A barcode that is empty after these steps (only ``N`` or gaps, with stripping) is missing.

Tokenizer (BarcodeBERT's layout, :class:`KmerTokenizer`): the normalised sequence is padded
with ``N`` to ``max_nucleotides`` and cut into k-mers with a stride (default ``k``: non-overlapping).
Ids: ``[MASK]`` = 0, ``[UNK]`` = 1, then the 4**k ACGT k-mers in ``itertools.product("ACGT")``
order, i.e. ``id = 2 + base-4 value`` with A=0, C=1, G=2, T=3; a k-mer containing any
non-ACGT base is ``[UNK]``. With ``add_cls=True`` one extra id, ``[CLS]`` = ``2 + 4**k``
(= ``vocab_size - 1``), is prepended to every row; the k-mer ids do not move, so weights trained
without it stay valid. The attention mask marks the k-mers that lie wholly inside the
(normalised, truncated) sequence: ``len // k`` tokens for ``stride == k``.

The batch path is vectorised: strings go to one NUL-padded byte matrix (``np.array(...,
dtype="S<n>")``); rows are processed in cache-sized blocks with SWAR arithmetic on ``uint64``
words (8 bytes at a time) for the common alphabet (ACGTN of either case), and with a byte
lookup table for blocks holding anything else (U, IUPAC codes, gaps, invalid bytes). Python
only runs per record to build error messages and reports. A single ``str`` takes a short
per-record path with the same rules. Attention masks are ``bool``. :func:`reference_tokenize` is a plain per-sequence implementation of the
same rules, kept as the executable specification for parity tests and benchmarks.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd

from bioscan_jax.data.schema import MAX_NUCLEOTIDES

__all__ = [
    "TOKENIZATION_PROTOCOLS",
    "TokenizerProtocol",
    "tokenizer_for",
    "MASK_ID",
    "UNK_ID",
    "NUM_SPECIAL",
    "IGNORE_INDEX",
    "NUCLEOTIDES",
    "AMBIGUITY_CODES",
    "GAP_CHARS",
    "VALID_CHARS",
    "MAX_K",
    "ErrorMode",
    "normalize",
    "normalize_batch",
    "KmerTokenizer",
    "random_offsets",
    "mask_tokens",
    "mlm_targets",
    "kmer_counts",
    "kmer_vocab_size",
    "reference_tokenize",
]

# ----------------------------------------------------------------------------- constants

MASK_ID = 0
UNK_ID = 1
#: Ids below this are special; k-mer ids are ``NUM_SPECIAL .. NUM_SPECIAL + 4**k - 1``.
NUM_SPECIAL = 2
#: MLM target value at positions that carry no loss (special tokens, ``[UNK]``, padding).
IGNORE_INDEX = -1
NUCLEOTIDES = "ACGT"
#: IUPAC ambiguity codes; each becomes ``N``.
AMBIGUITY_CODES = "RYSWKMBDHV"
#: Alignment gap characters; each becomes ``N`` (its position is kept).
GAP_CHARS = "-."
#: Every accepted character (either case): ACGT, U, N, the ambiguity codes and the gaps.
_LETTERS = NUCLEOTIDES + "UN" + AMBIGUITY_CODES
VALID_CHARS: frozenset[str] = frozenset(_LETTERS + _LETTERS.lower() + GAP_CHARS)
#: The largest k whose ids fit in int32 (2 + 4**15 < 2**31).
MAX_K = 15

ErrorMode = Literal["raise", "count"]

_SPECIAL_TOKENS = {MASK_ID: "[MASK]", UNK_ID: "[UNK]"}
_CLS_TOKEN = "[CLS]"

# Byte classes of the general path: 0..3 = A, C, G, T; then N-like (N, IUPAC codes, gaps), invalid.
_N_CLASS, _INVALID_CLASS = 4, 6


def _build_byte_classes() -> np.ndarray:
    table = np.full(256, _INVALID_CLASS, dtype=np.uint8)
    for code, base in enumerate(NUCLEOTIDES):
        table[ord(base)] = table[ord(base.lower())] = code
    table[ord("U")] = table[ord("u")] = NUCLEOTIDES.index("T")
    for ch in "N" + AMBIGUITY_CODES:
        table[ord(ch)] = table[ord(ch.lower())] = _N_CLASS
    for ch in GAP_CHARS:
        table[ord(ch)] = _N_CLASS
    table[0] = _N_CLASS  # NUL pads the byte matrix; NULs inside a record are caught separately
    return table


_BYTE_CLASSES = _build_byte_classes()
# t codes (see "byte classification") of normalised text, N and NUL -> 4.
_T_CODES = np.full(256, _N_CLASS, dtype=np.uint8)
_T_CODES[np.frombuffer(b"ACGT", dtype=np.uint8)] = (0, 1, 3, 2)
# str.translate table of the per-sequence path (valid characters only; checked beforehand).
_NORMALIZE_TABLE = str.maketrans(
    {
        **{c.lower(): c for c in NUCLEOTIDES + "N"},
        "U": "T",
        "u": "T",
        **{c: "N" for c in AMBIGUITY_CODES + AMBIGUITY_CODES.lower()},
        **{c: "N" for c in GAP_CHARS},
    }
)

# SWAR constants: one byte repeated over a uint64 word.
_W01, _W03, _W41, _WDF = (np.uint64(b * 0x0101010101010101) for b in (0x01, 0x03, 0x41, 0xDF))
_X11 = np.uint64(0x11)
# Four 2-bit codes in the bytes of a little-endian uint32 -> their base-4 value in bits 24..31.
_PACK4 = np.uint32(0x40100401)
_LITTLE_ENDIAN = sys.byteorder == "little"
# Rows per block are chosen so that a block of the byte matrix is about this many bytes
# (small enough to stay in the L2 cache with its temporaries).
_BLOCK_BYTES = 1 << 18
#: normalize_batch converts at most this many records to a byte matrix at a time.
_CHUNK_RECORDS = 1 << 16


def kmer_vocab_size(k: int) -> int:
    """Number of k-mer classes, 4**k (the MLM head size)."""
    return 4**k


# ----------------------------------------------------------------------------- records & reports


def _is_missing(seq: Any) -> bool:
    if seq is None:
        return True
    if isinstance(seq, (str, bytes)):
        return len(seq) == 0
    try:
        return bool(pd.isna(seq))
    except (TypeError, ValueError):
        return False


def _as_text(seq: Any) -> str:
    """A record as ``str``; bytes are read as Latin-1 so every byte is one character."""
    if isinstance(seq, bytes):
        return seq.decode("latin-1")
    return seq if isinstance(seq, str) else str(seq)


class _Names:
    """Labels records in messages and reports: by name when names are given, else by index.

    ``offset`` is the batch index of the first record (for chunks of a larger batch).
    """

    def __init__(self, names: Sequence[Any] | None, num: int, offset: int = 0):
        if names is not None:
            names = names if isinstance(names, (list, tuple, np.ndarray)) else list(names)
            if len(names) != num:
                raise ValueError(f"got {len(names)} names for {num} sequences")
        self.names, self.offset = names, offset

    def label(self, i: int) -> str:
        if self.names is None:
            return f"record at index {self.offset + i}"
        return f"record {self.names[i]!r} (index {self.offset + i})"

    def key(self, i: int) -> Any:
        return self.offset + i if self.names is None else self.names[i]


def _invalid_characters(text: str) -> tuple[Counter, int]:
    """Counts of the invalid characters of ``text`` and the position of the first one."""
    bad = [(pos, ch) for pos, ch in enumerate(text) if ch not in VALID_CHARS]
    return Counter(ch for _, ch in bad), (bad[0][0] if bad else -1)


def _invalid_message(label: str, text: str) -> str:
    counts, first = _invalid_characters(text)
    ch = text[first]
    others = sum(counts.values()) - 1
    more = f" ({others} more invalid character(s): {dict(counts)})" if others else ""
    return (
        f"{label}: invalid character {ch!r} at position {first} of the DNA barcode{more}. "
        "Allowed: ACGTUN, IUPAC codes RYSWKMBDHV and gaps '-' '.' (either case); "
        "use errors='count' to replace invalid characters by N and count them."
    )


def _new_report(num_records: int) -> dict[str, Any]:
    """The report of a batch: what normalisation changed, per record where it matters.

    Keys: ``records`` (count), ``missing`` (record names, or indices when no names were
    given, of missing or empty barcodes), ``invalid`` (name -> {character: count}),
    ``invalid_chars`` (total count), ``truncated`` (how many were longer than
    ``max_nucleotides`` after normalisation).
    """
    return {"records": num_records, "missing": [], "invalid": {}, "invalid_chars": 0, "truncated": 0}


# ----------------------------------------------------------------------------- per-sequence path


def normalize(
    seq: str | bytes | None,
    *,
    max_nucleotides: int | None = MAX_NUCLEOTIDES,
    strip_trailing_n: bool = False,
    name: Any = None,
) -> str:
    """Normalises one barcode (rules in the module docstring); strict.

    ``max_nucleotides=None`` keeps the whole sequence. Raises ``ValueError`` naming the record
    (``name``) for a missing or empty barcode and for an invalid character.
    """
    label = f"record {name!r}" if name is not None else "record"
    if _is_missing(seq):
        raise ValueError(f"{label}: missing DNA barcode ({seq!r})")
    text = _as_text(seq)
    if not VALID_CHARS.issuperset(text):
        raise ValueError(_invalid_message(label, text))
    out = text.translate(_NORMALIZE_TABLE)
    if strip_trailing_n:
        out = out.rstrip("N")
    if max_nucleotides is not None:
        out = out[:max_nucleotides]
    if not out:
        raise ValueError(f"{label}: DNA barcode {text[:40]!r} is empty after normalisation")
    return out


@functools.lru_cache(maxsize=8)
def _kmer_dict(k: int) -> dict[str, int]:
    return {"".join(p): NUM_SPECIAL + i for i, p in enumerate(itertools.product(NUCLEOTIDES, repeat=k))}


def reference_tokenize(
    seq: str | bytes,
    k: int,
    *,
    stride: int | None = None,
    max_nucleotides: int = MAX_NUCLEOTIDES,
    add_cls: bool = False,
    strip_trailing_n: bool = False,
    offset: int = 0,
) -> tuple[list[int], list[int]]:
    """Per-sequence tokenizer: the plain-Python statement of :class:`KmerTokenizer`'s rules.

    Slices k-mers and looks them up in a dict built with ``itertools.product``. Used by parity
    tests and the benchmark; strict on bad input. Returns ``(ids, attention_mask)`` lists.
    """
    stride = k if stride is None else stride
    text = normalize(seq, max_nucleotides=None)  # raises on missing or invalid barcodes
    if strip_trailing_n:
        text = text.rstrip("N")
        if not text:
            raise ValueError(f"record: DNA barcode {seq[:40]!r} is empty after normalisation")
    text = text[offset:][:max_nucleotides]
    padded = text + "N" * (max_nucleotides - len(text))
    vocab = _kmer_dict(k)
    ids = [vocab.get(padded[i : i + k], UNK_ID) for i in range(0, max_nucleotides - k + 1, stride)]
    n_valid = (len(text) - k) // stride + 1 if len(text) >= k else 0
    mask = [1] * n_valid + [0] * (len(ids) - n_valid)
    if add_cls:
        ids = [NUM_SPECIAL + 4**k] + ids
        mask = [1] + mask
    return ids, mask


# ----------------------------------------------------------------------------- batch -> byte matrix


class _ByteRows:
    """A batch as a NUL-padded ``uint8`` matrix, with raw lengths and missing flags."""

    originals: Any  # the records as given (for error messages and reports)
    lengths: np.ndarray  # int64 [B]: characters per record
    missing: np.ndarray  # bool [B]: None / NaN / NA / empty
    u8: np.ndarray  # uint8 [B, W]: W a multiple of 8, NUL-padded

    def __init__(self, seqs: Any, *, min_width: int):
        if isinstance(seqs, np.ndarray) and seqs.dtype.kind in "SU":
            if seqs.ndim != 1:
                raise ValueError(f"expected a 1-D batch of sequences, got shape {seqs.shape}")
            self.originals = seqs
            self.lengths = np.strings.str_len(seqs).astype(np.int64)
            self.missing = self.lengths == 0
            width = self._width(int(self.lengths.max(initial=0)), min_width)
            arr = self._encode(seqs, width)
        else:
            obj = seqs.to_numpy(dtype=object) if isinstance(seqs, pd.Series) else np.asarray(seqs, dtype=object)
            if obj.ndim != 1:
                raise ValueError(f"expected a 1-D batch of sequences, got shape {obj.shape}")
            self.missing = np.asarray(pd.isna(obj), dtype=bool)
            if self.missing.any():
                obj = obj.copy()
                obj[self.missing] = ""
            try:
                self.lengths = np.fromiter(map(len, obj), dtype=np.int64, count=len(obj))
            except TypeError:  # non-string records (numbers, ...): their str() is validated
                obj = np.array([s if isinstance(s, (str, bytes)) else str(s) for s in obj], dtype=object)
                self.lengths = np.fromiter(map(len, obj), dtype=np.int64, count=len(obj))
            self.missing |= self.lengths == 0
            self.originals = obj
            width = self._width(int(self.lengths.max(initial=0)), min_width)
            arr = self._encode(obj, width)
        self.u8 = arr.view(np.uint8).reshape(len(arr), arr.dtype.itemsize)

    @staticmethod
    def _width(max_len: int, min_width: int) -> int:
        return -(-max(max_len, min_width, 1) // 8) * 8  # a multiple of 8: rows view as uint64

    def _encode(self, seqs: np.ndarray, width: int) -> np.ndarray:
        try:
            return np.asarray(seqs).astype(f"S{width}")
        except UnicodeEncodeError:  # non-ASCII text: one '?' per character, reported as invalid
            fixed = [s.encode("ascii", "replace") if isinstance(s, str) else s for s in seqs]
            return np.array(fixed, dtype=f"S{width}")

    def __len__(self) -> int:
        return self.u8.shape[0]


# ----------------------------------------------------------------------------- byte classification
#
# Both paths give, per byte, a 2-bit code ``t`` (A0 C1 G3 T2: bits 1-2 of the ASCII letter,
# the same for lower case) and an ``is_acgt`` flag. Packed k-mer values of ``t`` become
# base-4 values (A0 C1 G2 T3) with one XOR at the end, ``v ^ ((v >> 1) & 0b0101...)``, which
# swaps G and T in every 2-bit field: cheaper than fixing every byte.


def _classify_fast(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """SWAR classification of a block of ``uint8`` rows whose width is a multiple of 8.

    Returns ``t`` codes (uint8 0..3, meaningful at ACGT bytes of either case), ``is_acgt``
    (bool), the number of NUL bytes and the number of bytes that are neither ACGT, N nor NUL.
    """
    x64 = x.view(np.uint64)
    t = x64 >> np.uint64(1)
    t &= _W03
    # The letter each byte must be if it is a nucleotide: 0x41 | t << 1 is A, C, G or 'E';
    # 'E' ^ 0x11 == 'T' where t == 2.
    is_t = t >> np.uint64(1)
    is_t &= t ^ _W01
    is_t *= _X11
    expected = t << np.uint64(1)
    expected |= _W41
    expected ^= is_t
    upper = x64 & _WDF
    upper8 = upper.view(np.uint8)
    is_acgt = upper8 == expected.view(np.uint8)
    n_nul = x.size - np.count_nonzero(x)
    n_other = x.size - n_nul - np.count_nonzero(is_acgt) - np.count_nonzero(upper8 == ord("N"))
    return t.view(np.uint8), is_acgt, int(n_nul), int(n_other)


class _BlockContext:
    """What the general path needs to report or raise about the rows of one block."""

    def __init__(self, rows: _ByteRows, names: _Names, errors: ErrorMode, report: dict):
        self.rows, self.names, self.errors, self.report = rows, names, errors, report

    def invalid_rows(self, indices: np.ndarray) -> None:
        for i in indices.tolist():
            text = _as_text(self.rows.originals[i])
            if self.errors == "raise":
                raise ValueError(_invalid_message(self.names.label(i), text))
            counts, _ = _invalid_characters(text)
            self.report["invalid"][self.names.key(i)] = dict(counts)
            self.report["invalid_chars"] += sum(counts.values())


def _classify_general(
    x: np.ndarray, lengths: np.ndarray, first_row: int, ctx: _BlockContext
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lookup-table classification: U, IUPAC, gaps, NULs and invalid bytes.

    Returns ``t`` codes, ``is_acgt`` and the lengths (gaps are N-like, so lengths do not change).
    """
    classes = _BYTE_CLASSES[x]
    inside = np.arange(x.shape[1]) < lengths[:, None]
    invalid = (classes == _INVALID_CLASS) | ((x == 0) & inside)
    bad_rows = np.flatnonzero(invalid.any(axis=1))
    if bad_rows.size:
        ctx.invalid_rows(bad_rows + first_row)
        classes[invalid] = _N_CLASS
    t = classes ^ (classes >> 1)  # A0 C1 G2 T3 -> A0 C1 G3 T2
    t &= np.uint8(3)
    return t, classes < _N_CLASS, lengths


def _classify_block(
    rows: _ByteRows, start: int, stop: int, width: int, ctx: _BlockContext
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes, ACGT flags and normalised lengths of rows ``start:stop``.

    Codes are needed for the first ``width`` columns (a multiple of 8); the rest of a longer
    record is only validated. Blocks with anything beyond ACGTN go to the general path.
    """
    x = rows.u8[start:stop]
    lengths = rows.lengths[start:stop]
    width = min(width, x.shape[1])
    codes, is_acgt, n_nul, n_other = _classify_fast(x[:, :width])
    n_nul -= x.shape[0] * width - int(np.minimum(lengths, width).sum())  # NULs beyond the padding
    long = lengths > width
    if long.any() and n_nul == 0 and n_other == 0:
        tail = x[long, width:]
        _, _, tail_nul, n_other = _classify_fast(tail)
        n_nul = tail_nul - (tail.size - int((lengths[long] - width).sum()))
    if n_other == 0 and n_nul == 0:
        return codes, is_acgt, lengths
    return _classify_general(x, lengths, start, ctx)


# ----------------------------------------------------------------------------- k-mers


def _swap_g_t(values: np.ndarray, k: int) -> None:
    """In place: packed ``t`` codes (A0 C1 G3 T2) -> base-4 values (A0 C1 G2 T3)."""
    low_bits = values.dtype.type(int("01" * k, 2))
    values ^= (values >> values.dtype.type(1)) & low_bits


def _kmer_values(codes: np.ndarray, is_acgt: np.ndarray, start: int, k: int, stride: int, num: int):
    """Base-4 values of ``num`` k-mers per row from column ``start``, and their all-ACGT flags."""
    span = (num - 1) * stride + k
    if stride == k and k % 4 == 0 and _LITTLE_ENDIAN:
        # Four bases per uint32 word; one multiply packs their 2-bit codes into the top byte.
        c = codes[:, start : start + span]
        a = is_acgt[:, start : start + span]
        if start % 4:
            c, a = np.ascontiguousarray(c), np.ascontiguousarray(a)
        value = c.view(np.uint32) * _PACK4
        value >>= np.uint32(24)
        ok = a.view(np.uint32) == np.uint32(0x01010101)
        per = k // 4
        if per > 1:
            acc, all_ok = value[:, 0::per].copy(), ok[:, 0::per].copy()
            for j in range(1, per):
                acc <<= np.uint32(8)
                acc |= value[:, j::per]
                all_ok &= ok[:, j::per]
            value, ok = acc, all_ok
    else:
        acc_dtype = np.uint16 if k <= 8 else np.uint32
        stop = start + (num - 1) * stride + 1
        value = codes[:, start:stop:stride].astype(acc_dtype)
        ok = is_acgt[:, start:stop:stride].copy()
        two = acc_dtype(2)
        for j in range(1, k):
            value <<= two
            value |= codes[:, start + j : stop + j : stride]
            ok &= is_acgt[:, start + j : stop + j : stride]
    _swap_g_t(value, k)
    return value, ok


def _write_kmer_ids(out: np.ndarray, value: np.ndarray, ok: np.ndarray) -> None:
    """``out[...] = value + 2`` where all bases are ACGT, else ``[UNK]``; reuses ``value``.

    Written as ``(value + 1) * ok + 1``: plain int32 arithmetic, faster than a masked copy.
    """
    v = value.view(np.int32) if value.dtype == np.uint32 else value.astype(np.int32)
    v += NUM_SPECIAL - UNK_ID
    v *= ok.view(np.uint8)
    np.add(v, UNK_ID, out=out)


def _strip_trailing_n(is_acgt: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Lengths after removing trailing non-ACGT (``N``) bases from each row's first ``length``
    columns (``is_acgt`` must span them: the whole barcode, for BarcodeBERT's rule)."""
    width = int(lengths.max(initial=0))
    if width == 0:
        return lengths
    window = is_acgt[:, :width] & (np.arange(width) < lengths[:, None])
    from_end = np.argmax(window[:, ::-1], axis=1)
    return np.where(window.any(axis=1), width - from_end, 0)


# ----------------------------------------------------------------------------- public batch API


def _check_errors(errors: str) -> None:
    if errors not in ("raise", "count"):
        raise ValueError(f"errors must be 'raise' or 'count', got {errors!r}")


def _check_missing(rows: _ByteRows, names: _Names, errors: ErrorMode, report: dict) -> None:
    missing = np.flatnonzero(rows.missing)
    if missing.size == 0:
        return
    if errors == "raise":
        i = int(missing[0])
        raise ValueError(
            f"{names.label(i)}: missing DNA barcode ({rows.originals[i]!r})"
            f"{f'; {missing.size - 1} more missing in this batch' if missing.size > 1 else ''}. "
            "Use errors='count' to keep such records with an all-zero attention mask."
        )
    report["missing"].extend(names.key(i) for i in missing.tolist())


def _mark_empty(
    empty: np.ndarray, rows: _ByteRows, first_row: int, names: _Names, errors: ErrorMode, report: dict
) -> None:
    """Records that normalise to nothing (only gaps, or only N when stripping) count as missing."""
    for i in (np.flatnonzero(empty & ~rows.missing[first_row : first_row + empty.size]) + first_row).tolist():
        if errors == "raise":
            text = _as_text(rows.originals[i])
            raise ValueError(f"{names.label(i)}: DNA barcode {text[:40]!r} is empty after normalisation")
        report["missing"].append(names.key(i))
        rows.missing[i] = True


def normalize_batch(
    seqs: Any,
    names: Sequence[Any] | None = None,
    *,
    max_nucleotides: int | None = MAX_NUCLEOTIDES,
    strip_trailing_n: bool = False,
    errors: ErrorMode = "raise",
) -> tuple[list[str], dict[str, Any]]:
    """Normalises a batch (list / array / Series of str or bytes); vectorised.

    Returns the normalised strings (``""`` for missing records in lenient mode) and a report
    (see :func:`_new_report`). ``errors="raise"`` raises ``ValueError`` naming the first bad
    record; ``errors="count"`` replaces invalid characters by ``N`` and reports them. Large
    inputs are processed :data:`_CHUNK_RECORDS` records at a time to bound memory.
    """
    _check_errors(errors)
    if isinstance(seqs, (str, bytes)):
        seqs = [seqs]
    if isinstance(seqs, pd.Series):
        seqs = seqs.to_numpy(dtype=object)
    all_names = _Names(names, len(seqs)).names
    out: list[str] = []
    report = _new_report(len(seqs))
    for start in range(0, len(seqs), _CHUNK_RECORDS):
        stop = min(start + _CHUNK_RECORDS, len(seqs))
        chunk_names = _Names(None if all_names is None else all_names[start:stop], stop - start, start)
        out.extend(_normalize_chunk(seqs[start:stop], chunk_names, max_nucleotides, strip_trailing_n, errors, report))
    return out, report


def _normalize_chunk(
    seqs: Any,
    names: _Names,
    max_nucleotides: int | None,
    strip_trailing_n: bool,
    errors: ErrorMode,
    report: dict[str, Any],
) -> list[str]:
    """:func:`normalize_batch` on one chunk; adds to ``report``."""
    rows = _ByteRows(seqs, min_width=0)
    _check_missing(rows, names, errors, report)
    ctx = _BlockContext(rows, names, errors, report)
    out: list[str] = []
    block = max(1, _BLOCK_BYTES // rows.u8.shape[1])
    letters = np.frombuffer(b"ACTGN", dtype=np.uint8)  # indexed by the t code, N last
    for start in range(0, len(rows), block):
        stop = min(start + block, len(rows))
        codes, is_acgt, lengths = _classify_block(rows, start, stop, rows.u8.shape[1], ctx)
        if strip_trailing_n:
            lengths = _strip_trailing_n(is_acgt, lengths)
        if max_nucleotides is not None:
            report["truncated"] += int(np.count_nonzero(lengths > max_nucleotides))
            lengths = np.minimum(lengths, max_nucleotides)
        _mark_empty(lengths == 0, rows, start, names, errors, report)
        chars = letters[np.where(is_acgt, codes, 4)]
        chars[np.arange(chars.shape[1]) >= lengths[:, None]] = 0
        out.extend(chars.view(f"S{chars.shape[1]}").ravel().astype(str).tolist())
    return out


def random_offsets(rng: np.random.Generator | int, batch_size: int, k: int) -> np.ndarray:
    """BarcodeBERT's training augmentation: how many leading nucleotides to drop, ``randint(k)``."""
    return np.random.default_rng(rng).integers(0, k, size=batch_size, dtype=np.int32)


class KmerTokenizer:
    """BarcodeBERT's k-mer tokenizer, vectorised over a batch (see the module docstring).

    Args:
      k: k-mer length, 1..15.
      stride: step between k-mers; default ``k`` (non-overlapping); ``stride < k`` overlaps.
      max_nucleotides: sequences are truncated / padded with N to this length.
      add_cls: prepend ``[CLS]`` (id ``cls_id = 2 + 4**k = vocab_size - 1``) to every row.
      strip_trailing_n: remove trailing N from the whole barcode before the cut to
        ``max_nucleotides`` (BarcodeBERT strips in ``data/data_split.py``; its tokenizer does not).

    Attributes: ``num_tokens`` (row length T), ``vocab_size``, ``num_kmers`` (4**k),
    ``cls_id`` (``None`` without CLS).
    """

    def __init__(
        self,
        k: int,
        *,
        stride: int | None = None,
        max_nucleotides: int = MAX_NUCLEOTIDES,
        add_cls: bool = False,
        strip_trailing_n: bool = False,
    ):
        if not 1 <= k <= MAX_K:
            raise ValueError(f"k must be in 1..{MAX_K} (ids are int32), got {k}")
        stride = k if stride is None else stride
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        if max_nucleotides < k:
            raise ValueError(f"max_nucleotides ({max_nucleotides}) must be >= k ({k})")
        self.k, self.stride, self.max_nucleotides = k, stride, max_nucleotides
        self.add_cls, self.strip_trailing_n = add_cls, strip_trailing_n
        self.num_kmers = 4**k
        self.cls_id: int | None = NUM_SPECIAL + self.num_kmers if add_cls else None
        self.vocab_size = NUM_SPECIAL + self.num_kmers + int(add_cls)
        self.num_kmer_tokens = (max_nucleotides - k) // stride + 1
        self.num_tokens = self.num_kmer_tokens + int(add_cls)

    def __repr__(self) -> str:
        return (
            f"KmerTokenizer(k={self.k}, stride={self.stride}, max_nucleotides={self.max_nucleotides}, "
            f"add_cls={self.add_cls}, strip_trailing_n={self.strip_trailing_n})"
        )

    def __call__(
        self,
        seqs: Any,
        *,
        names: Sequence[Any] | None = None,
        offsets: np.ndarray | Sequence[int] | None = None,
        errors: ErrorMode = "raise",
    ) -> tuple[np.ndarray, np.ndarray]:
        """Tokenises a batch: ``(ids int32 [B, T], attention_mask bool [B, T])``.

        ``seqs``: a list / tuple / 1-D array / Series of str or bytes; a single str or bytes
        gives 1-D outputs. ``names`` label records in errors and reports (e.g. processids).
        ``offsets`` (ints in ``0..``): drop that many leading nucleotides of each normalised
        sequence before truncation (see :func:`random_offsets`). For the report of lenient
        mode use :meth:`tokenize`.
        """
        ids, mask, _ = self.tokenize(seqs, names=names, offsets=offsets, errors=errors)
        return ids, mask

    def tokenize(
        self,
        seqs: Any,
        *,
        names: Sequence[Any] | None = None,
        offsets: np.ndarray | Sequence[int] | None = None,
        errors: ErrorMode = "raise",
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Like ``__call__`` but also returns the report; it adds ``no_tokens``: records
        (not missing) too short to give one complete k-mer, whose mask is all zero too."""
        _check_errors(errors)
        if isinstance(seqs, (str, bytes)):
            return self._tokenize_one(seqs, names, offsets, errors)
        offs = None
        max_offset = 0
        if offsets is not None:
            offs = np.asarray(offsets, dtype=np.int64).reshape(-1)
            if offs.size and offs.min() < 0:
                raise ValueError("offsets must be >= 0")
            max_offset = int(offs.max(initial=0))
        rows = _ByteRows(seqs, min_width=self.max_nucleotides + max_offset)
        names = _Names(names, len(rows))
        if offs is not None and offs.size != len(rows):
            raise ValueError(f"got {offs.size} offsets for {len(rows)} sequences")
        report = _new_report(len(rows))
        report["no_tokens"] = []
        _check_missing(rows, names, errors, report)
        ctx = _BlockContext(rows, names, errors, report)

        num, first = self.num_kmer_tokens, int(self.add_cls)
        ids = np.empty((len(rows), self.num_tokens), dtype=np.int32)
        mask = np.empty((len(rows), self.num_tokens), dtype=bool)
        if self.add_cls:
            ids[:, 0] = self.cls_id
            mask[:, 0] = True
        width = _ByteRows._width(self.max_nucleotides + max_offset, 0)  # columns that need codes
        block = max(1, _BLOCK_BYTES // rows.u8.shape[1])
        for start in range(0, len(rows), block):
            stop = min(start + block, len(rows))
            codes, is_acgt, lengths = _classify_block(rows, start, stop, width, ctx)
            report["truncated"] += int(np.count_nonzero(lengths > self.max_nucleotides))
            lengths = lengths.astype(np.int32)
            if self.strip_trailing_n:  # strip the whole barcode, then cut (data_split.py, then the tokenizer)
                # ``is_acgt`` covers only the columns that need codes: classify the whole rows
                whole = _BYTE_CLASSES[rows.u8[start:stop]] < _N_CLASS
                lengths = _strip_trailing_n(whole, lengths).astype(np.int32)
            _mark_empty(lengths == 0, rows, start, names, errors, report)
            if offs is None:  # write straight into the outputs
                self._fill(ids[start:stop, first:], mask[start:stop, first:], codes, is_acgt, lengths, 0)
                continue
            for offset, sel in _offset_groups(offs[start:stop]):
                group_ids = np.empty((sel.size, num), dtype=np.int32)
                group_mask = np.empty((sel.size, num), dtype=bool)
                self._fill(group_ids, group_mask, codes[sel], is_acgt[sel], lengths[sel], offset)
                ids[sel + start, first:], mask[sel + start, first:] = group_ids, group_mask
        missing = np.flatnonzero(rows.missing)
        mask[missing] = False
        ids[missing, first:] = UNK_ID
        no_tokens = ~mask[:, first:].any(axis=1) & ~rows.missing
        report["no_tokens"] = [names.key(i) for i in np.flatnonzero(no_tokens).tolist()]
        return ids, mask, report

    def _fill(
        self,
        ids: np.ndarray,
        mask: np.ndarray,
        codes: np.ndarray,
        is_acgt: np.ndarray,
        lengths: np.ndarray,
        offset: int,
    ) -> None:
        """Writes the k-mer ids and mask of rows with normalised ``lengths``, from column ``offset``."""
        n = np.minimum(lengths - offset, self.max_nucleotides)  # lengths already stripped when asked
        if offset:
            n = np.maximum(n, 0)
        n_valid = n - (self.k - self.stride)
        n_valid //= self.stride  # (n - k) // stride + 1, and <= 0 when n < k
        value, ok = _kmer_values(codes, is_acgt, offset, self.k, self.stride, self.num_kmer_tokens)
        _write_kmer_ids(ids, value, ok)
        np.less(np.arange(self.num_kmer_tokens, dtype=np.int32), n_valid[:, None], out=mask)

    def _tokenize_one(
        self, seq: str | bytes, names: Any, offsets: Any, errors: ErrorMode
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """One record (e.g. in a per-record input pipeline): the same rules without the batch
        bookkeeping. ``names`` and ``offsets`` may be scalars or 1-element sequences."""
        name = names[0] if isinstance(names, (list, tuple, np.ndarray, pd.Series)) else names
        offset = int(np.asarray(offsets).reshape(-1)[0]) if offsets is not None else 0
        if offset < 0:
            raise ValueError("offsets must be >= 0")
        names_one = _Names(None if name is None else [name], 1)
        label, key = names_one.label(0), names_one.key(0)
        report = _new_report(1)
        report["no_tokens"] = []
        first = int(self.add_cls)
        ids = np.full(self.num_tokens, UNK_ID, dtype=np.int32)
        mask = np.zeros(self.num_tokens, dtype=bool)
        text = "" if _is_missing(seq) else _as_text(seq)
        if text and not VALID_CHARS.issuperset(text):
            if errors == "raise":
                raise ValueError(_invalid_message(label, text))
            counts, _ = _invalid_characters(text)
            report["invalid"][key] = dict(counts)
            report["invalid_chars"] = sum(counts.values())
            text = "".join(ch if ch in VALID_CHARS else "N" for ch in text)
        normalised = text.translate(_NORMALIZE_TABLE)
        if self.strip_trailing_n:  # the whole barcode, before the cut (data_split.py)
            normalised = normalised.rstrip("N")
        if not normalised:
            if errors == "raise":
                what = "missing DNA barcode" if not text else f"DNA barcode {text[:40]!r} is empty after normalisation"
                raise ValueError(f"{label}: {what}")
            report["missing"].append(key)
            return ids, mask, report
        report["truncated"] = int(len(normalised) > self.max_nucleotides)
        part = normalised[offset:][: self.max_nucleotides]
        padded = np.zeros((1, _ByteRows._width(self.max_nucleotides, 0)), dtype=np.uint8)
        padded[0, : len(part)] = np.frombuffer(part.encode("ascii"), dtype=np.uint8)
        codes = _T_CODES[padded]  # ``part`` holds ACGTN only
        is_acgt = codes < _N_CLASS
        value, ok = _kmer_values(codes, is_acgt, 0, self.k, self.stride, self.num_kmer_tokens)
        _write_kmer_ids(ids[None, first:], value, ok)
        n_valid = (len(part) - self.k) // self.stride + 1 if len(part) >= self.k else 0
        mask[first : first + n_valid] = True
        if self.add_cls:
            ids[0], mask[0] = self.cls_id, True
        if n_valid == 0:
            report["no_tokens"].append(key)
        return ids, mask, report

    def decode(self, ids: np.ndarray | Sequence[int]) -> list:
        """Token strings for ``ids`` of any shape (nested lists): k-mers, ``[MASK]``, ``[UNK]``,
        ``[CLS]``. Raises ``ValueError`` for ids outside the vocabulary."""
        ids = np.asarray(ids)
        flat = ids.reshape(-1).astype(np.int64)
        if flat.size and (flat.min() < 0 or flat.max() >= self.vocab_size):
            raise ValueError(f"ids must be in [0, {self.vocab_size}), got range [{flat.min()}, {flat.max()}]")
        value = np.clip(flat - NUM_SPECIAL, 0, self.num_kmers - 1)
        shifts = 2 * np.arange(self.k - 1, -1, -1)
        digits = ((value[:, None] >> shifts) & 3).astype(np.uint8)
        letters = np.frombuffer(NUCLEOTIDES.encode(), dtype=np.uint8)[digits]
        tokens = letters.view(f"S{self.k}").reshape(-1).astype(str).astype(object)
        for special_id, token in _SPECIAL_TOKENS.items():
            tokens[flat == special_id] = token
        if self.cls_id is not None:
            tokens[flat == self.cls_id] = _CLS_TOKEN
        return tokens.reshape(ids.shape).tolist()

    def mask_tokens(self, ids, rng, p: float = 0.5, *, attention_mask=None, draws=None):
        """:func:`mask_tokens` with this tokenizer's k (so ``[CLS]`` is never masked)."""
        return mask_tokens(ids, rng, p, attention_mask=attention_mask, k=self.k, draws=draws)

    def mlm_targets(self, ids, masked_positions=None, *, masked_only: bool = False):
        """:func:`mlm_targets` with this tokenizer's k."""
        return mlm_targets(ids, masked_positions, masked_only=masked_only, k=self.k)


@dataclasses.dataclass(frozen=True)
class TokenizerProtocol:
    """How a model family turns a barcode into token ids: the rules that belong to the model,
    not to the task that happens to train or evaluate it.

    The vocabulary layout (``[MASK]``, ``[UNK]``, k-mers in product order) is this module's for
    every protocol: checkpoints with another layout (v1's ``<MASK>``, ``<CLS>``, ``<UNK>``) have
    their embedding rows mapped when loaded (:mod:`bioscan_jax.convert.barcodebert`), and CLIBD's
    prepended id 0 is added by its DNA tower (:mod:`bioscan_jax.models.towers`).
    """

    name: str
    #: remove trailing N from the whole barcode before the cut to ``max_nucleotides``
    strip_trailing_n: bool
    #: where the rule comes from (reference repository, file, function)
    source: str


#: The tokenisation protocols of the references, by name (``config.model.tokenization``).
TOKENIZATION_PROTOCOLS: dict[str, TokenizerProtocol] = {
    p.name: p
    for p in (
        TokenizerProtocol(
            "bioscan5m", strip_trailing_n=True,
            source="BarcodeBERT (BIOSCAN-5M branch) data/data_split.py: dna_barcode.str.rstrip('N') before "
                   "barcodebert/datasets.py::KmerTokenizer; zs-ssl-clustering strips every DNA encoder's input"),
        TokenizerProtocol(
            "v1", strip_trailing_n=False,
            source="BarcodeBERT v1 and CLIBD (bioscanclip/model/dna_encoder.py): the barcode as stored, cut or "
                   "padded with N to 660 nt"),
    )
}


def tokenizer_for(
    protocol: str | TokenizerProtocol,
    k: int,
    *,
    max_nucleotides: int = MAX_NUCLEOTIDES,
    stride: int | None = None,
) -> KmerTokenizer:
    """The tokenizer of a model protocol (:data:`TOKENIZATION_PROTOCOLS`): the one place the
    library builds a :class:`KmerTokenizer`. ``stride`` other than ``k`` is for k-mer profiles
    (overlapping windows), not for a BarcodeBERT model."""
    if isinstance(protocol, str):
        if protocol not in TOKENIZATION_PROTOCOLS:
            raise ValueError(f"unknown tokenization protocol {protocol!r}; valid: {', '.join(TOKENIZATION_PROTOCOLS)}")
        protocol = TOKENIZATION_PROTOCOLS[protocol]
    return KmerTokenizer(k, stride=stride, max_nucleotides=max_nucleotides, strip_trailing_n=protocol.strip_trailing_n)


def _offset_groups(offsets: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Rows grouped by offset: at most ``k`` groups, each handled as one vectorised slice."""
    return [(int(o), np.flatnonzero(offsets == o)) for o in np.unique(offsets)]


# ----------------------------------------------------------------------------- MLM & counts


def _kmer_positions(ids: np.ndarray, k: int | None) -> np.ndarray:
    """True where ``ids`` hold a k-mer (not ``[MASK]``, ``[UNK]``/padding or ``[CLS]``)."""
    is_kmer = ids >= NUM_SPECIAL
    if k is not None:
        is_kmer &= ids < NUM_SPECIAL + 4**k
    return is_kmer


def mask_tokens(
    ids: np.ndarray,
    rng: np.random.Generator | int,
    p: float = 0.5,
    *,
    attention_mask: np.ndarray | None = None,
    k: int | None = None,
    draws: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """BarcodeBERT's masking: each k-mer token becomes ``[MASK]`` with probability ``p``.

    ``[UNK]`` (hence padding), ``[MASK]`` and, when ``k`` is given, ``[CLS]`` are never masked,
    nor positions where ``attention_mask`` is false. No 80/10/10 replacement. ``rng`` is a
    ``np.random.Generator`` or a seed (same seed, same masks). Returns ``(masked_ids,
    masked_positions)``; ``masked_positions`` is bool with the shape of ``ids``. ``draws``
    (uniform [0, 1) with the shape of ``ids``) replaces the draws from ``rng``, e.g. one stream per
    record (:data:`bioscan_jax.data.pipeline.RNG_KEY`).
    """
    ids = np.asarray(ids)
    eligible = _kmer_positions(ids, k)
    if attention_mask is not None:
        eligible &= np.asarray(attention_mask, dtype=bool)
    if draws is None:
        draws = np.random.default_rng(rng).random(ids.shape, dtype=np.float32)
    masked = eligible & (draws < p)
    return np.where(masked, np.asarray(MASK_ID, dtype=ids.dtype), ids), masked


def mlm_targets(
    ids: np.ndarray,
    masked_positions: np.ndarray | None = None,
    *,
    masked_only: bool = False,
    k: int | None = None,
) -> np.ndarray:
    """MLM classes over the 4**k k-mers: ``id - 2`` at k-mer positions, ``IGNORE_INDEX`` (-1)
    elsewhere (``[MASK]``, ``[UNK]``, padding, ``[CLS]`` when ``k`` is given).

    ``ids`` are the *unmasked* ids. BarcodeBERT takes the loss on every k-mer position (masked
    and unmasked), the default; ``masked_only=True`` keeps only ``masked_positions``.
    """
    ids = np.asarray(ids)
    keep = _kmer_positions(ids, k)
    if masked_only:
        if masked_positions is None:
            raise ValueError("masked_only=True needs masked_positions")
        keep &= np.asarray(masked_positions, dtype=bool)
    return np.where(keep, ids - NUM_SPECIAL, IGNORE_INDEX).astype(np.int32)


def kmer_counts(ids: np.ndarray, k: int, *, dtype: npt.DTypeLike = np.int32) -> np.ndarray:
    """Count vector per row, ``(B, 4**k)``, over the k-mer ids of ``ids`` (``[B, T]``).

    Special tokens, ``[UNK]`` and padding are not counted. For overlapping counts, tokenise
    with ``stride=1``. Memory is ``B * 4**k`` entries: mind k >= 8.
    """
    ids = np.asarray(ids)
    if ids.ndim == 1:
        ids = ids[None]
    rows, cols = np.nonzero(_kmer_positions(ids, k))
    counts = np.zeros((ids.shape[0], 4**k), dtype=dtype)
    np.add.at(counts, (rows, ids[rows, cols] - NUM_SPECIAL), 1)
    return counts
