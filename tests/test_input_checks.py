"""Bad input never vanishes: length, range, encoding and whole-file checks of the BOLD import and
the TFDS builder's metadata reader (a counted, named report, or a one-line error naming the file)."""

import gzip
import pathlib
import re
import shutil

import ml_collections
import numpy as np
import pandas as pd
import pytest

from bioscan_jax.data import bold, schema, sources
from tfds_builder.bioscan5m import records
from tfds_builder.bioscan5m.sources import MetadataFile

_HEADER = "processid\tgenus_name\tspecies_name\tnucleotides\n"


def _barcode(length: int, seed: int = 0) -> str:
    return "".join(np.random.default_rng(seed).choice(list("ACGT"), size=length))


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert isinstance(excinfo.value, ValueError) and "\n" not in message, message
    return message


def _bold_config(path, **overrides) -> ml_collections.ConfigDict:
    data = dict(source="bold", path=str(path), unseen_fraction=0.0, test_fraction=0.5, max_nucleotides=660)
    data.update(overrides)
    return ml_collections.ConfigDict(data)


# ----------------------------------------------------------------------------- 1. barcode length


def _length_rows() -> list[tuple[str, str]]:
    return [
        ("P1", _barcode(250, 1)),
        ("P2", _barcode(150, 2)),  # too short at min_length=200
        ("P3", "N" * 250),  # no ACGT at all: never usable
        ("P4", _barcode(100, 4) + "N" * 150),  # 250 nt but only 100 ACGT
        ("P5", _barcode(700, 5)),  # kept whole, counted: the tokenizer cuts at 660
    ]


def test_tsv_short_and_n_only_barcodes_are_skipped_and_long_ones_counted(tmp_path):
    path = tmp_path / "lengths.tsv"
    path.write_text(_HEADER + "".join(f"{pid}\tAus\tAus bus\t{seq}\n" for pid, seq in _length_rows()))
    frame, report = bold.read_bold_tsv(path, min_length=200, max_length=660)
    assert frame["processid"].tolist() == ["P1", "P5"]
    assert frame["dna_barcode"].str.len().tolist() == [250, 700]  # nothing truncated
    assert report.skipped == {"too_short": 1, "too_few_acgt": 2}
    assert report.examples["too_short"] == ["P2 (line 3)"]
    assert report.examples["too_few_acgt"] == ["P3 (line 4)", "P4 (line 5)"]
    assert report.notes == {"longer_than_660": 1} and report.examples["longer_than_660"] == ["P5 (line 6)"]
    assert report.rows_read == report.rows_mapped + report.rows_skipped == 5
    # without a minimum only the all-N barcode goes; without max_length nothing is noted
    frame, report = bold.read_bold_tsv(path)
    assert frame["processid"].tolist() == ["P1", "P2", "P4", "P5"]
    assert report.skipped == {"too_few_acgt": 1} and report.notes == {}
    with pytest.raises(ValueError, match=r"record P2 \(line 3\): too_short \(150 nt after normalisation < min_length=200\)"):
        bold.read_bold_tsv(path, min_length=200, errors="raise")
    with pytest.raises(ValueError, match=r"record P3 \(line 4\): too_few_acgt \(0 of 250 nt are A/C/G/T; need 1\)"):
        bold.read_bold_tsv(path, errors="raise")


def test_fasta_short_and_n_only_barcodes_are_skipped_and_long_ones_counted(tmp_path):
    path = tmp_path / "lengths.fasta"
    path.write_text("".join(f">{pid}|species=Aus bus\n{seq[:300]}\n{seq[300:]}\n" for pid, seq in _length_rows()))
    frame, report = bold.read_fasta(path, min_length=200, max_length=660)
    assert frame["processid"].tolist() == ["P1", "P5"]
    assert report.skipped == {"too_short": 1, "too_few_acgt": 2}
    assert report.examples["too_short"] == ["P2 (line 4)"]  # the header line
    assert report.notes == {"longer_than_660": 1}
    _, report = bold.read_fasta(path)
    assert report.skipped == {"too_few_acgt": 1}


def test_training_import_applies_the_default_minimum_length(tmp_path):
    path = tmp_path / "export.tsv"
    rows = [(f"A{i}", "Aus", "Aus bus", _barcode(300, i)) for i in range(4)]
    rows += [(f"B{i}", "Bus", "Bus cus", _barcode(300, 10 + i)) for i in range(4)]
    rows += [("S1", "Aus", "Aus bus", _barcode(120, 99))]  # below bold.MIN_LENGTH
    path.write_text(_HEADER + "".join("\t".join(r) + "\n" for r in rows))
    splits = sources.open_splits(_bold_config(path), ["train+test"])
    assert sorted(r["processid"] for r in splits["train+test"]) == sorted(r[0] for r in rows[:-1])
    splits = sources.open_splits(_bold_config(path, min_length=100), ["train+test"])
    assert len(splits["train+test"]) == len(rows)


# ----------------------------------------------------------------------------- 2. value ranges


def test_tsv_coordinates_and_sizes_out_of_range_become_missing_and_are_counted(tmp_path):
    path = tmp_path / "coords.tsv"
    good = _barcode(250)
    values = [("P1", "45.5", "-75.1", "0.5"), ("P2", "95", "-200", "-0.1"), ("P3", "-90", "180", "1"),
              ("P4", "inf", "10", "0"), ("P5", "north", "", "")]  # fmt: skip
    path.write_text("processid\tspecies_name\tlat\tlon\tarea_fraction\tnucleotides\n"
                    + "".join(f"{p}\tAus bus\t{a}\t{o}\t{f}\t{good}\n" for p, a, o, f in values))
    frame, report = bold.read_bold_tsv(path)
    assert len(frame) == 5  # nothing dropped
    np.testing.assert_array_equal(frame["coord-lat"], [45.5, np.nan, -90.0, np.nan, np.nan])
    np.testing.assert_array_equal(frame["coord-lon"], [-75.1, np.nan, 180.0, 10.0, np.nan])
    np.testing.assert_array_equal(frame["area_fraction"], [0.5, np.nan, 1.0, 0.0, np.nan])
    assert report.notes == {"out_of_range_coord-lat": 2, "out_of_range_coord-lon": 1,
                            "out_of_range_area_fraction": 1, "unparsed_coord-lat": 1}  # fmt: skip
    assert report.examples["out_of_range_coord-lat"] == ["P2 (line 3)", "P4 (line 5)"]
    assert report.examples["out_of_range_area_fraction"] == ["P2 (line 3)"]
    assert report.examples["unparsed_coord-lat"] == ["P5 (line 6)"]


def _metadata_copy(tmp_path, edit) -> MetadataFile:
    from tfds_builder.bioscan5m import make_dummy_data

    src = pathlib.Path(str(make_dummy_data.DUMMY_DIR)) / schema.METADATA_RELPATH
    df = pd.read_csv(src, dtype=str, keep_default_na=False)
    edit(df)
    path = tmp_path / schema.METADATA_RELPATH
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    return MetadataFile(path)


def _break_ranges(df: pd.DataFrame) -> None:
    df.loc[0, "coord-lat"] = "95.5"
    df.loc[1, "coord-lon"] = "-181"
    df.loc[2, "scale_factor"] = "-0.5"
    df.loc[3, "image_measurement_value"] = "inf"


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_metadata_out_of_range_values_are_cleared_and_counted_not_dropped(tmp_path, mode):
    meta_file = _metadata_copy(tmp_path, _break_ranges)
    raw = pd.read_csv(meta_file.path, dtype=str)
    policy = records.BadRecords(mode, meta_file.name)
    meta = records.read(meta_file, policy)
    assert len(meta.frame) == len(raw)  # every record kept
    broken = ["coord-lat", "coord-lon", "scale_factor", "image_measurement_value"]
    assert all(np.isnan(meta.frame.loc[row, column]) for row, column in enumerate(broken))
    assert meta.frame.loc[1, "coord-lat"] == float(raw.loc[1, "coord-lat"])  # the rest of the row stays
    summary = policy.summary()
    assert summary["skipped_total"] == 0
    assert summary["cleared"] == {"out_of_range": 4} and summary["cleared_total"] == 4
    assert summary["cleared_columns"] == {"coord-lat": 1, "coord-lon": 1, "image_measurement_value": 1,
                                          "scale_factor": 1}  # fmt: skip
    first = summary["cleared_examples"]["out_of_range"][0]
    assert repr(raw.loc[0, "processid"]) in first and "coord-lat value '95.5' is outside [-90, 90]" in first


def test_builder_metadata_counts_cleared_values(tmp_path):
    from tfds_builder.bioscan5m import make_dummy_data

    root = tmp_path / "src"
    shutil.copytree(str(make_dummy_data.DUMMY_DIR), root, ignore=shutil.ignore_patterns("images"))
    edited = _metadata_copy(tmp_path / "edit", _break_ranges)
    shutil.copy(edited.path, root / schema.METADATA_RELPATH)
    from bioscan_jax.data import tfds_source

    builder = tfds_source.prepare("dna", str(tmp_path / "tfds"), str(root), verify_md5=False)  # default: raise
    assert builder.info.metadata["cleared"] == {"out_of_range": 4}
    assert builder.info.metadata["cleared_columns"]["coord-lat"] == 1
    assert builder.info.splits.total_num_examples == len(pd.read_csv(edited.path))


# ----------------------------------------------------------------------------- 3. quotes, encoding, field counts


def test_tsv_stray_quote_never_joins_lines_and_is_noted(tmp_path):
    path = tmp_path / "quote.tsv"
    good = _barcode(250)
    path.write_text(_HEADER + f'P1\tAus\tAus "bus\t{good}\n' + f"P2\tAus\tAus bus\t{good}\n"
                    + f'P3\tAus\tAus cus"\t{good}\n' + f"P4\tAus\tAus bus\t{good}\n")  # fmt: skip
    frame, report = bold.read_bold_tsv(path)
    assert report.rows_read == 4 and frame["processid"].tolist() == ["P1", "P2", "P3", "P4"]
    assert frame["species"].tolist() == ['Aus "bus', "Aus bus", 'Aus cus"', "Aus bus"]
    assert report.notes == {"stray_quote_lines": 2} and report.examples["stray_quote_lines"] == ["line 2", "line 4"]


def test_non_utf8_bytes_are_read_leniently_and_counted_with_line_numbers(tmp_path):
    good = _barcode(250).encode()
    path = tmp_path / "latin1.tsv"
    path.write_bytes(_HEADER.encode() + b"P1\tAus\tAus bus\t" + good + b"\n"
                     + b"P2\tAus\tAus b\xe9us\t" + good + b"\n")  # fmt: skip
    frame, report = bold.read_bold_tsv(path)
    assert frame["species"].tolist() == ["Aus bus", "Aus b\ufffdus"]
    assert report.notes == {"non_utf8_lines": 1} and report.examples["non_utf8_lines"] == ["line 3"]
    path = tmp_path / "latin1.fasta"
    path.write_bytes(b">P1|species=Aus bus\n" + good + b"\n>P2|species=Aus b\xe9us\n" + good + b"\n")
    frame, report = bold.read_fasta(path)
    assert frame["species"].tolist() == ["Aus bus", "Aus b\ufffdus"]
    assert report.notes == {"non_utf8_lines": 1} and report.examples["non_utf8_lines"] == ["line 3"]


def test_tsv_first_row_with_an_extra_field_does_not_shift_the_columns(tmp_path):
    path = tmp_path / "wide.tsv"
    good = _barcode(250)
    path.write_text(_HEADER + f"P1\tAus\tAus bus\t{good}\tsurplus\n" + f"P2\tAus\tAus bus\t{good}\n"
                    + f"\nP3\tBus\tBus cus\t{good}\n")  # fmt: skip
    frame, report = bold.read_bold_tsv(path)
    assert frame["processid"].tolist() == ["P2", "P3"] and frame["genus"].tolist() == ["Aus", "Bus"]
    assert report.skipped == {"malformed_line": 1} and report.examples["malformed_line"] == ["line 2"]
    assert report.rows_read == 3
    path.write_text(_HEADER + f"P2\tAus\tAus bus\t{good}\n\nP3\tBus\tBus cus\tACGT*\n")
    with pytest.raises(ValueError, match=r"record P3 \(line 4\)"):  # exact line numbers past blank lines
        bold.read_bold_tsv(path, errors="raise")


# ----------------------------------------------------------------------------- 4. whole-file errors


def test_tsv_without_species_or_genus_column_names_it(tmp_path):
    path = tmp_path / "nogenus.tsv"
    path.write_text(f"processid\tspecies_name\tnucleotides\nP1\tAus bus\t{_barcode(250)}\n")
    with pytest.raises(ValueError) as e:
        bold.read_bold_tsv(path, require=("species", "genus"))
    assert _one_line_error(e) == (f"{path}: no genus column; expected one of ('genus_name', 'genus'), "
                                  "found ['processid', 'species_name', 'nucleotides']")  # fmt: skip
    with pytest.raises(ValueError, match="no genus column"):
        sources.open_splits(_bold_config(path), ["train"])
    path.write_text(f"processid\tgenus_name\tnucleotides\nP1\tAus\t{_barcode(250)}\n")
    with pytest.raises(ValueError, match=r"no species column; expected one of \('species_name', 'species'\)"):
        sources.open_splits(_bold_config(path), ["train"])


@pytest.mark.parametrize("content, message", [
    (b"", "is empty; expected a BOLD TSV with a header line"),
    (b"\n\n", "is empty"),
    (_HEADER.encode(), "has a header line but no records"),
    (gzip.compress(_HEADER.encode() + b"P1\tAus\tAus bus\tACGT\n", mtime=0),
     r"is gzip-compressed; decompress it \(gunzip\) or name it \.tsv\.gz"),
], ids=["empty", "blank-lines", "header-only", "gzip-as-tsv"])  # fmt: skip
def test_unusable_tsv_files_fail_with_one_line_naming_the_file(tmp_path, content, message):
    path = tmp_path / "input.tsv"
    path.write_bytes(content)
    with pytest.raises(ValueError) as e:
        bold.read(path)
    assert _one_line_error(e).startswith(f"{path}: ") and re.search(message, str(e.value))


def test_gzip_files_are_read_by_their_gz_name(tmp_path):
    good = _barcode(250)
    tsv = tmp_path / "export.tsv.gz"
    tsv.write_bytes(gzip.compress((_HEADER + f"P1\tAus\tAus bus\t{good}\nP2\tAus\tAus \"bus\t{good}\n").encode()))
    frame, report = bold.read(tsv)
    assert frame["processid"].tolist() == ["P1", "P2"] and report.notes == {"stray_quote_lines": 1}
    fasta = tmp_path / "export.fasta.gz"
    fasta.write_bytes(gzip.compress(f">P1|species=Aus bus\n{good}\n".encode()))
    frame, _ = bold.read(fasta)
    assert frame["dna_barcode"].tolist() == [good]
    plain = tmp_path / "plain.fasta.gz"
    plain.write_text(f">P1|species=Aus bus\n{good}\n")
    with pytest.raises(ValueError, match="is named .gz but is not gzip-compressed"):
        bold.read(plain)
    gz_fasta = tmp_path / "packed.fasta"
    gz_fasta.write_bytes(fasta.read_bytes())
    with pytest.raises(ValueError, match=r"is gzip-compressed; decompress it \(gunzip\) or name it \.fasta\.gz"):
        bold.read(gz_fasta)


def test_fasta_without_taxonomy_or_records_says_which_headers_it_reads(tmp_path):
    path = tmp_path / "plain.fasta"
    path.write_text(f">MN123456.1 Aus bus cytochrome oxidase I\n{_barcode(250)}\n>P2\n{_barcode(250, 1)}\n")
    with pytest.raises(ValueError) as e:
        bold.read_fasta(path)
    message = _one_line_error(e)
    assert message.startswith(f"{path}: no FASTA header carries a taxonomy (line 1: '>MN123456.1 Aus bus")
    assert "expected '>PROCESSID|species=Aus bus|genus=Aus|...' or BOLD's '>PROCESSID|Aus bus|COI-5P|ACCESSION'" in message
    path.write_text("")
    with pytest.raises(ValueError, match="no FASTA record"):
        bold.read_fasta(path)
    path.write_text(f">P1|species=Aus bus\n{_barcode(250)}\n")  # no genus key
    with pytest.raises(ValueError, match=r"no FASTA header has a genus .*add '\|genus=\.\.\.'"):
        bold.read_fasta(path, require=("species", "genus"))


def test_no_usable_record_is_an_error_not_an_empty_frame(tmp_path):
    path = tmp_path / "short.tsv"
    path.write_text(_HEADER + f"P1\tAus\tAus bus\tACGT\nP2\tAus\tAus bus\t{'N' * 250}\n")
    with pytest.raises(ValueError) as e:
        bold.read_bold_tsv(path, min_length=200)
    assert _one_line_error(e) == (f"{path}: none of its 2 record(s) is usable (skipped: 1 too_few_acgt, 1 too_short; "
                                  "e.g. P1 (line 2)); fix the file or the reader's options")  # fmt: skip


def test_species_split_needs_a_species_with_enough_barcodes(tmp_path):
    path = tmp_path / "singletons.tsv"
    rows = [(f"P{i}", f"G{i}", f"G{i} sp", _barcode(250, i)) for i in range(6)]
    rows.append(("P9", "G0", "G0 sp", rows[0][3]))  # a second record, but the same barcode
    path.write_text(_HEADER + "".join("\t".join(r) + "\n" for r in rows))
    with pytest.raises(ValueError) as e:
        sources.open_splits(_bold_config(path, test_fraction=0.2), ["train"])
    assert _one_line_error(e) == (
        f"{path}: no species has the 3 distinct barcodes needed for a train and a test record at test_fraction=0.2 "
        "(6 species in 7 records with a species, at most 1 barcodes each); add records of the same species or "
        "raise test_fraction"
    )
    assert bold.min_barcodes_for_test(0.5) == 2 and bold.min_barcodes_for_test(0.1) == 5
    frame, _ = bold.read(path)
    bold.check_species_split(frame, str(path), test_fraction=0.0)  # no test split wanted: nothing to check
