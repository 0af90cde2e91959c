"""benchmarks/scale_benchmark.py at a tiny size: the fast metadata generator (split sizes, distinct
barcodes, columns), every stage's JSON line, and the one-line refusal of a size it cannot honour."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from bioscan_jax.data import schema
from bioscan_jax.data.synthetic import bulk

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "scale_benchmark.py"
ROWS = 20_000


@pytest.fixture(scope="module")
def frame(tmp_path_factory):
    spec = bulk.plan(ROWS, seed=3)
    path = bulk.write_metadata(tmp_path_factory.mktemp("bulk"), spec, chunk_rows=7_000)
    return spec, pd.read_csv(path, dtype=str, keep_default_na=False)


def test_the_generator_keeps_the_real_proportions(frame):
    spec, df = frame
    assert list(df.columns) == list(schema.COLUMNS) and len(df) == ROWS
    scale = ROWS / schema.OFFICIAL_NUM_RECORDS
    sizes = df["split"].value_counts().to_dict()
    assert sizes == spec.split_rows and sum(sizes.values()) == ROWS
    for split, real in schema.OFFICIAL_SPLIT_SIZES.items():
        assert abs(sizes[split] - real * scale) <= (1 if split != "pretrain" else len(schema.SPLITS)), split
    # distinct barcodes: the real fraction, also after rstrip('N'), each barcode in one split
    distinct = df["dna_barcode"].nunique()
    assert distinct == spec.unique_barcodes == round(ROWS * bulk.REAL_UNIQUE_BARCODES / schema.OFFICIAL_NUM_RECORDS)
    assert df["dna_barcode"].str.rstrip("N").nunique() == distinct
    assert (df.groupby("dna_barcode")["split"].nunique() == 1).all()
    assert set("".join(df["dna_barcode"].head(500))) <= set("ACGTN")
    assert df["dna_barcode"].str.len().between(500, schema.MAX_NUCLEOTIDES).all()


def test_the_generator_leaves_labels_missing_where_the_real_data_does(frame):
    spec, df = frame
    pretrain = df[df["split"] == "pretrain"]
    assert (pretrain["species"] == "").all() and (pretrain["order"] != "").mean() > 0.99
    assert (pretrain["genus"] == "").mean() > 0.8
    labelled = df[df["split"] != "pretrain"]
    assert (labelled["species"] != "").all()
    for split, n in spec.split_species.items():
        assert df.loc[df["split"] == split, "species"].nunique() == n, split
    unseen = df[df["split"].isin(schema.UNSEEN_SPLITS)]
    assert unseen["species"].str.contains(" sp. ").all()
    assert set(unseen["genus"]) <= set(df.loc[df["split"] == "train", "genus"])  # unseen species: seen genera
    chunk_width = df["split"].map(schema.CHUNK_HEX_CHARS).fillna(0).astype(int)
    assert (df["chunk"].str.len() == chunk_width).all()
    assert np.isclose(pd.to_numeric(df["area_fraction"]).between(0, 1).mean(), 1.0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rows=10_000, unique_barcodes=10_001), "more than the 10000 records"),
    (dict(rows=100), "needs at least 2000"),
    (dict(rows=10_000, unique_barcodes=5), "every one of the 8 splits needs one"),
])
def test_the_generator_refuses_sizes_it_cannot_honour(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bulk.plan(kwargs.pop("rows"), **kwargs)


def test_the_benchmark_refuses_in_one_line():
    out = subprocess.run([sys.executable, str(SCRIPT), "--rows", "5000", "--unique-barcodes", "6000"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        "scale_benchmark: 6000 distinct barcodes is more than the 5000 records: every distinct barcode needs a record"]


def test_every_stage_prints_its_json_line(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--rows", str(ROWS), "--workdir", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert lines[0]["stage"] == "machine" and lines[0]["cpu_model"]
    stages = {line["stage"]: line for line in lines[1:-1]}
    assert list(stages) == list(("generate", "tfds", "barcodebert_data", "probes", "zsc", "retrieval"))
    for name, line in stages.items():
        assert "error" not in line, line
        assert line["rows"] == ROWS and line["records"] > 0 and line["wall_s"] > 0, name
        assert 0 < line["peak_rss_gb"] < 16 and line["us_per_nlogn"] > 0, name
    spec = bulk.plan(ROWS)
    assert stages["tfds"]["split_sizes"] == spec.split_rows
    assert stages["barcodebert_data"]["dedup_matches_generator"]
    assert stages["retrieval"]["keys"] == spec.split_rows["train"] + spec.split_rows["key_unseen"]
    assert stages["zsc"]["records"] == spec.split_rows["test"] + spec.split_rows["test_unseen"]
    assert stages["probes"]["knn_keys"] == spec.split_barcodes["train"] and stages["probes"]["per_epoch_s"] > 0
    summary = lines[-1]
    assert summary["stage"] == "summary" and summary["slowest"] in stages and summary["violations"] == []
    assert not any(tmp_path.iterdir())  # the CSV and the TFDS build are removed unless --keep


# ============================================================================= the library fixes the benchmark found


def test_first_of_barcode_by_digest_keeps_what_pandas_drop_duplicates_keeps():
    rng = np.random.default_rng(0)
    bases = ["".join(rng.choice(list("ACGT"), 12)) for _ in range(50)]
    values = [b + "N" * int(rng.integers(0, 3)) if rng.random() < 0.9 else None for b in rng.choice(bases, 2_000)]
    values += ["", "NNN", np.nan, pd.NA, "ACGTNACGT", "ACGTNACGTN"]
    series = pd.Series(values, dtype="object")
    reference = ~series.fillna("").astype(str).str.rstrip("N").duplicated(keep="first").to_numpy()
    np.testing.assert_array_equal(schema.first_of_barcode(series), reference)
    np.testing.assert_array_equal(schema.first_of_barcode(series.astype("string")), reference)
    np.testing.assert_array_equal(schema.first_of_barcode(list(series)), reference)


def test_the_builder_normalises_barcodes_chunk_by_chunk(tmp_path, monkeypatch):
    from etils import epath

    from tfds_builder.bioscan5m import records, sources

    spec = bulk.plan(bulk.MIN_ROWS)
    path = pathlib.Path(bulk.write_metadata(tmp_path, spec))
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df.loc[3, "dna_barcode"] = "acgt-" + df.loc[3, "dna_barcode"]  # normalised (case, gap)
    df.loc[7, "dna_barcode"] = "ACGTXACGT"  # not nucleotides: skipped
    df.loc[8, "dna_barcode"] = "ACRYT"  # IUPAC codes: normalised
    df.to_csv(path, index=False)
    meta = sources.MetadataFile(epath.Path(path))
    results = []
    for chunk in (3, records.NORMALISE_CHUNK):
        monkeypatch.setattr(records, "NORMALISE_CHUNK", chunk)
        policy = records.BadRecords("skip", "x")
        results.append((records.read(meta, policy), policy.summary()))
    (small, small_report), (large, large_report) = results
    assert small_report["skipped"]["invalid_barcode"] == 1 and small_report["normalised"] == 2
    assert small_report == large_report
    pd.testing.assert_frame_equal(small.frame, large.frame)
    assert len(small.frame) == bulk.MIN_ROWS - 1 and small.frame.loc[3, "dna_barcode"].startswith("ACGTN")


class _CountingSource(list):
    """A list that counts its batched and single reads."""

    batches = singles = 0

    def __getitem__(self, i):
        type(self).singles += 1
        return super().__getitem__(i)

    def __getitems__(self, indices):
        type(self).batches += 1
        return [list.__getitem__(self, i) for i in indices]


def test_reference_dedup_reads_in_batches():
    from bioscan_jax.data import sources

    records = _CountingSource({schema.FIRST_OF_BARCODE: int(i % 3 == 0), "i": i} for i in range(5_000))
    kept = sources.reference_dedup(records)
    assert _CountingSource.singles == 0 and _CountingSource.batches == 5  # 1024 records a read
    assert [kept[j]["i"] for j in range(len(kept))] == list(range(0, 5_000, 3))


def test_linear_head_predicts_a_block_at_a_time():
    from bioscan_jax.eval import probes

    rng = np.random.default_rng(0)
    head = probes.LinearHead(kernel=rng.standard_normal((8, 50)).astype(np.float32),
                             bias=rng.standard_normal(50).astype(np.float32))
    x = rng.standard_normal((1_000, 8)).astype(np.float32)
    np.testing.assert_array_equal(head.predict(x, max_logits=120), np.argmax(x @ head.kernel + head.bias, axis=-1))


def test_the_reference_linear_probe_does_not_stack_the_kernel_of_every_step(monkeypatch):
    """The per-step kernels (for the parity test's trajectory) are only computed when asked for:
    stacked over an epoch they were steps x d x classes floats (79 GB at BIOSCAN-5M's size)."""
    from bioscan_jax.eval import probes

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((640, 16)).astype(np.float32), rng.integers(0, 40, 640)
    outputs = []
    real_scan = probes.jax.lax.scan

    def scan(f, init, xs):
        carry, ys = real_scan(f, init, xs)
        outputs.append(ys)
        return carry, ys

    monkeypatch.setattr(probes.jax.lax, "scan", scan)
    probes.fit_linear_reference(x, y, num_classes=40, epochs=1, batch_size=64)
    assert outputs == [None]
    _, trajectory = probes.fit_linear_reference(x, y, num_classes=40, epochs=1, batch_size=64, return_trajectory=True)
    assert len(trajectory) == 10 and trajectory[0].shape == (16, 40)
