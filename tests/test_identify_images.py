"""``bioscan-jax identify --images``: image queries against a DNA (and image) library with a
CLIBD model, its agreement with the CLIBD benchmark, bad input, and the HTML report."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from flax import nnx
from PIL import Image

from bioscan_jax import checkpoint as checkpoint_lib
from bioscan_jax import cli
from bioscan_jax.data import text as text_lib
from bioscan_jax.eval import identify, image_embedder
from bioscan_jax.models import towers

from test_clibd import small_config  # noqa: E402  (the tiny CLIBD task config of tests/test_clibd.py)

RANKS = ("order", "family", "genus", "species")
BOLD_RANKS = {r: f"{r}_name" for r in RANKS}


def _run(*argv) -> int:
    return cli.main([*map(str, argv), "--quiet"])


def _jpeg(pixels: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90, **kwargs)
    return buf.getvalue()


def save_random_run(workdir, modalities: str = "image,dna,text"):
    """A CLIBD run directory of randomly initialised tiny towers (``small_config``'s), in the
    layout ``tasks/clibd`` writes: ``train/config.json``, ``train/checkpoints``, ``text_vocab.json``."""
    from bioscan_jax.tasks.clibd import training as clibd_train

    config = small_config(str(workdir / "no_data"))
    config.model.modalities = modalities
    workdir.mkdir(parents=True, exist_ok=True)
    vocab = text_lib.TaxonomyVocab.build(["Diptera Aus Aus_bus"], max_length=int(config.model.text.max_length))
    vocab.save(str(workdir / clibd_train.VOCAB_FILE))
    model = towers.ClibdModel(clibd_train.model_config(config, text_vocab_size=len(vocab)), rngs=nnx.Rngs(0))
    (workdir / "train").mkdir(parents=True)
    (workdir / "train" / "config.json").write_text(config.to_json_best_effort(indent=2))
    with checkpoint_lib.Checkpointer(workdir / "train" / "checkpoints", async_save=False) as ckpt:
        ckpt.save(1, {"params": nnx.state(model, nnx.Param).to_pure_dict()})
        ckpt.wait()
    return workdir


@pytest.fixture(scope="module")
def random_run(tmp_path_factory):
    return save_random_run(tmp_path_factory.mktemp("random_clibd"))


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """A labelled library of 8 species x 4 specimens: a BOLD TSV of barcodes and a CSV of their
    images; and 10 query images with labels (one of each library species, one of each of 2
    species not in it)."""
    tmp = tmp_path_factory.mktemp("library")
    rng = np.random.default_rng(0)
    rows, images, queries = [], [], []
    for s in range(10):
        base, colour = rng.choice(list("ACGT"), 400), rng.integers(0, 255, 3)
        taxonomy = {"order": f"Order{s % 2}", "family": f"Family{s % 4}", "genus": f"Genus{s}", "species": f"Genus{s} sp{s}"}
        for j in range(5 if s < 8 else 1):
            seq = base.copy()
            seq[rng.integers(0, 400, 8)] = rng.choice(list("ACGT"), 8)
            pixels = np.clip(colour + rng.normal(0, 30, (40, 48, 3)), 0, 255).astype(np.uint8)
            pid = f"S{s}R{j}"
            path = tmp / "img" / f"{pid}.jpg"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(_jpeg(pixels))
            if s < 8 and j < 4:
                rows.append({"processid": pid, "nucleotides": "".join(seq), **{BOLD_RANKS[r]: taxonomy[r] for r in RANKS}})
                images.append({"id": pid, "path": str(path), **taxonomy})
            else:
                queries.append({"id": pid, "path": str(path), **taxonomy})
    pd.DataFrame(rows).to_csv(tmp / "reference.tsv", sep="\t", index=False)
    pd.DataFrame(images).to_csv(tmp / "reference_images.csv", index=False)
    pd.DataFrame(queries).to_csv(tmp / "queries.csv", index=False)
    return tmp


# ============================================================================= the benchmark


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """``tests/test_clibd.py``'s tiny CLIBD task (2 steps on 200 synthetic records), its splits
    exported as a user has them: image files with a CSV of labels, a BOLD TSV of the key barcodes."""
    from bioscan_jax.data import fields, schema
    from bioscan_jax.tasks.clibd import task as clibd
    from bioscan_jax.tasks.clibd import training as clibd_train

    tmp = tmp_path_factory.mktemp("clibd_run")
    config = small_config(str(tmp / "tfds"))
    workdir = str(tmp / "run")
    clibd.run(config, workdir)
    setup = clibd_train.prepare(config, workdir)
    names = {r: fields.name_feature(r) for r in schema.EVAL_RANKS}
    keys = [{"processid": r["processid"], "nucleotides": r["dna_barcode"], **{BOLD_RANKS[k]: r[n] for k, n in names.items()}}
            for split in ("train", "key_unseen") for r in setup.data[split]]
    pd.DataFrame(keys).to_csv(tmp / "reference.tsv", sep="\t", index=False)
    queries = []
    for split in ("test", "test_unseen"):
        (tmp / split).mkdir()
        for r in setup.data[split]:
            path = tmp / split / f"{r['processid']}.jpg"
            path.write_bytes(r["image"])  # the stored JPEG bytes the benchmark decodes
            queries.append({"id": r["processid"], "path": str(path), "split": split, **{k: r[n] for k, n in names.items()}})
    pd.DataFrame(queries).to_csv(tmp / "queries.csv", index=False)
    return config, workdir, setup, tmp


@pytest.mark.slow
def test_identify_images_agrees_with_the_clibd_benchmark(trained_run):
    """Species and genus top-1 micro of ``identify --images`` (test and test_unseen images against
    the train + key_unseen barcodes) = retrieval.json's image->DNA numbers; the image and DNA
    vectors are those of ``clibd_eval``."""
    from bioscan_jax.tasks.clibd import evaluation as clibd_eval
    from bioscan_jax.tasks.clibd import training as clibd_train

    config, workdir, setup, tmp = trained_run
    out = tmp / "pred.tsv"
    assert _run("identify", "--images", "--model", workdir, "--reference", tmp / "reference.tsv", "--min-length", 0,
                "--input", tmp / "queries.csv", "--out", out) == 0
    pred = pd.read_csv(out, sep="\t", dtype=str, keep_default_na=False).set_index("id")
    truth = pd.read_csv(tmp / "queries.csv", dtype=str, keep_default_na=False).set_index("id")
    with open(os.path.join(workdir, "retrieval.json")) as f:
        benchmark = json.load(f)["settings"]["I+D+T"]["image_to_dna"]
    for split, which in (("test", "seen"), ("test_unseen", "unseen")):
        ids = truth.index[truth["split"] == split]
        for rank in ("species", "genus"):
            ours = float((pred.loc[ids, rank] == truth.loc[ids, rank]).mean())
            assert ours == pytest.approx(benchmark[which][rank]["micro_top1"], abs=0.005), (split, rank)
    assert set(pred["nearest_modality"]) == {"dna"} and (pred["novel"] == "").all()
    assert "not calibrated for images" in json.loads((tmp / "pred.tsv.json").read_text())["novelty"]["error"]

    model = clibd_train.load_towers(workdir)
    splits = ("train", "key_unseen", "test")
    batches = clibd_eval.EvalBatches(config, setup, splits, tuple(config.eval.ranks))
    want, _, _ = clibd_eval.embed_splits(config, model, setup, batches, splits)
    assert _run("embed", "--images", "--model", workdir, "--input", tmp / "queries.csv", "--out", tmp / "q.npz") == 0
    with np.load(tmp / "q.npz") as z:
        test_rows = np.flatnonzero(truth["split"].to_numpy() == "test")
        np.testing.assert_allclose(z["embeddings"][test_rows], want["test"]["image"], atol=1e-5)
    args = cli.build_parser().parse_args(["identify", "--images", "--model", workdir, "--reference", "x",
                                          "--input", "x", "--out", "x"])
    dna = cli.clibd_dna_embedder(args, (model, clibd_train.saved_config(workdir)))
    keys = pd.read_csv(tmp / "reference.tsv", sep="\t", dtype=str)
    got = dna.embed(keys["processid"].tolist(), keys["nucleotides"].tolist())
    np.testing.assert_allclose(got.embeddings, np.concatenate([want["train"]["dna"], want["key_unseen"]["dna"]]),
                               atol=1e-5)


# ============================================================================= bad input


def _bad_folder(folder):
    """One image of every kind of trouble; returns ``{id: expected status}``."""
    folder.mkdir()
    rng = np.random.default_rng(1)
    good = (rng.random((40, 52, 3)) * 255).astype(np.uint8)
    (folder / "good.jpg").write_bytes(_jpeg(good))
    (folder / "text.jpg").write_text("not an image, a text file renamed .jpg\n")
    (folder / "empty.jpg").write_bytes(b"")
    rgba = np.dstack([good, np.where(np.arange(52)[None, :].repeat(40, 0) < 26, 0, 255).astype(np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    Image.new("CMYK", (52, 40), (10, 200, 30, 5)).save(folder / "cmyk.jpg", "JPEG")
    Image.new("L", (10_000, 10_000), 128).save(folder / "huge.jpg", "JPEG")  # decoded at 1/8 scale
    Image.new("L", (10_000, 10_000), 128).save(folder / "huge_png.png")  # no reduced decode: refused
    return {"good": "ok", "text": image_embedder.UNDECODABLE, "empty": image_embedder.EMPTY_FILE,
            "alpha": image_embedder.FLATTENED, "cmyk": image_embedder.CMYK, "huge": "ok",
            "huge_png": "image too large"}


def test_bad_images_each_get_a_status_and_nothing_is_dropped(random_run, library, tmp_path):
    expected = _bad_folder(tmp_path / "photos")
    out = tmp_path / "pred.tsv"
    assert _run("identify", "--images", "--model", random_run, "--reference", library / "reference.tsv",
                "--input", tmp_path / "photos", "--out", out) == 0
    pred = pd.read_csv(out, sep="\t", dtype=str, keep_default_na=False).set_index("id")
    assert len(pred) == len(expected)
    for name, status in expected.items():
        assert pred.loc[name, "status"].startswith(status), (name, pred.loc[name, "status"])
        assert (pred.loc[name, "species"] != "") == status.startswith("ok"), name
    assert "PIL's limit" in pred.loc["huge_png", "status"]

    listing = tmp_path / "list.csv"
    listing.write_text(f"id,path\na,{tmp_path / 'photos' / 'good.jpg'}\nb,photos/missing.jpg\nc,\n")
    assert _run("identify", "--images", "--model", random_run, "--reference", library / "reference.tsv",
                "--input", listing, "--out", out) == 0
    pred = pd.read_csv(out, sep="\t", dtype=str, keep_default_na=False)
    assert pred["status"].tolist() == ["ok", image_embedder.NO_FILE, image_embedder.NO_PATH]
    one_column = tmp_path / "paths.csv"  # no delimiter to sniff
    one_column.write_text(f"path\n{tmp_path / 'photos' / 'good.jpg'}\n")
    assert image_embedder.read_images(one_column)[["id", "path"]].values.tolist() == [
        ["good", str(tmp_path / "photos" / "good.jpg")]]


def test_a_huge_jpeg_is_decoded_at_reduced_scale(tmp_path):
    """The 10,000 x 10,000 JPEG's evaluation view costs a few MB, not the 300 MB of its pixels."""
    Image.new("RGB", (10_000, 10_000), (200, 180, 160)).save(tmp_path / "huge.jpg", "JPEG")
    code = ("import resource, sys; from bioscan_jax.eval.image_embedder import load_view; "
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            "view, status = load_view(sys.argv[1], resize=256, crop=224); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, status, view.shape)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "huge.jpg")], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[1] == "ok" and int(out[0]) < 60_000, out  # KiB of peak RSS growth


def _one_line_error(capsys, *argv) -> str:
    assert _run(*argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_reference_and_models_are_one_line_errors(random_run, library, tmp_path, capsys):
    no_dna = tmp_path / "no_dna.tsv"
    pd.read_csv(library / "reference.tsv", sep="\t").drop(columns="nucleotides").to_csv(no_dna, sep="\t", index=False)
    common = ["--input", library / "queries.csv", "--out", tmp_path / "p.tsv"]
    err = _one_line_error(capsys, "identify", "--images", "--model", random_run, "--reference", no_dna, *common)
    assert "no_dna.tsv" in err
    err = _one_line_error(capsys, "identify", "--images", "--model", "kmer:4", "--reference", library / "reference.tsv",
                          *common)
    assert "CLIBD" in err
    dna_only = save_random_run(tmp_path / "dna_text", modalities="dna,text")
    err = _one_line_error(capsys, "identify", "--images", "--model", dna_only, "--reference",
                          library / "reference.tsv", *common)
    assert "no image tower" in err
    err = _one_line_error(capsys, "identify", "--images", "--model", random_run, "--reference",
                          library / "reference.tsv", "--reference-images", library / "img", *common)
    assert "--reference-images" in err and "order" in err
    err = _one_line_error(capsys, "identify", "--images", "--model", random_run, "--reference",
                          library / "reference.tsv", *common, "--report", tmp_path)
    assert "--report" in err


def test_calibration_for_image_queries_holds_out_species_of_both_modalities():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 16))
    species = np.tile(np.repeat([f"s{i}" for i in range(10)], 5), 2)
    modality = np.repeat(["dna", "image"], 50)
    emb = (centres[np.tile(np.repeat(np.arange(10), 5), 2)] + 0.05 * rng.normal(size=(100, 16))).astype(np.float32)
    ref = identify.Reference(ids=np.arange(100).astype(str), embeddings=emb, labels={r: species for r in RANKS},
                             model={"spec": "test"}, modality=modality)
    cal = identify.calibrate_novelty(ref, seed=0, query_modality="image")
    assert cal["held_out_species"] == 2 and cal["novel_queries"] == 10 and cal["known_queries"] == 8
    assert cal["keys"] == 100 - 20 - 8 and cal["queries_modality"] == "image" and cal["auroc"] > 0.95
    scores = cal[identify.CALIBRATION_SCORES]
    assert scores["known"].size == 8 and scores["novel"].size == 10
    assert identify.CALIBRATION_SCORES not in identify.without_scores(cal)


# ============================================================================= the report


@pytest.fixture(scope="module")
def image_report(random_run, library, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    assert _run("identify", "--images", "--model", random_run, "--reference", library / "reference.tsv",
                "--reference-images", library / "reference_images.csv", "--input", library / "queries.csv",
                "--out", tmp / "pred.tsv", "--report", tmp / "report.html") == 0
    return tmp


def _records_in(text: str) -> int:
    return len(re.findall(r"<tr class=\"?record\"?>", text))


def test_image_report_has_a_row_per_record_decodable_images_and_no_urls(image_report, library, random_run, tmp_path):
    text = (image_report / "report.html").read_text()
    pred = pd.read_csv(image_report / "pred.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert _records_in(text) == len(pred) == 10
    assert set(pred["nearest_modality"]) <= {"dna", "image"}
    novelty = json.loads((image_report / "pred.tsv.json").read_text())["novelty"]
    assert novelty["queries_modality"] == "image" and novelty["threshold"] is not None
    assert set(pred["novel"]) <= {"true", "false"}
    sources = re.findall(r"""(?:src|href)=['"]?([^'" >]+)""", text)
    assert sources and not [s for s in sources if re.match(r"https?://", s)]
    assert "http://" not in text and "https://" not in text
    images = [s for s in sources if s.startswith("data:image/")]
    assert len(images) == len(pred) + 1  # one thumbnail per query, and the plot
    for uri in images:
        Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).load()
    assert "Agreement with the labels" in text

    # an index made once for image queries gives the same rows
    assert _run("index", "--images", "--model", random_run, "--reference", library / "reference.tsv",
                "--reference-images", library / "reference_images.csv", "--out", tmp_path / "idx") == 0
    assert _run("identify", "--images", "--reference", tmp_path / "idx", "--input", library / "queries.csv",
                "--out", tmp_path / "again.tsv") == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "again.tsv", sep="\t"), pd.read_csv(image_report / "pred.tsv", sep="\t"))


def test_dna_report(library, tmp_path):
    queries = pd.read_csv(library / "reference.tsv", sep="\t").iloc[::3]
    queries.to_csv(tmp_path / "queries.tsv", sep="\t", index=False)
    assert _run("identify", "--model", "kmer:3", "--reference", library / "reference.tsv", "--input",
                tmp_path / "queries.tsv", "--out", tmp_path / "pred.tsv", "--report", tmp_path / "report.html") == 0
    text = (tmp_path / "report.html").read_text()
    assert _records_in(text) == len(queries)
    assert "species</td><td class=num>" in text and "threshold <b>" in text


def test_report_renders_in_a_browser(image_report, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium): the report's browser check is skipped")
    report = (image_report / "report.html").as_uri()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,1600"]
    dom = subprocess.run([browser, *flags, "--dump-dom", report], capture_output=True, text=True, timeout=120).stdout
    assert _records_in(dom) == 10, dom[-500:]
    shot = tmp_path / "shot.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", report], capture_output=True, timeout=120)
    with Image.open(shot) as img:
        assert img.size == (1280, 1600) and len(img.convert("RGB").getcolors(maxcolors=1 << 20) or [0, 0]) > 1
