"""Tests of the dataset schema: columns, splits, chunks, paths, label maps."""

import hashlib

import numpy as np
import pandas as pd
import pytest

from bioscan_jax.data import schema


def test_there_are_23_columns_with_string_chunk_and_nullable_index():
    assert len(schema.COLUMNS) == 23
    assert schema.COLUMN_DTYPES["chunk"] == "string"
    assert schema.COLUMN_DTYPES["index_bioscan_1M_insect"] == "Int64"
    assert set(schema.LABEL_COLUMNS) == set(schema.RANKS) | {"dna_bin"}


@pytest.mark.parametrize(
    "expr, expected",
    [
        ("train", ("train",)),
        ("validation", ("val",)),
        ("seen", ("train", "val", "test")),
        ("unseen", ("key_unseen", "val_unseen", "test_unseen")),
        ("test_unseen+pretrain", ("pretrain", "test_unseen")),
        ("all", schema.SPLITS),
        ("train + seen", ("train", "val", "test")),
    ],
)
def test_resolve_split(expr, expected):
    assert schema.resolve_split(expr) == expected


@pytest.mark.parametrize("bad", ["training", "train+nope", "", "+"])
def test_unknown_split_lists_the_valid_names(bad):
    with pytest.raises(ValueError, match="Valid names: pretrain, train, val"):
        schema.resolve_split(bad)


def test_chunk_rule_uses_md5_prefix():
    pid = "BIOUG123-45"
    digest = hashlib.md5(pid.encode()).hexdigest()
    assert schema.chunk_for(pid, "pretrain") == digest[:2]
    assert schema.chunk_for(pid, "train") == digest[:1]
    assert schema.chunk_for(pid, "other_heldout") == digest[:1]
    for split in ("val", "test", "key_unseen", "val_unseen", "test_unseen"):
        assert schema.chunk_for(pid, split) == ""


def test_image_relpath():
    assert schema.image_relpath("cropped_256", "pretrain", "0a", "P1") == "bioscan5m/images/cropped_256/pretrain/0a/P1.jpg"
    assert schema.image_relpath("cropped_256", "test", "", "P1") == "bioscan5m/images/cropped_256/test/P1.jpg"
    assert schema.image_relpath("original_full", "test", None, "P1") == "bioscan5m/images/original_full/test/P1.jpg"
    assert schema.image_relpath("cropped", "val", pd.NA, "P1") == "bioscan5m/images/cropped/val/P1.jpg"
    with pytest.raises(ValueError, match="Unknown image package"):
        schema.image_relpath("thumbnails", "test", "", "P1")


def _write_csv(path, rows):
    frame = pd.DataFrame(rows, columns=list(schema.COLUMNS))
    frame.to_csv(path, index=False)
    return path


def _row(pid, split, species, chunk, genus="Aus"):
    row = {c: "" for c in schema.COLUMNS}
    row.update(processid=pid, sampleid="S" + pid, phylum="Arthropoda", genus=genus, species=species, split=split,
               chunk=chunk, inferred_ranks=3, dna_barcode="ACGT", index_bioscan_1M_insect="")
    row["coord-lat"] = "1.5"
    return row


def test_read_metadata_keeps_string_chunks_and_builds_label_indices(tmp_path):
    path = _write_csv(tmp_path / "m.csv", [
        _row("P1", "pretrain", "", "00"),
        _row("P2", "train", "Aus bus", "0"),
        _row("P3", "test", "Aus aus", ""),
    ])
    df = schema.read_metadata(path)
    assert df["chunk"].tolist()[:2] == ["00", "0"]
    assert pd.isna(df["chunk"].iloc[2])
    assert df["index_bioscan_1M_insect"].dtype == "Int64"
    assert df["inferred_ranks"].dtype == np.uint8
    maps = schema.label_maps(df)
    assert maps["species"] == ["Aus aus", "Aus bus"]
    idx = schema.label_indices(df, maps)
    np.testing.assert_array_equal(idx["species"], [-1, 1, 0])
    np.testing.assert_array_equal(idx["genus"], [0, 0, 0])
    assert schema.read_metadata(path, split="seen")["processid"].tolist() == ["P2", "P3"]


def test_read_metadata_errors_name_file_and_record(tmp_path):
    path = _write_csv(tmp_path / "m.csv", [_row("P1", "train", "A b", "0"), _row("P9", "bogus", "A b", "")])
    with pytest.raises(ValueError, match=r"'P9'.*unknown split 'bogus'"):
        schema.read_metadata(path)
    pd.DataFrame({"processid": ["P1"]}).to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(ValueError, match=r"short.csv: metadata CSV is missing column"):
        schema.read_metadata(tmp_path / "short.csv")


def test_label_indices_reject_labels_outside_the_map():
    df = pd.DataFrame({"processid": ["P1", "P2"], "species": pd.array(["A a", None], dtype="string")})
    with pytest.raises(ValueError, match="record 'P1'"):
        schema.label_indices(df, {"species": ["B b"]})


def test_taxonomy_text_fills_missing_ranks():
    df = pd.DataFrame({r: pd.array(v, dtype="string") for r, v in
                       {"order": ["Diptera"], "family": ["Culicidae"], "genus": [None], "species": [None]}.items()})
    assert schema.taxonomy_text(df) == ["Diptera Culicidae not_classified not_classified"]
