"""BOLD TSV / FASTA import and the species-level split."""

import pandas as pd
import pytest

from bioscan_jax.data import bold, dna
from bioscan_jax.data.schema import COLUMN_DTYPES, COLUMNS, RANKS

_HEADER = "processid\tsampleid\tbin_uri\tphylum_name\tclass_name\torder_name\tfamily_name\tgenus_name\tspecies_name\tnucleotides\tsequence_len\n"


@pytest.fixture(scope="module")
def real_frame(real_barcodes_path):
    return bold.read_bold_tsv(real_barcodes_path)


def _assert_schema(frame: pd.DataFrame) -> None:
    assert tuple(frame.columns) == COLUMNS
    assert {c: str(frame[c].dtype) for c in COLUMNS} == {c: str(pd.Series(dtype=d).dtype) for c, d in COLUMN_DTYPES.items()}


def test_real_tsv_maps_every_row(real_frame, real_barcodes_path):
    frame, report = real_frame
    assert (report.rows_read, report.rows_mapped, report.rows_skipped) == (5000, 5000, 0)
    assert report.skipped == {} and report.notes == {}
    _assert_schema(frame)
    assert frame["species"].notna().all() and frame["genus"].notna().all()
    assert frame["species"].nunique() == 100 and frame["genus"].nunique() == 97
    assert frame["family"].nunique() == 64 and frame["order"].nunique() == 14
    assert frame["dna_bin"].notna().sum() == 4990 and frame["dna_bin"].nunique() >= 183
    assert (frame["taxon"] == frame["species"]).all()
    assert frame["split"].isna().all() and frame["subfamily"].isna().all()
    assert (frame["inferred_ranks"] == 0).all() and frame["index_bioscan_1M_insect"].isna().all()
    raw = pd.read_csv(real_barcodes_path, sep="\t", dtype=str)
    assert (frame["dna_barcode"].to_numpy(dtype=str) == raw["nucleotides"].to_numpy(dtype=str)).all()
    assert (frame["processid"].to_numpy(dtype=str) == raw["processid"].to_numpy(dtype=str)).all()
    assert (frame["dna_bin"].fillna("").to_numpy(dtype=str) == raw["bin_uri"].fillna("").to_numpy(dtype=str)).all()
    # the imported barcodes tokenise without complaint
    ids, mask = dna.KmerTokenizer(4)(frame["dna_barcode"], names=frame["processid"])
    assert mask.any(axis=1).all()


def test_fasta_round_trip(real_frame, tmp_path):
    frame, _ = real_frame
    subset = frame.iloc[::25].reset_index(drop=True).copy()
    subset.loc[0, "genus"] = pd.NA  # missing ranks stay missing
    subset.loc[1, "subfamily"] = "Tanypodinae"
    subset["taxon"] = bold.lowest_rank_name(subset)
    path = tmp_path / "records.fasta"
    assert bold.write_fasta(subset, path) == len(subset)
    text = path.read_text()
    assert text.startswith(f">{subset.loc[0, 'processid']}|sampleid=")
    assert max(len(line) for line in text.splitlines() if not line.startswith(">")) == 80  # wrapped
    again, report = bold.read_fasta(path)
    assert (report.rows_read, report.rows_mapped, report.rows_skipped) == (len(subset), len(subset), 0)
    _assert_schema(again)
    pd.testing.assert_frame_equal(again, subset)


def test_fasta_headers_and_bad_records(tmp_path):
    path = tmp_path / "mixed.fa"
    path.write_text(
        "stray sequence line\n"
        ">P1|Species=Aus bus|GENUS=Aus|bin_uri=BOLD:AAA0001|colour=red\n"
        "acgt-acgt\nACGU\n\n"
        ">P2|order=Diptera\n"
        "\n"
        ">P3|Cus dus|COI-5P|GB123\n"
        "ACGTNN\n"
        ">P4|family=Muscidae|broken\n"
        "ACGT\n"
        ">P5|genus=Eus\n"
        "ACXGT\n"
        ">P1|species=Copy\n"
        "ACGT\n"
        ">|species=Nameless\n"
        "ACGT\n"
    )
    frame, report = bold.read_fasta(path)
    _assert_schema(frame)
    assert frame["processid"].tolist() == ["P1", "P3"]
    p1, p3 = frame.iloc[0], frame.iloc[1]
    assert (p1["species"], p1["genus"], p1["dna_bin"], p1["taxon"]) == ("Aus bus", "Aus", "BOLD:AAA0001", "Aus bus")
    assert p1["dna_barcode"] == "ACGTNACGTACGT"  # joined lines, normalised (the gap is an N: frame kept)
    assert (p3["species"], p3["genus"], p3["taxon"]) == ("Cus dus", "Cus", "Cus dus")  # BOLD's own header
    assert report.rows_read == 8 and report.rows_mapped == 2
    assert report.skipped == {
        "malformed_line": 1,
        "malformed_header": 1,
        "missing_barcode": 1,
        "invalid_barcode": 1,
        "duplicate_processid": 1,
        "missing_processid": 1,
    }
    assert report.rows_read == report.rows_mapped + report.rows_skipped
    assert report.notes == {"unknown_header_keys": 1, "barcodes_normalised": 1}
    assert report.examples["invalid_barcode"] == ["P5 (line 12)"]  # the header line
    assert "mapped 2" in report.summary() and str(report) == report.summary()
    with pytest.raises(ValueError, match="line 1 holds sequence text"):
        bold.read_fasta(path, errors="raise")


def test_tsv_bad_rows_are_counted_or_raised(tmp_path):
    good = "ACGTACGTACGTNNACGT"
    path = tmp_path / "bad.tsv"
    path.write_text(
        _HEADER
        + f"P1\tS1\tBOLD:A1\tArthropoda\tInsecta\tDiptera\tMuscidae\tMusca\tMusca domestica\t{good}\t18\n"
        + "P2\tS2\tBOLD:A1\tArthropoda\tInsecta\tDiptera\tMuscidae\tMusca\tMusca domestica\t\t0\n"
        + "P3\tS3\t\tArthropoda\tInsecta\tDiptera\tMuscidae\tMusca\t\tACGT*ACGT\t9\n"
        + f"P4\tS4\t\tArthropoda\tInsecta\tDiptera\t\t\t\tac-gt{good}\t23\n"
        + f"\tS5\t\tArthropoda\tInsecta\t\t\t\t\t{good}\t18\n"
        + f"P1\tS6\t\tArthropoda\t\t\t\t\t\t{good}\t18\n"
        + f"P7\tS7\t\tArthropoda\t\t\t\t\t\t{good}\t18\textra\n"
    )
    frame, report = bold.read_bold_tsv(path)
    _assert_schema(frame)
    assert frame["processid"].tolist() == ["P1", "P4"]
    assert frame["taxon"].tolist() == ["Musca domestica", "Diptera"]
    assert frame["dna_barcode"].tolist() == [good, "ACNGT" + good]  # the gap is an N (frame kept)
    assert report.rows_read == 7 and report.rows_mapped == 2
    assert report.skipped == {
        "malformed_line": 1,
        "missing_barcode": 1,
        "invalid_barcode": 1,
        "missing_processid": 1,
        "duplicate_processid": 1,
    }
    assert report.examples["missing_barcode"] == ["P2 (line 3)"]
    assert report.notes == {"barcodes_normalised": 1}
    raw, _ = bold.read_bold_tsv(path, normalize_barcodes=False)
    assert raw["dna_barcode"].tolist() == [good, "ac-gt" + good]
    path.write_text(_HEADER + "P1\tS1\t\t\t\t\t\t\t\tACGT*ACGT\t9\n")
    with pytest.raises(ValueError, match=r"record P1 \(line 2\): invalid_barcode: invalid characters \{'\*': 1\}"):
        bold.read_bold_tsv(path, errors="raise")
    path.write_text("processid\tsampleid\nP1\tS1\n")
    with pytest.raises(ValueError, match="no dna_barcode column"):
        bold.read_bold_tsv(path)


def test_tsv_row_that_lost_a_field_is_a_malformed_line_not_a_bad_barcode(tmp_path):
    good = "ACGTACGTACGTNNACGT"
    path = tmp_path / "lost_tab.tsv"
    path.write_text(
        _HEADER
        + f"P1\tS1\tBOLD:A1\tArthropoda\tInsecta\tDiptera\tMuscidae\tMusca\tMusca domestica\t{good}\t18\n"
        # the tab between species and barcode was lost: the barcode would be read from sequence_len
        + f"P2\tS2\tBOLD:A1\tArthropoda\tInsecta\tDiptera\tMuscidae\tMusca\tMusca domestica{good}\t18\n"
        + f"P3\tS3\tBOLD:A1\tArthropoda\tInsecta\tDiptera\tMuscidae\tMusca\tMusca domestica\t{good}\t18\n"
        + "P4\tS4\n"  # a truncated line
        + f"P5\tS5\tBOLD:A1\tArthropoda\tInsecta\tDiptera\tMuscidae\tMusca\tMusca domestica\t{good}\t18\tx\n"
    )
    frame, report = bold.read_bold_tsv(path)
    assert frame["processid"].tolist() == ["P1", "P3"]
    assert report.skipped == {"malformed_line": 3} and report.rows_read == 5
    assert report.examples["malformed_line"] == ["line 3", "line 5", "line 6"]
    with pytest.raises(ValueError) as e:
        bold.read_bold_tsv(path, errors="raise")
    assert str(e.value) == f"{path}: line 3 has fewer fields (10) than the header (11); a tab may be missing"


def test_marker_filter_and_read_dispatch(tmp_path):
    path = tmp_path / "markers.tsv"
    path.write_text("processid\tspecies_name\tmarkercode\tnucleotides\nA\tAus bus\tCOI-5P\tACGT\nB\tAus bus\tITS\tACGT\n")
    frame, report = bold.read(path)
    assert frame["processid"].tolist() == ["A"] and report.skipped == {"other_marker": 1}
    frame, report = bold.read(path, marker=None)
    assert len(frame) == 2 and report.rows_skipped == 0
    (tmp_path / "records.csv").write_text("processid,nucleotides\nA,ACGT\n")
    with pytest.raises(ValueError, match="unknown BOLD file type"):
        bold.read(tmp_path / "records.csv")


# ----------------------------------------------------------------------------- split


def test_species_split(real_frame):
    frame, _ = real_frame
    frame = frame.copy()
    frame.loc[:9, "species"] = pd.NA  # unlabelled records -> pretrain
    split = bold.assign_species_split(frame, unseen_fraction=0.2, test_fraction=0.2, key_unseen_fraction=0.5, seed=0)
    assert split["split"].dtype == frame["split"].dtype and frame["split"].isna().all()  # a copy
    assert (split.loc[:9, "split"] == "pretrain").all()
    by_split = {name: set(group["species"]) for name, group in split.groupby("split")}
    assert set(by_split) == {"pretrain", "train", "test", "key_unseen", "test_unseen"}
    unseen = by_split["test_unseen"]
    assert len(unseen) == 20 and by_split["key_unseen"] == unseen
    assert by_split["test"] <= by_split["train"] and not (unseen & by_split["train"])
    counts = split.groupby(["species", "split"]).size().unstack(fill_value=0)
    seen = counts.loc[counts["train"] > 0]
    assert (seen["test"] == (0.2 * (seen["train"] + seen["test"]) + 0.5).astype(int)).all()
    assert split["split"].isin(["pretrain", "train", "test", "key_unseen", "test_unseen"]).all()
    # deterministic for a seed, independent of row order, different for another seed
    again = bold.assign_species_split(frame.iloc[::-1], key_unseen_fraction=0.5, seed=0)
    assert (again.sort_index()["split"] == split["split"]).all()
    other = bold.assign_species_split(frame, key_unseen_fraction=0.5, seed=1)
    assert set(other.loc[other["split"] == "test_unseen", "species"]) != unseen


def test_species_split_keeps_barcodes_together_and_small_species_in_train():
    frame = pd.DataFrame(
        {
            "species": ["A a"] * 6 + ["B b"] + [None],
            "dna_barcode": ["AC", "AC", "AC", "GT", "GG", "TT", "AC", "AC"],
        }
    )
    for seed in range(10):
        split = bold.assign_species_split(frame, unseen_fraction=0.0, test_fraction=0.5, seed=seed)["split"]
        assert split.iloc[0] == split.iloc[1] == split.iloc[2]
        assert split.iloc[6] == "train" and split.iloc[7] == "pretrain"
        assert (split.iloc[:6] == "test").sum() in (2, 4)  # 2 of 4 barcodes (AC has 3 records)
    with pytest.raises(ValueError, match="test_fraction"):
        bold.assign_species_split(frame, test_fraction=1.5)


def test_ranks_constant_is_the_schema_one():
    assert bold.TSV_COLUMN_ALIASES["species"] == ("species_name", "species")
    assert all(rank in bold.TSV_COLUMN_ALIASES for rank in RANKS)
    assert bold.split_counts(pd.DataFrame({"split": ["train", "train"], "species": ["x", "y"]})) == {"train": (2, 2)}
