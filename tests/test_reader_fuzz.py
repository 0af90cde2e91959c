"""Fuzzing the input readers: on any bytes, each reader returns, or raises ``ValueError`` /
``FileNotFoundError`` with a one-line message naming the file. Any other exception, or a message
of several lines or without the file's name, is a bug.

Readers: the BOLD TSV and FASTA import (:mod:`bioscan_jax.data.bold`), the CLI's query reader
(:func:`bioscan_jax.data.specimens.read_barcodes`: FASTA, CSV, TSV) and the TFDS builder's
metadata CSV reader (:func:`tfds_builder.bioscan5m.records.read`). The inputs have structure --
headers with the real column names, rows of cells holding tabs, commas, quotes, CR, NUL, line
breaks of other kinds, non-UTF-8 bytes, blank lines, rows with fields lost or added -- or are
arbitrary bytes. Seeded (``derandomize``) and sized to run in well under 30 s.
"""

from __future__ import annotations

import pathlib

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bioscan_jax.data import bold, schema, specimens

_SETTINGS = dict(deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

#: Characters that break parsers: separators, quotes, line breaks of every kind, NUL, BOM, ...
_ODD = ["\t", '"', "'", ",", ";", "\r", "\n", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\ufffd",
        "\ufeff", "é", " ", ">", "|", "=", "#", "\\", "\x1b", "\x7f"]  # fmt: skip
_WORDS = ["", "ACGT", "acgt-ACGU", "NNNN", "ACGT" * 60, "ACGTNRYKM" * 30, "Aus bus", "Aus", "Aus bus cus", "COI-5P",
          "ITS", "BOLD:AAA0001", "1.5", "-91", "95", "181", "-0.5", "inf", "-inf", "nan", "NA", "null", "None",
          "1e400", "abc", "P1", "P2", "P1 ", "train", "test", "pretrain", "key_unseen", "0", "1", "255", "256",
          "-1", "3.7", "1_000", "0x10", "Insecta", "Diptera"]  # fmt: skip
_CELL = st.one_of(
    st.sampled_from(_WORDS),
    st.text(alphabet=st.sampled_from([*"ACGTN-acgtu*", *_ODD]), max_size=24),
    st.text(max_size=8),
)
#: Sequence lines: mostly usable barcodes.
_SEQUENCE = st.one_of(st.sampled_from(["ACGT" * 60, "acgt-" * 50, "ACGTN" * 50, "ACGTU" * 44, "AC GT\tAC" * 30]), _CELL)


@st.composite
def _raw_bytes(draw, text: str) -> bytes:
    """``text`` as UTF-8, maybe with a BOM, a few raw (often non-UTF-8) bytes spliced in, or cut short."""
    data = text.encode("utf-8")
    if draw(st.integers(0, 7)) == 0:
        data = b"\xef\xbb\xbf" + data
    for _ in range(draw(st.sampled_from([0, 0, 0, 0, 1, 2]))):
        at = draw(st.integers(0, len(data)))
        junk = draw(st.sampled_from([b"\xe9", b"\xff\xfe", b"\x00", b"\xc3", b"\x80\x80"])
                    | st.binary(min_size=1, max_size=4))
        data = data[:at] + junk + data[at:]
    if draw(st.integers(0, 9)) == 0:
        data = data[: draw(st.integers(0, len(data)))]
    return data


@st.composite
def _table(draw, columns: list[str], sep: str, *, required: int = 2) -> bytes:
    """A delimited file: a header of real column names (the first ``required`` of ``columns``,
    rarely one missing, then others, duplicates and odd names, in any order), rows of odd
    cells, some rows with fields lost or added, blank lines, any line ending."""
    others = st.sampled_from([*columns, "extra", "Processid", " species_name ", ""])
    header = [*columns[:required], *draw(st.lists(others, max_size=len(columns) - required + 2))]
    if draw(st.integers(0, 9)) == 0:
        del header[draw(st.integers(0, len(header) - 1))]
    header = list(draw(st.permutations(header))) or [""]
    cells = [_SEQUENCE if name in ("nucleotides", "dna_barcode", "sequence") else _CELL for name in header]
    lines = [sep.join(header)]
    for _ in range(draw(st.integers(0, 10))):
        fields = len(header) if draw(st.integers(0, 5)) else draw(st.integers(0, len(header) + 2))
        lines.append(sep.join(draw(cells[i] if i < len(cells) else _CELL) for i in range(fields)))
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):
        lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from(["", " ", sep])))
    newline = draw(st.sampled_from(["\n", "\n", "\n", "\r\n", "\r"]))
    return draw(_raw_bytes(newline.join(lines) + draw(st.sampled_from(["", newline]))))


@st.composite
def _fasta(draw) -> bytes:
    """FASTA records with key=value headers, BOLD's plain headers or junk, sequences over lines."""
    keys = ["species", "genus", "Family", "order_name", "bin_uri", "lat", "coord-lon", "taxon", "colour", "",
            " phylum "]
    lines = []
    for _ in range(draw(st.integers(0, 8))):
        pid = draw(st.sampled_from(["P1", "P2", "", " ", "SSJAE238-13"]) | st.text(max_size=6))
        kind = draw(st.integers(0, 3))
        if kind == 0:  # key=value
            fields = [f"{draw(st.sampled_from(keys))}={draw(_CELL)}" for _ in range(draw(st.integers(0, 4)))]
        elif kind == 1:  # BOLD's export
            fields = [draw(st.sampled_from(["Aus bus", "Aus", ""]) | _CELL), "COI-5P", "GB1"][: draw(st.integers(1, 3))]
        else:  # anything between the bars
            fields = draw(st.lists(_CELL, max_size=3))
        lines.append(">" + "|".join([pid, *fields]))
        lines += draw(st.lists(_SEQUENCE, max_size=3))
    if draw(st.booleans()):
        lines.insert(0, draw(_CELL))  # text before the first header
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    return draw(_raw_bytes(newline.join(lines) + newline))


def _check(reader, path: pathlib.Path, data: bytes) -> None:
    path.write_bytes(data)
    try:
        reader(path)
    except (ValueError, FileNotFoundError) as e:  # the documented input errors
        message = str(e)
        assert len(message.splitlines()) == 1, f"not one line: {message!r}"
        assert str(path) in message, f"does not name the file: {message!r}"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("fuzz")


_TSV_COLUMNS = ["processid", "nucleotides", "sampleid", "species_name", "genus_name", "family_name", "bin_uri", "lat",
                "lon", "markercode", "country", "sequence_len"]  # fmt: skip


@settings(max_examples=120, **_SETTINGS)
@given(data=_table(_TSV_COLUMNS, "\t"), options=st.sampled_from([
    {}, {"errors": "raise"}, {"min_length": 200, "max_length": 660, "chunk_rows": 2}, {"marker": None, "chunk_rows": 1},
    {"require": ("species", "genus")}, {"normalize_barcodes": False}]))  # fmt: skip
@example(data=b"\xef\xbb\xbf\nnucleotides\tprocessid\n", options={})  # found: a BOM, then a blank line
@example(data=b"\rprocessid\tnucleotides\tsampleid\r\tACGT\t\n\t\n\rP1\tACGT\t\t", options={})  # found: lone CRs
def test_bold_tsv(folder, data, options):
    _check(lambda path: bold.read_bold_tsv(path, **options), folder / "fuzz.tsv", data)


@settings(max_examples=120, **_SETTINGS)
@given(data=_fasta(), options=st.sampled_from([{}, {"errors": "raise"}, {"min_length": 200, "chunk_rows": 2},
                                               {"require": ("species",)}]))  # fmt: skip
def test_bold_fasta(folder, data, options):
    _check(lambda path: bold.read_fasta(path, **options), folder / "fuzz.fasta", data)


@settings(max_examples=60, **_SETTINGS)
@given(data=st.binary(max_size=3000), name=st.sampled_from(["fuzz.tsv", "fuzz.fasta", "fuzz.txt.gz", "fuzz.bin"]))
def test_bold_read_any_bytes(folder, data, name):
    _check(bold.read, folder / name, data)


_QUERY_COLUMNS = ["dna_barcode", "id", "processid", "nucleotides", "sequence", "name", "sampleid"]


@settings(max_examples=120, **_SETTINGS)
@given(data=st.one_of(_fasta(), _table(_QUERY_COLUMNS, ",", required=1), _table(_QUERY_COLUMNS, "\t", required=1),
                      st.binary(max_size=2000)),
       name=st.sampled_from(["q.fasta", "q.csv", "q.tsv"]))  # fmt: skip
def test_cli_query_reader(folder, data, name):
    _check(specimens.read_barcodes, folder / name, data)


@settings(max_examples=80, **_SETTINGS)
@given(data=st.one_of(_table(list(schema.COLUMNS), ",", required=len(schema.COLUMNS)), st.binary(max_size=1000)),
       mode=st.sampled_from(["raise", "skip"]))  # fmt: skip
@example(data=(",".join(schema.COLUMNS) + "\n" + "," * 11 + "ACGT" + "," * 11 + '"').encode(), mode="skip")  # found
def test_tfds_metadata_reader(folder, data, mode):
    from etils import epath

    from tfds_builder.bioscan5m import records
    from tfds_builder.bioscan5m.sources import MetadataFile

    meta = MetadataFile(epath.Path(folder / "metadata.csv"))
    _check(lambda path: records.read(meta, records.BadRecords(mode, meta.name)), folder / "metadata.csv", data)
