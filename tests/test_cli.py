"""``bioscan-jax embed`` / ``index`` / ``identify`` end to end on real barcodes, and their bad input."""

from __future__ import annotations

import gzip
import json
import re

import numpy as np
import pandas as pd
import pytest

from bioscan_jax import cli
from bioscan_jax.data import bold, dna
from bioscan_jax.eval import identify


@pytest.fixture(scope="module")
def real_split(real_barcodes_path, tmp_path_factory):
    """30 species of the real barcodes: 24 seen (reference = their first 70% records), 6 unseen."""
    tmp = tmp_path_factory.mktemp("cli")
    raw = pd.read_csv(real_barcodes_path, sep="\t", dtype=str)
    species = sorted(raw["species_name"].unique())[:30]
    raw = raw[raw["species_name"].isin(species)].groupby("species_name").head(20).reset_index(drop=True)
    seen = set(species[:24])
    rank = raw.groupby("species_name").cumcount()
    is_ref = raw["species_name"].isin(seen) & (rank < 14)
    raw[is_ref].to_csv(tmp / "reference.tsv", sep="\t", index=False)
    queries = raw[~is_ref].copy()
    queries.to_csv(tmp / "queries.tsv", sep="\t", index=False)
    return tmp, raw[is_ref], queries, seen


def _run(*argv) -> int:
    return cli.main([*map(str, argv), "--quiet"])


def test_embed_kmer_counts_every_record_with_a_status(tmp_path, capsys):
    fasta = tmp_path / "mine.fasta"
    fasta.write_text(">a\nACGTACGTAC\nGTACGT\n>b\nNNNNNNNN\n>c\n\n>d\nACGXACGTACGT\n>e\nAC\n")
    assert _run("embed", "--model", "kmer:3", "--input", fasta, "--out", tmp_path / "out.npz") == 0
    with np.load(tmp_path / "out.npz") as z:
        assert z["ids"].tolist() == ["a", "b", "c", "d", "e"]
        status = z["status"].tolist()
        emb = z["embeddings"]
    assert status[0] == "ok" and status[1] == "no valid bases" and status[2] == "no barcode"
    assert status[3] == "ok (1 invalid characters read as N)" and status[4] == "no complete k-mer"
    assert emb.shape == (5, 64) and np.isnan(emb[1:3]).all() and np.isnan(emb[4]).all()
    ids, mask = dna.KmerTokenizer(3, stride=1, strip_trailing_n=True)("ACGTACGTACGTACGT")
    counts = dna.kmer_counts(np.where(mask, ids, dna.UNK_ID)[None], 3, dtype=np.float32)[0]
    np.testing.assert_allclose(emb[0], counts / counts.sum())
    assert "3 without an embedding" in capsys.readouterr().out


def test_identify_with_kmer_finds_seen_species_and_flags_unseen(real_split, tmp_path):
    tmp, ref, queries, seen = real_split
    out = tmp_path / "pred.tsv"
    assert _run("identify", "--model", "kmer:5", "--reference", tmp / "reference.tsv", "--input",
                tmp / "queries.tsv", "--out", out) == 0
    pred = pd.read_csv(out, sep="\t", dtype=str, keep_default_na=False).set_index("id")
    assert list(pred.columns) == ["order", "order_similarity", "family", "family_similarity", "genus",
                                  "genus_similarity", "species", "species_similarity", "nearest_id",
                                  "novel_score", "novel", "status"]
    assert len(pred) == len(queries) and (pred["status"] == "ok").all()
    truth = queries.set_index("processid")
    known = truth.index[truth["species_name"].isin(seen)]
    assert (pred.loc[known, "species"] == truth.loc[known, "species_name"]).mean() >= 0.98
    novel = ~truth["species_name"].isin(seen)
    assert (pred.loc[truth.index[novel], "novel"] == "true").mean() > 0.7  # 79% here
    assert (pred.loc[known, "novel"] == "false").mean() > 0.8
    report = json.loads((tmp_path / "pred.tsv.json").read_text())
    assert report["reference_records"] == len(ref) and 0.5 < report["novelty"]["auroc"] <= 1.0


def test_index_then_identify_gives_the_same_predictions(real_split, tmp_path):
    tmp, _, _, _ = real_split
    assert _run("index", "--model", "kmer:4", "--reference", tmp / "reference.tsv", "--out", tmp_path / "idx") == 0
    reference = identify.Reference.load(tmp_path / "idx")
    assert reference.model["spec"] == "kmer:4" and reference.embeddings.shape[1] == 256
    assert _run("identify", "--reference", tmp_path / "idx", "--input", tmp / "queries.tsv",
                "--out", tmp_path / "a.tsv") == 0
    assert _run("identify", "--model", "kmer:4", "--reference", tmp / "reference.tsv", "--input",
                tmp / "queries.tsv", "--out", tmp_path / "b.tsv") == 0
    a = pd.read_csv(tmp_path / "a.tsv", sep="\t")
    b = pd.read_csv(tmp_path / "b.tsv", sep="\t")
    pd.testing.assert_frame_equal(a, b)
    assert _run("identify", "--model", "kmer:5", "--reference", tmp_path / "idx", "--input", tmp / "queries.tsv",
                "--out", tmp_path / "c.tsv") == 1  # another model than the index's


def test_reference_barcodes_shorter_than_min_length_are_left_out_and_counted(real_split, tmp_path, capsys):
    tmp, ref, _, _ = real_split
    ref = ref.copy()
    ref.loc[ref.index[:3], "nucleotides"] = ref["nucleotides"].iloc[:3].str[:150]  # fragments
    ref.to_csv(tmp_path / "ref.tsv", sep="\t", index=False)
    assert _run("index", "--model", "kmer:4", "--reference", tmp_path / "ref.tsv", "--out", tmp_path / "idx") == 0
    kept = identify.Reference.load(tmp_path / "idx")
    assert len(kept.ids) == len(ref) - 3 and kept.skipped == {"too_short": 3}
    assert not set(ref["processid"].iloc[:3]) & set(kept.ids)
    assert "left out: {'too_short': 3}" in capsys.readouterr().out
    assert _run("index", "--model", "kmer:4", "--reference", tmp_path / "ref.tsv", "--out", tmp_path / "all",
                "--min-length", "0") == 0
    assert len(identify.Reference.load(tmp_path / "all").ids) == len(ref)


def test_calibration_separates_held_out_species():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(12, 16))
    species = np.repeat([f"s{i}" for i in range(12)], 10)
    emb = (centres.repeat(10, axis=0) + 0.05 * rng.normal(size=(120, 16))).astype(np.float32)
    ref = identify.Reference(ids=np.arange(120).astype(str), embeddings=emb,
                             labels={r: species for r in identify.RANKS}, model={"spec": "test"})
    cal = identify.calibrate_novelty(ref, seed=1)
    assert cal["auroc"] > 0.95 and cal["held_out_species"] == 2 and cal["novel_queries"] == 20
    assert cal["known_queries"] == 20 and cal["keys"] == 80 and cal["recall"] > 0.9


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (gzip.compress(b"processid\tnucleotides\nA\tACGT\n"), "gzip"),
    (b"processid\tcolour\nA\tred\n", "no barcode column.*columns found: processid, colour"),
    (b"id,dna_barcode\nA,ACGT\nA,ACGT\n", "'A' appears more than once"),
])
def test_bad_input_files_fail_with_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "input.tsv"
    path.write_bytes(content)
    assert _run("embed", "--model", "kmer:3", "--input", path, "--out", tmp_path / "o.npz") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err


def test_unknown_model_spec_says_what_a_spec_is(tmp_path, capsys):
    path = tmp_path / "q.csv"
    path.write_text("id,dna_barcode\nA,ACGTACGT\n")
    assert _run("embed", "--model", "no/such/model", "--input", path, "--out", tmp_path / "o.npz") == 1
    err = capsys.readouterr().err
    assert "no such file or directory" in err and "kmer:K" in err and "BarcodeBERT workdir" in err


def test_reference_without_a_rank_column_is_named(tmp_path, capsys, real_barcodes_path):
    raw = pd.read_csv(real_barcodes_path, sep="\t", dtype=str).head(30)
    raw.drop(columns=["family_name"]).to_csv(tmp_path / "ref.tsv", sep="\t", index=False)
    frame, _ = bold.read(tmp_path / "ref.tsv")
    assert frame["family"].isna().all()  # the import keeps the rank, empty
    with pytest.raises(ValueError, match="no order column"):
        identify.labels_of(frame.drop(columns=["order"]))


def test_embed_images_needs_a_clibd_model(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"\xff\xd8\xff")
    assert cli.main(["embed", "--images", "--model", "kmer:4", "--input", str(folder), "--out", str(tmp_path / "o.npz")]) == 1
    assert "--images needs a CLIBD best.pth" in capsys.readouterr().err
    assert cli.main(["embed", "--images", "--model", str(tmp_path), "--input", str(tmp_path / "none"),
                     "--out", str(tmp_path / "o.npz")]) == 1
    assert "no image folder or list" in capsys.readouterr().err


# ----------------------------------------------------------------------------- an unwritable --out


def test_an_out_under_a_regular_file_is_one_line_before_any_work(tmp_path):
    """As a user runs it: the problem with --out is found before the input is read or embedded
    (it used to be a raw NotADirectoryError after all the work)."""
    import subprocess
    import sys

    fasta = tmp_path / "mine.fasta"
    fasta.write_text(">a\nACGTACGTACGTACGT\n")
    (tmp_path / "results").write_text("a file, not a folder")
    out_path = tmp_path / "results" / "run1" / "out.npz"
    out = subprocess.run([sys.executable, "-m", "bioscan_jax", "embed", "--model", "kmer:3", "--input", str(fasta),
                          "--out", str(out_path), "--quiet"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"bioscan-jax embed: error: cannot write --out {out_path}: {tmp_path / 'results'} is a file, not a directory"]


@pytest.mark.parametrize("command, make, problem", [
    ("embed", lambda p: p.mkdir(), "it is a directory; give a file name"),
    ("identify", lambda p: p.mkdir(), "it is a directory; give a file name"),
    ("index", lambda p: p.write_text("x"), "it is a file, not a directory"),
    ("convert", lambda p: (p / "checkpoints").mkdir(parents=True), "{out}/checkpoints exists; choose an empty --out directory"),
])
def test_an_out_of_the_wrong_kind_is_refused_before_the_input_is_read(tmp_path, capsys, command, make, problem):
    out = tmp_path / "out"
    make(out)
    args = {"embed": ["--model", "kmer:3", "--input", tmp_path / "absent.fasta"],
            "identify": ["--model", "kmer:3", "--reference", tmp_path / "absent.tsv", "--input", tmp_path / "absent.fasta"],
            "index": ["--model", "kmer:3", "--reference", tmp_path / "absent.tsv"],
            "convert": ["--model", tmp_path / "absent.pt"]}[command]
    assert _run(command, *args, "--out", out) == 1  # the missing input is never reached
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"bioscan-jax {command}: error: cannot write --out {out}: {problem.format(out=out)}"]


def test_an_out_on_a_read_only_file_system_is_refused(tmp_path, capsys):
    import subprocess

    ro = tmp_path / "ro"
    ro.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here ({done.stderr.strip() or done.returncode})")
    try:
        for command, out in (("identify", ro / "pred.tsv"), ("index", ro / "idx")):
            extra = ["--input", tmp_path / "absent.fasta"] if command == "identify" else []
            assert _run(command, "--model", "kmer:3", "--reference", tmp_path / "absent.tsv", *extra, "--out", out) == 1
            assert capsys.readouterr().err.strip().splitlines() == [
                f"bioscan-jax {command}: error: cannot write --out {out}: read-only file system"]
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


def test_identify_says_why_novel_is_empty_when_it_cannot_be_calibrated(tmp_path, capsys):
    """A one-record reference cannot calibrate the novelty threshold: the printed line says so
    and why, the JSON keeps the reason, and the column is empty rather than silently blank."""
    ref = tmp_path / "ref.fasta"
    ref.write_text(">r1|order=Diptera|family=Culicidae|genus=Aedes|species=Aedes aegypti\n" + "ACGT" * 60 + "\n")
    query = tmp_path / "q.fasta"
    query.write_text(">q1\n" + "ACGT" * 60 + "\n")
    out = tmp_path / "pred.tsv"
    assert _run("identify", "--model", "kmer:4", "--reference", ref, "--input", query, "--out", out, "--min-length", 0) == 0
    printed = capsys.readouterr().out
    assert "novelty not calibrated (novelty calibration needs at least 5 reference species" in printed
    assert "the 'novel' column is empty" in printed
    row = pd.read_csv(out, sep="\t", dtype=str, keep_default_na=False).iloc[0]
    assert row["novel"] == "" and row["species"] == "Aedes aegypti"
    assert "error" in json.loads((tmp_path / "pred.tsv.json").read_text())["novelty"]
