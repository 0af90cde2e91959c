"""A user's barcodes for ``bioscan-jax embed`` / ``identify``: FASTA, a BOLD TSV, or any CSV/TSV
with a barcode column. Every record is kept (an empty barcode stays, for a ``status``), and a file
that cannot be read fails with one line naming the file and what was found.
"""

from __future__ import annotations

import os
import pathlib

import pandas as pd

from bioscan_jax.data.bold import SNIFF_BYTES, check_text, one_line

#: Column names accepted for the barcode and for the record id (first match, case-insensitive).
BARCODE_COLUMNS = ("dna_barcode", "nucleotides", "sequence", "barcode", "seq")
ID_COLUMNS = ("processid", "sampleid", "id", "record_id", "name")


def _sniff(path: pathlib.Path) -> bytes:
    """The first bytes of a text file; one line naming the file for gzip, empty or binary data
    (:func:`bioscan_jax.data.bold.check_text`, and a NUL byte anywhere, which parsers drop
    silently)."""
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
        if head[:2] == b"\x1f\x8b":
            raise ValueError(f"{path}: gzip-compressed data; decompress it first (gunzip)")
        if not head.strip():
            raise ValueError(f"{path}: the file is empty")
        check_text(str(path), head)
        offset = len(head)
        for block in iter(lambda: f.read(1 << 20), b""):
            nul = block.find(b"\0")
            if nul >= 0:
                raise ValueError(f"{path}: not a text file (binary data at byte {offset + nul})")
            offset += len(block)
    return head


def read_fasta(path: str | os.PathLike) -> pd.DataFrame:
    """``id`` (the header's first word) and ``dna_barcode`` (lines joined) of each record."""
    ids, seqs, current = [], [], None
    with open(path, encoding="utf-8-sig", errors="replace") as f:  # -sig: a BOM is not text
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if line.startswith(">"):
                header = line[1:].strip()
                ids.append(header.split()[0] if header else f"record_{len(ids) + 1}")
                seqs.append([])
                current = seqs[-1]
            elif current is None:
                raise ValueError(f"{path}: line {line_no}: sequence before the first '>' header")
            else:
                current.append(line)
    if not ids:
        raise ValueError(f"{path}: no FASTA record ('>' header) found")
    return pd.DataFrame({"id": ids, "dna_barcode": ["".join(s) for s in seqs]})


def read_table(path: str | os.PathLike, head: bytes) -> pd.DataFrame:
    """A CSV/TSV (the delimiter is the header line's tab or comma) with a barcode column."""
    first = head.split(b"\n", 1)[0]
    sep = "\t" if b"\t" in first else ","
    try:
        frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding_errors="replace")
    except ValueError as e:  # pandas' ParserError / EmptyDataError: name the file, one line
        kind = "TSV" if sep == "\t" else "CSV"
        raise ValueError(f"{path}: unreadable {kind} ({one_line(str(e).strip())})") from None
    lower = {c.lower(): c for c in frame.columns}
    barcode = next((lower[c] for c in BARCODE_COLUMNS if c in lower), None)
    if barcode is None:
        raise ValueError(f"{path}: no barcode column (looked for {', '.join(BARCODE_COLUMNS)}); "
                         f"columns found: {one_line(', '.join(map(str, frame.columns[:20])))}")
    ident = next((lower[c] for c in ID_COLUMNS if c in lower), None)
    ids = frame[ident].astype(str) if ident else pd.Series([f"row_{i + 1}" for i in range(len(frame))])
    out = pd.DataFrame({"id": ids.to_numpy(), "dna_barcode": frame[barcode].to_numpy()})
    for column in frame.columns:
        if column not in (barcode, ident) and column not in out:
            out[column] = frame[column].to_numpy()
    return out


def read_barcodes(path: str | os.PathLike) -> pd.DataFrame:
    """Records of a FASTA or delimited file: ``id``, ``dna_barcode`` and any other columns.
    Duplicate ids are an error naming the first one."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no input file at {path}")
    head = _sniff(path)
    fasta = head.removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b">")
    frame = read_fasta(path) if fasta else read_table(path, head)
    if frame.empty:
        raise ValueError(f"{path}: no records")
    dup = frame["id"].duplicated()
    if dup.any():
        raise ValueError(f"{path}: record id {frame['id'][dup].iloc[0]!r} appears more than once")
    return frame
