"""The BOLD import reads a file in chunks of rows (bounded memory): any chunk size gives the same
frame, report (counts, examples, line numbers, order) and errors as reading it in one chunk."""

import numpy as np
import pandas as pd
import pytest

from bioscan_jax.data import bold

_HEADER = "processid\tsampleid\tgenus_name\tspecies_name\tlat\tlon\tmarkercode\tnucleotides\tsequence_len\n"


def _barcode(length: int, seed: int) -> str:
    return "".join(np.random.default_rng(seed).choice(list("ACGT"), size=length))


def _row(pid: str, barcode: str, *, species: str = "Aus bus", lat: str = "45.1", lon: str = "-75.2",
         marker: str = "COI-5P") -> str:  # fmt: skip
    return f"{pid}\tS-{pid}\t{species.split()[0]}\t{species}\t{lat}\t{lon}\t{marker}\t{barcode}\t{len(barcode)}\n"


def _tsv_lines() -> list[str]:
    """About 60 rows: good ones, and every kind of problem, spread over several 7-row chunks."""
    lines = [_row(f"P{i:03d}", _barcode(250 + i, i)) for i in range(60)]
    lines[3] = _row("P003", "ACGT*" + _barcode(250, 3))  # invalid_barcode
    lines[6] = _row("P006", _barcode(250, 6), lat="95.0")  # out_of_range_coord-lat (kept)
    lines[7] = _row("P000", _barcode(250, 70))  # duplicate_processid across chunks
    lines[8] = "\tS-x\tAus\tAus bus\t1\t2\tCOI-5P\t" + _barcode(250, 8) + "\t250\n"  # missing_processid
    lines[13] = _row("P013", _barcode(250, 13), lon="east")  # unparsed_coord-lon (kept)
    lines[14] = _row("P014", "")  # missing_barcode
    lines[20] = _row("P020", _barcode(250, 20), marker="ITS")  # other_marker
    lines[21] = _row("P021", _barcode(120, 21))  # too_short at min_length=200
    lines[22] = _row("P022", "N" * 250)  # too_few_acgt
    lines[27] = _row("P027", _barcode(700, 27))  # longer_than_660 (kept)
    lines[28] = lines[28].replace("\t", "\t\t", 1)  # a field too many: malformed_line
    lines[29] = lines[29].replace("\t", "", 1)  # a field lost: malformed_line
    lines[34] = _row("P034", _barcode(250, 34), species='Aus "bus')  # stray_quote_lines (kept)
    lines[35] = _row("P035", "ac-gt" + _barcode(250, 35))  # barcodes_normalised (kept)
    lines[41] = _row("P041", _barcode(250, 41)).replace("Aus bus", "Aus b\udce9us")  # non-UTF-8 byte
    lines[42] = _row("P006", _barcode(250, 42))  # duplicate of a row kept with a cleared value
    lines[48] = _row("P014", _barcode(250, 48))  # same id as a skipped row: kept, the first valid copy
    lines[55] = _row("P021", _barcode(250, 55))  # likewise
    lines.insert(10, "\n")  # blank lines shift the line numbers of everything after them
    lines.insert(30, "   \n")
    lines.insert(44, "\n")
    return lines


def _write_tsv(path, lines) -> None:
    path.write_bytes((_HEADER + "".join(lines)).encode("utf-8", "surrogateescape"))


def _assert_same(a, b) -> None:
    (frame_a, report_a), (frame_b, report_b) = a, b
    pd.testing.assert_frame_equal(frame_a, frame_b)
    assert report_a.as_dict() == report_b.as_dict()
    for field in ("skipped", "notes", "examples"):  # the same order too (JSON, summaries)
        assert list(getattr(report_a, field)) == list(getattr(report_b, field)), field
    assert report_a.summary() == report_b.summary()


@pytest.mark.parametrize("options", [{}, {"min_length": 200, "max_length": 660}, {"marker": None},
                                     {"normalize_barcodes": False}])  # fmt: skip
def test_tsv_chunks_of_seven_rows_give_the_same_frame_and_report(tmp_path, options):
    path = tmp_path / "chunks.tsv"
    _write_tsv(path, _tsv_lines())
    whole = bold.read_bold_tsv(path, chunk_rows=10_000, **options)
    _assert_same(bold.read_bold_tsv(path, chunk_rows=7, **options), whole)
    _assert_same(bold.read_bold_tsv(path, chunk_rows=1, **options), whole)


def test_tsv_chunked_report_has_the_physical_line_numbers(tmp_path):
    path = tmp_path / "chunks.tsv"
    _write_tsv(path, _tsv_lines())
    frame, report = bold.read_bold_tsv(path, min_length=200, max_length=660, chunk_rows=7)
    assert report.rows_read == 60 and report.rows_mapped == len(frame) == 50
    assert report.skipped == {"malformed_line": 2, "invalid_barcode": 1, "duplicate_processid": 2,
                              "missing_processid": 1, "missing_barcode": 1, "other_marker": 1, "too_short": 1,
                              "too_few_acgt": 1}  # fmt: skip
    # line = 2 + row index, +1 past each of the blank lines 12, 32 and 46
    assert report.examples["malformed_line"] == ["line 31", "line 33"]
    assert report.examples["duplicate_processid"] == ["P000 (line 9)", "P006 (line 47)"]
    assert report.examples["missing_processid"] == ["line 10"]
    assert report.examples["invalid_barcode"] == ["P003 (line 5)"]
    assert report.examples["missing_barcode"] == ["P014 (line 17)"]
    assert report.examples["other_marker"] == ["P020 (line 23)"]
    assert report.examples["too_short"] == ["P021 (line 24)"]
    assert report.examples["too_few_acgt"] == ["P022 (line 25)"]
    assert report.examples["longer_than_660"] == ["P027 (line 30)"]
    assert report.examples["out_of_range_coord-lat"] == ["P006 (line 8)"]
    assert report.examples["unparsed_coord-lon"] == ["P013 (line 16)"]
    assert report.examples["stray_quote_lines"] == ["line 38"]
    assert report.examples["non_utf8_lines"] == ["line 45"]
    # a processid skipped for another reason stays free: its later valid copy is kept
    assert frame.loc[frame["processid"] == "P014", "dna_barcode"].tolist() == [_barcode(250, 48)]
    assert frame.loc[frame["processid"] == "P006", "dna_barcode"].tolist() == [_barcode(250, 6)]


def test_tsv_chunked_errors_raise_the_first_check_that_fails(tmp_path):
    path = tmp_path / "raise.tsv"
    lines = [_row(f"P{i:03d}", _barcode(250, i)) for i in range(30)]
    lines[2] = _row("P002", "ACGT*ACGT")  # invalid_barcode in the first chunk
    lines[25] = "\tS\tAus\tAus bus\t1\t2\tCOI-5P\tACGT\t4\n"  # missing_processid in the fourth: checked first
    _write_tsv(path, lines)
    for chunk_rows in (7, 10_000):
        with pytest.raises(ValueError) as e:
            bold.read_bold_tsv(path, errors="raise", chunk_rows=chunk_rows)
        assert str(e.value) == f"{path}: record line 27: missing_processid"
    lines[25] = _row("P025", _barcode(250, 25))
    lines[20] = _row("P001", _barcode(250, 20))  # a duplicate in the third chunk: checked after barcodes
    _write_tsv(path, lines)
    for chunk_rows in (7, 10_000):
        with pytest.raises(ValueError, match=r"record P002 \(line 4\): invalid_barcode: invalid characters"):
            bold.read_bold_tsv(path, errors="raise", chunk_rows=chunk_rows)
    lines[2] = _row("P002", _barcode(250, 2))
    _write_tsv(path, lines)
    for chunk_rows in (7, 10_000):
        with pytest.raises(ValueError, match=r"record P001 \(line 22\): duplicate_processid$"):
            bold.read_bold_tsv(path, errors="raise", chunk_rows=chunk_rows)


def test_fasta_chunks_of_seven_records_give_the_same_frame_and_report(tmp_path):
    path = tmp_path / "chunks.fasta"
    records = []
    for i in range(50):
        header = f">P{i:03d}|species=Aus b{i % 5}|genus=Aus|lat={40 + 2 * i}"
        barcode = _barcode(250, i)
        if i == 4:
            header += "|colour=red"  # unknown_header_keys
        if i == 9:
            header = ">P009|family=Muscidae|broken"  # malformed_header
        if i == 12:
            barcode = ""  # missing_barcode
        if i == 17:
            header = ">P002|species=Aus bus"  # duplicate across chunks
        if i == 23:
            barcode = "ACGT*ACGT"  # invalid_barcode
        if i == 31:
            header = ">P031|Cus dus|COI-5P|GB1"  # BOLD's own header format
        records.append(f"{header}\n{barcode[:100]}\n{barcode[100:]}\n")
    records.insert(20, "\n\n")
    path.write_text("stray sequence\n" + "".join(records))
    whole = bold.read_fasta(path, chunk_rows=10_000)
    _assert_same(bold.read_fasta(path, chunk_rows=7), whole)
    frame, report = bold.read_fasta(path, chunk_rows=3)
    assert report.skipped == {"malformed_line": 1, "malformed_header": 1, "missing_barcode": 1,
                              "invalid_barcode": 1, "duplicate_processid": 1}  # fmt: skip
    assert report.examples["duplicate_processid"] == ["P002 (line 53)"]
    assert report.examples["invalid_barcode"] == ["P023 (line 73)"]  # after the two blank lines
    assert report.notes["out_of_range_coord-lat"] == 23  # lat 92 .. 138 (not P031: no lat)
    assert frame.loc[frame["processid"] == "P031", "taxon"].tolist() == ["Cus dus"]


def test_processid_hash_collisions_are_checked_against_the_ids(tmp_path, monkeypatch):
    """The set of processids kept so far is stored as hashes; equal hashes of different ids
    must not make a duplicate."""
    path = tmp_path / "collide.tsv"
    lines = [_row(f"P{i:03d}", _barcode(250, i)) for i in range(20)] + [_row("P005", _barcode(250, 99))]
    _write_tsv(path, lines)
    monkeypatch.setattr(bold._SeenIds, "_hash", staticmethod(lambda ids: np.zeros(len(ids), dtype=np.uint64)))
    frame, report = bold.read_bold_tsv(path, chunk_rows=3)
    assert len(frame) == 20 and report.skipped == {"duplicate_processid": 1}
    assert report.examples["duplicate_processid"] == ["P005 (line 22)"]


def test_chunk_rows_must_be_positive(tmp_path):
    path = tmp_path / "x.tsv"
    _write_tsv(path, [_row("P1", _barcode(250, 1))])
    with pytest.raises(ValueError, match="chunk_rows must be a positive int"):
        bold.read_bold_tsv(path, chunk_rows=0)


def test_module_chunk_size_is_the_default(tmp_path, monkeypatch):
    path = tmp_path / "chunks.tsv"
    _write_tsv(path, _tsv_lines())
    whole = bold.read_bold_tsv(path)
    calls = []
    add = bold._Mapper.add
    def counting_add(self, fields, *args, **kwargs):
        calls.append(len(fields))
        return add(self, fields, *args, **kwargs)

    monkeypatch.setattr(bold._Mapper, "add", counting_add)
    monkeypatch.setattr(bold, "CHUNK_ROWS", 7)
    _assert_same(bold.read_bold_tsv(path), whole)
    assert calls[:-1] == [7] * (len(calls) - 1) and sum(calls) == 58  # the rows pandas parses
