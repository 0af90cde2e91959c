"""Faults of round two (reliability): each one clear line or a consistent file, never a duplicate."""

from __future__ import annotations

import json

import numpy as np

from bioscan_jax.train import metrics
from bioscan_jax.train.metrics import MetricsWriter, read_metrics


def _log(workdir, initial_step, steps, *, eval_at=()):
    with MetricsWriter(workdir, initial_step=initial_step, tensorboard=False, progress_bar=False) as writer:
        for step in steps:
            writer.write(step, {"loss": np.float32(1.0 / step), "run": initial_step})
            if step in eval_at:
                writer.write(step, {"val/accuracy": 0.5, "run": initial_step})


def test_a_resumed_run_supersedes_the_rows_after_its_checkpoint(tmp_path):
    """A run logged steps 10..60 but its last checkpoint is step 40 (killed before the next one):
    resumed from 40, it logs 50 and 60 again. metrics.jsonl keeps one row per step and kind, the
    resumed run's, and everything up to the checkpoint, its evaluation at step 40 included."""
    _log(tmp_path, 0, [10, 20, 30, 40, 50, 60], eval_at=(40,))
    _log(tmp_path, 40, [50, 60, 70])
    records = read_metrics(tmp_path)
    assert [(r["step"], "loss" in r) for r in records] == [
        (10, True), (20, True), (30, True), (40, True), (40, False), (50, True), (60, True), (70, True)]
    assert [r["run"] for r in records if r["step"] > 40] == [40, 40, 40]  # the resumed run's rows
    assert not (tmp_path / "metrics.jsonl.tmp").exists()
    assert metrics.logged_value(tmp_path, "loss", 50) == np.float32(1 / 50)


def test_a_restart_from_step_0_does_not_keep_an_earlier_attempt(tmp_path):
    _log(tmp_path, 0, [10, 20])  # killed before its first checkpoint
    _log(tmp_path, 0, [10, 20, 30])
    assert [r["step"] for r in read_metrics(tmp_path)] == [10, 20, 30]


def test_a_row_cut_short_by_a_kill_is_dropped_and_the_file_stays_valid_json_lines(tmp_path):
    _log(tmp_path, 0, [10, 20])
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 30, "loss": 0.0')  # killed mid-write
    _log(tmp_path, 20, [30])
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [10, 20, 30]


def test_supersede_leaves_an_untouched_file_alone(tmp_path):
    _log(tmp_path, 0, [10, 20])
    before = (tmp_path / "metrics.jsonl").stat().st_mtime_ns
    assert metrics.supersede(tmp_path / "metrics.jsonl", 20) == 0
    assert (tmp_path / "metrics.jsonl").stat().st_mtime_ns == before
    assert metrics.supersede(tmp_path / "absent.jsonl", 0) == 0


# ----------------------------------------------------------------------------- the TFDS builder


import pytest  # noqa: E402

from bioscan_jax.data import bold  # noqa: E402
from tfds_builder.bioscan5m import BadRecordError  # noqa: E402
from test_tfds_builder import _all_records, _build, _edit_csv, _tree  # noqa: E402  (dummy_data/ to break)

INVALID = "ACGT12345XYZ" * 50


def _set_field(root, pid: str, column: str, value: str) -> None:
    """Sets one cell of the metadata CSV (the dummy CSV has no quoted fields)."""
    def edit(lines):
        header = lines[0].rstrip("\n").split(",")
        out = [lines[0]]
        for line in lines[1:]:
            cells = line.rstrip("\n").split(",")
            if cells[0] == pid:
                cells[header.index(column)] = value
            out.append(",".join(cells) + "\n")
        return out
    _edit_csv(root, edit)


@pytest.mark.parametrize("pid, value, split, expected", [
    ("DMY057-24", "0", "pretrain", "'00'"),  # pretrain: 2 hex characters
    ("DMY101-24", "3", "pretrain", "'03'"),
])
def test_a_de_zeroed_chunk_is_a_bad_chunk_naming_record_value_and_form_not_a_missing_image(tmp_path, pid, value, split,
                                                                                         expected):
    root = _tree(tmp_path)
    _set_field(root, pid, "chunk", value)
    with pytest.raises(BadRecordError) as e:
        _build("cropped_256", tmp_path / "raise", root)
    message = str(e.value)
    assert f"record {pid!r}: bad chunk value {value!r} for split {split!r}: expected 2 hex characters" in message
    assert f"it should be {expected}" in message and "[bad_chunk]" in message
    assert "not found" not in message and "missing_image" not in message
    b = _build("cropped_256", tmp_path / "skip", root, on_bad_record="skip")
    meta = b.info.metadata
    assert meta["skipped"]["bad_chunk"] == 1 and meta["skipped"]["missing_image"] == 0
    assert pid in meta["skipped_examples"]["bad_chunk"][0]
    assert pid not in _all_records(b)


def test_a_chunk_where_the_split_has_none_and_a_missing_one_are_bad_chunks(tmp_path):
    root = _tree(tmp_path, images=False)
    _set_field(root, "DMY103-24", "chunk", "3")  # val: no chunk folder
    _set_field(root, "DMY012-24", "chunk", "")  # train: 1 hex character needed
    b = _build("dna", tmp_path / "skip", root, on_bad_record="skip")
    examples = b.info.metadata["skipped_examples"]["bad_chunk"]
    assert b.info.metadata["skipped"]["bad_chunk"] == 2
    assert any("'DMY103-24': bad chunk value '3' for split 'val'" in x for x in examples)
    assert any("'DMY012-24': no chunk value for split 'train': expected 1 hex character" in x for x in examples)


def test_an_invalid_barcode_is_skipped_or_raised_as_the_bold_import_does(tmp_path):
    """``ACGT12345XYZ``x50: the BOLD import skips it as invalid_barcode; the builder used to store it."""
    tsv = tmp_path / "bold.tsv"
    tsv.write_text(f"processid\tnucleotides\tspecies_name\nA1\t{INVALID}\tx\nA2\t{'ACGT' * 60}\ty\n")
    _, report = bold.read(tsv, errors="skip")
    assert dict(report.skipped) == {"invalid_barcode": 1}  # the import's verdict on this value

    root = _tree(tmp_path, images=False)
    _set_field(root, "DMY012-24", "dna_barcode", INVALID)
    with pytest.raises(BadRecordError, match=r"record 'DMY012-24': dna_barcode has characters that are not "
                                             r"nucleotides \('1' x50.*\[invalid_barcode\]"):
        _build("dna", tmp_path / "raise", root)
    b = _build("dna", tmp_path / "skip", root, on_bad_record="skip")
    meta = b.info.metadata
    assert meta["skipped"]["invalid_barcode"] == 1 and meta["skipped_total"] == 1
    assert "'DMY012-24'" in meta["skipped_examples"]["invalid_barcode"][0]
    records = _all_records(b)
    assert "DMY012-24" not in records and len(records) == 15
    assert all(set(r["dna_barcode"]) <= set("ACGTN") for r in records.values())


def test_a_barcode_with_iupac_codes_gaps_or_lower_case_is_normalised_as_the_import_does_and_counted(tmp_path):
    raw = "acgt-RYacgu" + "ACGT" * 60
    tsv = tmp_path / "bold.tsv"
    tsv.write_text(f"processid\tnucleotides\tspecies_name\nA1\t{raw}\tx\n")
    imported, _ = bold.read(tsv, errors="skip")

    root = _tree(tmp_path, images=False)
    _set_field(root, "DMY102-24", "dna_barcode", raw)
    for mode in ("raise", "skip"):
        b = _build("dna", tmp_path / mode, root, on_bad_record=mode)
        meta = b.info.metadata
        assert meta["normalised"] == 1 and meta["normalised_columns"] == {"dna_barcode": 1}
        assert "'DMY102-24'" in meta["normalised_examples"][0] and meta["skipped_total"] == 0
        stored = _all_records(b)["DMY102-24"]["dna_barcode"]
        assert stored == imported["dna_barcode"].iloc[0] and set(stored) <= set("ACGTN")
