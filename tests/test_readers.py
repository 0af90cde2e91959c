"""Input files that are not what a reader reads fail with one line naming the file and the real
cause: binary data (not a pandas tokenizer error), a path that does not exist (not an unknown
suffix), for the BOLD import (:mod:`bioscan_jax.data.bold`) and the CLI's query reader
(:func:`bioscan_jax.data.specimens.read_barcodes`)."""

import gzip
import re
import zlib

import numpy as np
import pytest

from bioscan_jax import cli
from bioscan_jax.data import bold, specimens

_GOOD_TSV = "processid\tspecies_name\tnucleotides\nP1\tAus bus\t" + "ACGT" * 60 + "\n"


def _random_bytes(n: int = 100_000, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _png() -> bytes:
    """A real (1x1, grey) PNG."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", (1).to_bytes(4, "big") * 2 + b"\x08\x00\x00\x00\x00")
            + chunk(b"IDAT", zlib.compress(b"\x00\x80")) + chunk(b"IEND", b""))  # fmt: skip


def _one_line(excinfo, kind=ValueError) -> str:
    message = str(excinfo.value)
    assert type(excinfo.value) is kind and len(message.splitlines()) == 1, message
    return message


def _binary_files(tmp_path):
    data = _random_bytes()
    yield tmp_path / "x.fasta", data
    yield tmp_path / "x.tsv", data
    yield tmp_path / "photo.tsv", _png()  # a renamed PNG: its first NUL is byte 8 (IHDR's length)
    yield tmp_path / "x.fa.gz", gzip.compress(data)  # decompressed first: .gz itself is fine


@pytest.mark.parametrize("reader", [bold.read, specimens.read_barcodes], ids=["bold.read", "read_barcodes"])
def test_binary_files_are_named_not_text(tmp_path, reader):
    for path, data in _binary_files(tmp_path):
        if reader is specimens.read_barcodes and path.suffix == ".gz":
            continue  # the CLI's reader asks for gunzip first
        path.write_bytes(data)
        with pytest.raises(ValueError) as e:
            reader(path)
        message = _one_line(e)
        match = re.fullmatch(rf"{re.escape(str(path))}: not a text file \(binary data at byte (\d+)\)", message)
        assert match, message
        plain = gzip.decompress(data) if path.suffix == ".gz" else data
        assert int(match[1]) == plain.index(b"\0")  # offsets count decompressed bytes


def test_each_bold_reader_checks_for_binary_data(tmp_path):
    path = tmp_path / "x.txt"
    path.write_bytes(_random_bytes(5000, seed=1))
    for reader in (bold.read_bold_tsv, bold.read_fasta):
        with pytest.raises(ValueError, match=r"x\.txt: not a text file \(binary data at byte \d+\)"):
            reader(path)


@pytest.mark.parametrize("name, header, row", [
    ("late.tsv", "processid\tspecies_name\tnucleotides\n", "P{i}\tAus bus\t{seq}\n"),
    ("late.fasta", "", ">P{i}|species=Aus bus\n{seq}\n"),
])
def test_a_nul_byte_past_the_first_64_kb_is_binary_too(tmp_path, name, header, row):
    text = header + "".join(row.format(i=i, seq="ACGT" * 60) for i in range(400))  # ~100 KB
    at = text.index("\n", 90_000) + 5
    path = tmp_path / name
    path.write_bytes(text[:at].encode() + b"\0" + text[at:].encode())
    for reader in (bold.read, specimens.read_barcodes):
        with pytest.raises(ValueError) as e:
            reader(path)
        assert _one_line(e) == f"{path}: not a text file (binary data at byte {at})"


def test_text_that_is_not_utf8_is_still_text(tmp_path):
    latin1 = tmp_path / "latin1.tsv"
    latin1.write_bytes(_GOOD_TSV.replace("Aus bus", "Aus b\xe9us").encode("latin-1"))
    frame, report = bold.read(latin1)
    assert frame["species"].tolist() == ["Aus b\ufffdus"] and report.notes == {"non_utf8_lines": 1}
    assert specimens.read_barcodes(latin1)["id"].tolist() == ["P1"]
    utf16 = tmp_path / "utf16.tsv"
    utf16.write_bytes(_GOOD_TSV.encode("utf-16"))
    for reader in (bold.read, specimens.read_barcodes):
        with pytest.raises(ValueError) as e:
            reader(utf16)
        assert _one_line(e) == f"{utf16}: is UTF-16 text; save it as UTF-8"


def test_missing_path_is_not_found_before_its_suffix_is_checked(tmp_path):
    for name in ("none.tsv", "none.fasta.gz", "none.csv", "none"):
        path = tmp_path / name
        with pytest.raises(FileNotFoundError) as e:
            bold.read(path)
        assert _one_line(e, FileNotFoundError) == f"{path}: no such file or directory"
    for reader in (bold.read_bold_tsv, bold.read_fasta):
        with pytest.raises(FileNotFoundError, match="no such file or directory"):
            reader(tmp_path / "none.tsv")
    with pytest.raises(ValueError) as e:
        bold.read(tmp_path)
    assert _one_line(e) == f"{tmp_path}: is a directory, not a file"


def test_cli_reference_that_does_not_exist_is_named(tmp_path, capsys):
    missing = tmp_path / "nonexistent.tsv"
    argv = ["index", "--model", "kmer:4", "--reference", str(missing), "--out", str(tmp_path / "idx"), "--quiet"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"bioscan-jax index: error: {missing}: no such file or directory"


def test_cli_binary_query_file_is_named(tmp_path, capsys):
    query = tmp_path / "x.fasta"
    query.write_bytes(_random_bytes())
    argv = ["embed", "--model", "kmer:3", "--input", str(query), "--out", str(tmp_path / "o.npz"), "--quiet"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    expected = rf"bioscan-jax embed: error: {re.escape(str(query))}: not a text file \(binary data at byte \d+\)"
    assert re.fullmatch(expected, err), err


def test_cli_query_table_that_does_not_parse_names_the_file(tmp_path, capsys):
    query = tmp_path / "q.csv"
    query.write_text("id,dna_barcode\nA,ACGT\nB,ACGT,extra,fields\n")
    with pytest.raises(ValueError) as e:
        specimens.read_barcodes(query)
    message = _one_line(e)
    assert message.startswith(f"{query}: unreadable CSV (Error tokenizing data. C error: Expected 2 fields in line 3")


def test_lone_carriage_returns_end_lines_as_pandas_splits_them(tmp_path):
    """Old Mac line ends (a lone CR) end a line for pandas: the line scan that finds malformed
    lines and line numbers must split there too, or it skips the wrong lines."""
    barcode = b"ACGT" * 60
    path = tmp_path / "mac.tsv"
    path.write_bytes(b"processid\tspecies_name\tnucleotides\r" + b"P1\tAus bus\t" + barcode + b"\r"
                     + b"P2\tAus bus\r"  # a field lost
                     + b"P3\tAus bus\t" + barcode + b"\r\n" + b"P1\tAus cus\t" + barcode + b"\n")  # fmt: skip
    frame, report = bold.read(path)
    assert frame["processid"].tolist() == ["P1", "P3"] and frame["species"].tolist() == ["Aus bus", "Aus bus"]
    assert report.skipped == {"malformed_line": 1, "duplicate_processid": 1} and report.rows_read == 4
    assert report.examples["malformed_line"] == ["line 3"] and report.examples["duplicate_processid"] == ["P1 (line 5)"]
    fasta = tmp_path / "mac.fasta"
    fasta.write_bytes(b">P1|species=Aus bus\r" + barcode + b"\r>P2|species=Aus cus\r" + barcode[:100] + b"\r"
                      + barcode[100:] + b"\r>P1|species=Aus dus\r" + barcode + b"\r")  # fmt: skip
    frame, report = bold.read(fasta)
    assert frame["species"].tolist() == ["Aus bus", "Aus cus"]
    assert frame["dna_barcode"].tolist() == [barcode.decode()] * 2
    assert report.examples["duplicate_processid"] == ["P1 (line 6)"]


def test_cli_query_fasta_with_a_byte_order_mark_is_fasta(tmp_path):
    query = tmp_path / "notepad.fasta"
    query.write_bytes(b"\xef\xbb\xbf>q1 some specimen\r\nACGT\r\nACGT\r\n>q2\r\nAC\r\n")
    frame = specimens.read_barcodes(query)
    assert frame["id"].tolist() == ["q1", "q2"] and frame["dna_barcode"].tolist() == ["ACGTACGT", "AC"]


def test_training_import_prints_its_report_with_first_lines_and_keeps_it(tmp_path, capsys, real_barcodes_path):
    """The BOLD import of a training run prints what it skipped with the first lines, and the
    report travels with the splits into the task's summary.json."""
    import ml_collections

    from bioscan_jax.data import sources

    raw = real_barcodes_path.read_text().splitlines()
    header, rows = raw[0], raw[1:1201]
    path = tmp_path / "export.tsv"
    path.write_text("\n".join([header, *rows, rows[0], "X1\tbroken"]) + "\n")  # a duplicate and a short line
    data = ml_collections.ConfigDict(dict(source="bold", path=str(path), min_length=200, max_nucleotides=660,
                                          unseen_fraction=0.2, test_fraction=0.2))
    splits = sources.open_splits(data, ["train"], seed=0)
    out = capsys.readouterr().out
    assert out.startswith("BOLD import: ") and "duplicate_processid: first " in out
    assert "line 1203" in out or "line 1202" in out
    assert splits.import_report["skipped"]["duplicate_processid"] == 1
    assert splits.import_report["rows_read"] >= 1201
