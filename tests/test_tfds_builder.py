"""The bioscan5m TFDS builder: TF-free builds, zip vs tree, round trip, bad input.

``tfds_builder/bioscan5m/bioscan5m_dataset_builder_test.py`` runs TFDS's own
``DatasetBuilderTestCase`` (needs TensorFlow); these tests read with
``tfds.data_source`` and need no TensorFlow, except the one marked ``tf``.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pandas as pd
import pytest
import tensorflow_datasets as tfds
from etils import epath

from bioscan_jax.data import schema
from bioscan_jax.data import tfds_source
from bioscan_jax.data import fields
from tfds_builder.bioscan5m import BadRecordError, make_dummy_data

REPO_ROOT = epath.Path(__file__).resolve().parents[1]
DUMMY = epath.Path(make_dummy_data.DUMMY_DIR)
DUMMY_CSV = DUMMY / schema.METADATA_RELPATH

tfds.disable_progress_bar()


def _build(config, data_dir, manual_dir, **kwargs):
    kwargs.setdefault("verify_md5", False)
    return tfds_source.prepare(config, str(data_dir), str(manual_dir) if manual_dir else None, **kwargs)


def _records(builder, split):
    """All records of a split, raw image bytes, normalised, keyed by processid."""
    src = builder.as_data_source(split=split, decoders={fields.IMAGE: tfds.decode.SkipDecoding()} if fields.IMAGE in builder.info.features else None)
    out = {}
    for i in range(len(src)):
        rec = tfds_source.normalize_record(src[i])
        out[rec["processid"]] = rec
    return out


def _all_records(builder):
    out = {}
    for split in builder.info.splits:
        out.update(_records(builder, split))
    return out


@pytest.fixture(scope="module")
def dummy_built(tmp_path_factory):
    """cropped_256 and dna built from dummy_data/ (the extracted tree)."""
    data_dir = tmp_path_factory.mktemp("tfds")
    return {c: _build(c, data_dir, DUMMY) for c in ("cropped_256", "dna")}


# ----------------------------------------------------------------------------- round trip


def _expected(row: pd.Series, column: str):
    value = row[column]
    return None if pd.isna(value) else value


def test_round_trip_every_field_equals_the_csv_row(dummy_built):
    b = dummy_built["cropped_256"]
    df = schema.read_metadata(DUMMY_CSV)
    names = tfds_source.label_names(b)
    got = _all_records(b)
    assert sorted(got) == sorted(df["processid"])
    for _, row in df.iterrows():
        rec = got[row["processid"]]
        for column in schema.COLUMNS:
            feature = fields.feature_name(column)
            want = _expected(row, column)
            if column in schema.LABEL_COLUMNS:
                assert rec[fields.name_feature(column)] == (want or ""), column
                idx = rec[feature]
                assert (idx == -1) == (want is None)
                assert tfds_source.names_of(idx, names[column]) == (want or "")
            elif schema.COLUMN_DTYPES[column] == "string":
                assert rec[feature] == (want or ""), column
            elif schema.COLUMN_DTYPES[column].startswith("float"):
                if want is None:
                    assert np.isnan(rec[feature]), column
                else:
                    assert rec[feature] == np.float32(want), column
            else:  # uint8 / nullable int
                assert rec[feature] == (-1 if want is None else int(want)), column
        # The JPEG bytes are the source file's, byte for byte.
        path = DUMMY / schema.image_relpath("cropped_256", row["split"], _expected(row, "chunk"), row["processid"])
        assert rec[fields.IMAGE] == path.read_bytes()


def test_chunk_with_leading_zeros_survives(dummy_built):
    got = _all_records(dummy_built["dna"])
    assert got["DMY057-24"]["chunk"] == "00"
    assert got["DMY012-24"]["chunk"] == "0"
    assert got["DMY103-24"]["chunk"] == ""  # eval splits have no chunk


def test_label_names_are_built_over_the_whole_csv(dummy_built):
    df = schema.read_metadata(DUMMY_CSV)
    names = tfds_source.label_names(dummy_built["dna"])
    assert names == schema.label_maps(df)
    # A species seen in several splits has one index everywhere.
    got = _all_records(dummy_built["dna"])
    assert got["DMY012-24"]["species"] == got["DMY103-24"]["species"] >= 0


def test_every_split_is_a_tfds_split_and_metasplits_resolve(dummy_built):
    b = dummy_built["dna"]
    assert list(b.info.splits) == list(schema.SPLITS)
    assert tfds_source.tfds_split("seen") == "train+val+test"
    assert tfds_source.tfds_split("validation+train[:1]") == "val+train[:1]"
    src = tfds_source.data_source("bioscan5m/dna", "unseen", data_dir=b.data_dir_root)
    assert len(src) == 6
    with pytest.raises(ValueError, match="Unknown split"):
        tfds_source.tfds_split("bogus")


def test_metadata_records_source_and_skips(dummy_built):
    meta = dummy_built["cropped_256"].info.metadata
    assert meta["image_package"] == "cropped_256"
    assert meta["image_source"]["kind"] == "directory"
    assert meta["metadata_rows"] == 16 and meta["metadata_md5_verified"] is False
    assert meta["on_bad_record"] == "raise" and meta["skipped_total"] == 0


def test_normalize_record_handles_bytes_str_and_arrays():
    raw = {"processid": b"A-1", "species": np.array(3, np.int32), "coord_lat": np.float32(1.5), "image": b"\xff\xd8"}
    user = {"processid": "A-1", "species": 3, "coord_lat": 1.5, "image": memoryview(b"\xff\xd8")}
    assert tfds_source.normalize_record(raw) == tfds_source.normalize_record(user)
    rec = tfds_source.normalize_record(raw)
    assert type(rec["processid"]) is str and type(rec["species"]) is int and type(rec["image"]) is bytes


def test_names_of_maps_missing_and_checks_range():
    assert tfds_source.names_of([[1, -1]], ["a", "b"]).tolist() == [["b", ""]]
    with pytest.raises(IndexError):
        tfds_source.names_of([2], ["a", "b"])


# ----------------------------------------------------------------------------- zips


def _make_zips(out: epath.Path, package: str) -> None:
    """The official zips of ``package`` and the metadata zip, made from dummy_data/."""
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out / "BIOSCAN_5M_Insect_Dataset_metadata_MultiTypes.zip", "w") as zf:
        zf.writestr("bioscan5m/metadata/jsonld/BIOSCAN_5M_Insect_Dataset_metadata.jsonld", "{}")
        zf.write(DUMMY_CSV, schema.METADATA_RELPATH, compress_type=zipfile.ZIP_DEFLATED)
    # pretrain in two parts by chunk, then train and the eval splits; JPEGs stored.
    parts = {"_pretrain.01": ["pretrain/00"], "_pretrain.02": ["pretrain/38"], "_train": ["train"],
             "_eval": ["val", "test", "key_unseen", "val_unseen", "test_unseen", "other_heldout"]}
    base = pathlib.Path(DUMMY / schema.IMAGES_RELDIR / package)
    for suffix, dirs in parts.items():
        with zipfile.ZipFile(out / f"BIOSCAN_5M_{package}{suffix}.zip", "w") as zf:
            for d in dirs:
                for path in sorted((base / d).rglob("*.jpg")):
                    rel = os.fspath(path.relative_to(pathlib.Path(DUMMY)))
                    zf.write(path, rel, compress_type=zipfile.ZIP_DEFLATED if suffix == "_train" else zipfile.ZIP_STORED)
    # An unrelated zip is ignored.
    with zipfile.ZipFile(out / "BIOSCAN_5M_cropped_256.zip", "w") as zf:
        zf.writestr("bioscan5m/images/cropped_256/val/X.jpg", b"not used")


def test_official_zips_and_extracted_tree_give_identical_records(tmp_path):
    package = "original_256"
    zips = epath.Path(tmp_path) / "zips"
    _make_zips(zips, package)
    from_zips = _build(package, tmp_path / "a", zips)
    from_tree = _build(package, tmp_path / "b", DUMMY)
    assert from_zips.info.metadata["image_source"]["kind"] == "zip"
    assert len(from_zips.info.metadata["image_source"]["files"]) == 4
    assert from_tree.info.metadata["image_source"]["kind"] == "directory"
    a, b = _all_records(from_zips), _all_records(from_tree)
    assert len(a) == 16
    for pid in a:
        ra, rb = a[pid], b[pid]
        assert ra.keys() == rb.keys()
        for k in ra:
            assert (ra[k] == rb[k]) or (isinstance(ra[k], float) and np.isnan(ra[k]) and np.isnan(rb[k])), (pid, k)
    # The right package was read.
    row = schema.read_metadata(DUMMY_CSV).iloc[0]
    assert a[row["processid"]]["image"] == make_dummy_data.jpeg(package, 0)


@pytest.mark.parametrize("package", ["cropped", "original_full"])
def test_other_packages_read_their_own_images(tmp_path, package):
    b = _build(package, tmp_path, DUMMY)
    df = schema.read_metadata(DUMMY_CSV)
    got = _all_records(b)
    for i, row in df.iterrows():
        assert got[row["processid"]]["image"] == make_dummy_data.jpeg(package, i)


def test_missing_images_name_the_package_and_its_zips(tmp_path):
    (tmp_path / "bioscan5m/metadata/csv").mkdir(parents=True)
    shutil.copy(DUMMY_CSV, tmp_path / schema.METADATA_RELPATH)
    with pytest.raises(FileNotFoundError, match="BIOSCAN_5M_cropped"):
        _build("cropped", tmp_path / "out", tmp_path)


# ----------------------------------------------------------------------------- TF-free


_TF_FREE = textwrap.dedent(
    """
    import sys

    class _HideTensorFlow:  # as if TensorFlow were not installed
        def __init__(self, inner):
            self._inner = inner
        def find_spec(self, name, path=None, target=None):
            if name == "tensorflow" or name.startswith("tensorflow."):
                return None
            find = getattr(self._inner, "find_spec", None)
            return find(name, path, target) if find else None
        def __getattr__(self, attr):
            return getattr(self._inner, attr)

    sys.meta_path[:] = [_HideTensorFlow(f) for f in sys.meta_path]
    try:
        import tensorflow  # noqa: F401
        raise SystemExit("tensorflow is importable")
    except ImportError:
        pass

    import json
    import numpy as np
    import tensorflow_datasets as tfds
    tfds.disable_progress_bar()
    from bioscan_jax.data import dna, pipeline, tfds_source

    data_dir = sys.argv[1]
    cfg = tfds_source.synthetic_config(200, seed=0)
    syn = tfds_source.prepare(cfg, data_dir)
    root = syn.info.metadata["image_source"]["path"].split("/bioscan5m/images/")[0]
    dna_b = tfds_source.prepare("dna", data_dir, root, verify_md5=False)

    src = tfds_source.data_source(cfg, "train", data_dir)
    images = next(iter(pipeline.image_pipeline(src, batch_size=4, train=True)))
    dsrc = tfds_source.data_source("bioscan5m/dna", "pretrain+other_heldout", data_dir)
    it = iter(pipeline.dna_pipeline(dsrc, tokenizer=dna.KmerTokenizer(4), batch_size=8, train=True, mlm=True))
    batch = next(it)
    print(json.dumps({
        "synthetic_splits": {k: v.num_examples for k, v in syn.info.splits.items()},
        "dna_splits": {k: v.num_examples for k, v in dna_b.info.splits.items()},
        "dna_features": sorted(dna_b.info.features.keys()),
        "image_batch": list(images["image"].shape),
        "dna_batch": {k: list(v.shape) for k, v in batch.items()},
        "first_image": src[0]["image"][:3].hex(),
        "tensorflow_loaded": "tensorflow" in sys.modules,
    }))
    """
)


def test_synthetic_and_dna_build_and_read_without_tensorflow(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.fspath(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-c", _TF_FREE, os.fspath(tmp_path)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["tensorflow_loaded"] is False
    assert set(out["synthetic_splits"]) == set(schema.SPLITS)
    assert out["synthetic_splits"] == out["dna_splits"]
    assert sum(out["dna_splits"].values()) == 200
    assert "image" not in out["dna_features"] and "dna_barcode" in out["dna_features"]
    assert out["image_batch"] == [4, 224, 224, 3]
    assert out["dna_batch"]["ids"] == [8, 165] and set(out["dna_batch"]) == {"ids", "attention_mask", "targets", "mlm_mask"}
    assert out["first_image"] == "ffd8ff"


# ----------------------------------------------------------------------------- tf.data


@pytest.mark.tf
def test_as_dataset_reads_the_array_record_files(dummy_built):
    pytest.importorskip("tensorflow")
    b = dummy_built["cropped_256"]
    ds = b.as_dataset(split="train+val", decoders={fields.IMAGE: tfds.decode.SkipDecoding()})
    via_tf = {tfds_source.normalize_record(r)["processid"]: tfds_source.normalize_record(r) for r in tfds.as_numpy(ds)}
    via_source = {**_records(b, "train"), **_records(b, "val")}
    assert via_tf.keys() == via_source.keys()
    for pid, rec in via_source.items():
        assert via_tf[pid]["image"] == rec["image"] and via_tf[pid]["species"] == rec["species"]
    decoded = next(iter(tfds.load("bioscan5m/cropped_256", split="test[:1]", data_dir=b.data_dir_root, download=False)))
    assert decoded["image"].shape == (8, 11, 3)


# ----------------------------------------------------------------------------- bad input


def _tree(tmp_path, *, images: bool = True) -> epath.Path:
    """A private copy of dummy_data/ (metadata + cropped_256 images) to break."""
    root = epath.Path(tmp_path) / "src"
    (root / "bioscan5m/metadata/csv").mkdir(parents=True)
    shutil.copy(DUMMY_CSV, root / schema.METADATA_RELPATH)
    if images:
        shutil.copytree(DUMMY / schema.IMAGES_RELDIR / "cropped_256", root / schema.IMAGES_RELDIR / "cropped_256")
    return root


def _edit_csv(root: epath.Path, edit) -> None:
    path = root / schema.METADATA_RELPATH
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(edit(lines)))


def _image(root, pid):
    df = schema.read_metadata(root / schema.METADATA_RELPATH)
    row = df[df["processid"] == pid].iloc[0]
    return root / schema.image_relpath("cropped_256", row["split"], _expected(row, "chunk"), pid)


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda p: p.unlink(), "missing_image"),
        (lambda p: p.write_bytes(p.read_bytes()[:-40]), "bad_image"),
        (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 64), "bad_image"),
    ],
    ids=["missing", "truncated", "not-jpeg"],
)
def test_bad_images_raise_or_are_skipped_and_counted(tmp_path, damage, reason):
    root = _tree(tmp_path)
    damage(_image(root, "DMY104-24"))
    with pytest.raises(BadRecordError, match=r"DMY104-24.*" + reason):
        _build("cropped_256", tmp_path / "raise", root)
    b = _build("cropped_256", tmp_path / "skip", root, on_bad_record="skip")
    assert b.info.splits["val"].num_examples == 1
    assert b.info.metadata["skipped"][reason] == 1 and b.info.metadata["skipped_total"] == 1
    assert "DMY104-24" in b.info.metadata["skipped_examples"][reason][0]
    # The counts are saved with the dataset.
    saved = json.loads((epath.Path(b.data_dir) / "metadata.json").read_text())
    assert saved["skipped"][reason] == 1


def test_csv_missing_a_column_raises_naming_file_and_column(tmp_path):
    root = _tree(tmp_path, images=False)
    df = pd.read_csv(root / schema.METADATA_RELPATH, dtype=str, keep_default_na=False)
    df.drop(columns=["scale_factor"]).to_csv(root / schema.METADATA_RELPATH, index=False)
    for mode in ("raise", "skip"):
        with pytest.raises(BadRecordError, match=r"BIOSCAN_5M_Insect_Dataset_metadata\.csv.*scale_factor"):
            _build("dna", tmp_path / mode, root, on_bad_record=mode)


_CSV_DAMAGE = {
    "extra-field": (lambda lines: lines[:3] + [lines[3].rstrip("\n") + ",surplus\n"] + lines[4:], "malformed_row", "DMY012-24"),
    "missing-field": (lambda lines: lines[:3] + [lines[3].rsplit(",", 1)[0] + "\n"] + lines[4:], "malformed_row", "DMY012-24"),
    "bad-number": (lambda lines: lines[:3] + [lines[3].replace(",44.24,", ",north,")] + lines[4:], "malformed_row", "DMY012-24"),
    "unknown-split": (lambda lines: lines[:3] + [lines[3].replace(",train,", ",training,")] + lines[4:], "unknown_split", "DMY012-24"),
    "duplicate": (lambda lines: lines + [lines[3]], "duplicate_processid", "DMY012-24"),
}


@pytest.mark.parametrize("name", list(_CSV_DAMAGE))
def test_bad_rows_raise_naming_the_record(tmp_path, name):
    edit, reason, pid = _CSV_DAMAGE[name]
    root = _tree(tmp_path, images=False)
    _edit_csv(root, edit)
    with pytest.raises(BadRecordError, match=rf"BIOSCAN_5M_Insect_Dataset_metadata\.csv: record .*{pid}.*\[{reason}\]"):
        _build("dna", tmp_path / "out", root)


def test_bad_rows_are_skipped_and_counted_per_reason(tmp_path):
    root = _tree(tmp_path, images=False)

    def edit(lines):
        lines = list(lines)
        lines[3] = lines[3].rstrip("\n") + ",surplus\n"  # DMY012-24 (train): extra field
        lines[4] = lines[4].replace(",train,", ",training,")  # DMY102-24: unknown split
        return lines + [lines[6]]  # DMY104-24 (val) duplicated

    _edit_csv(root, edit)
    b = _build("dna", tmp_path / "out", root, on_bad_record="skip")
    skipped = b.info.metadata["skipped"]
    assert skipped == {"malformed_row": 1, "unknown_split": 1, "duplicate_processid": 1, "bad_chunk": 0,
                       "invalid_barcode": 0, "missing_image": 0, "bad_image": 0}
    assert "train" not in b.info.splits and b.info.metadata["missing_splits"] == ["train"]
    assert b.info.splits["val"].num_examples == 2
    assert b.info.splits.total_num_examples == 14


def test_md5_mismatch_of_the_official_file_raises_unless_opted_out(tmp_path):
    root = _tree(tmp_path, images=False)
    with pytest.raises(BadRecordError, match="verify_md5=False"):
        _build("dna", tmp_path / "a", root, verify_md5=True)
    # The same CSV under another name is not checked.
    other = epath.Path(tmp_path) / "other"
    other.mkdir()
    with zipfile.ZipFile(other / "BIOSCAN_5M_Insect_Dataset_metadata_MultiTypes.zip", "w") as zf:
        zf.write(root / schema.METADATA_RELPATH, "bioscan5m/metadata/csv/my_subset.csv")
    with pytest.raises(FileNotFoundError, match="no member named"):
        _build("dna", tmp_path / "b", other, verify_md5=True)
    shutil.copy(root / schema.METADATA_RELPATH, other / "BIOSCAN_5M_Insect_Dataset_metadata.csv")
    b = _build("dna", tmp_path / "c", other, verify_md5=False)
    assert b.info.metadata["metadata_md5_verified"] is False


def test_unknown_on_bad_record_mode_is_rejected():
    with pytest.raises(ValueError, match="on_bad_record"):
        tfds.builder("bioscan5m/dna", on_bad_record="ignore")


def test_builder_imports_register_without_tensorflow_import():
    code = "import sys, bioscan_jax, tfds_builder.bioscan5m, tensorflow_datasets as t; t.builder_cls('bioscan5m'); print('tensorflow' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=os.fspath(REPO_ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/", timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_image_zip_names():
    from tfds_builder.bioscan5m import jpeg_check, sources

    pat = sources.image_zip_pattern("cropped_256")
    for ok in ("BIOSCAN_5M_cropped_256.zip", "BIOSCAN_5M_cropped_256_pretrain.01.zip", "BIOSCAN_5M_cropped_256_eval.zip"):
        assert pat.fullmatch(ok)
    assert not sources.image_zip_pattern("cropped").fullmatch("BIOSCAN_5M_cropped_256.zip")
    assert sources.image_zip_pattern("original_full").fullmatch("BIOSCAN_5M_original_full.03.zip")
    assert jpeg_check.jpeg_problem(b"\xff\xd8\xff\xe0" + b"x" * 10 + b"\xff\xd9") is None
    assert "truncated" in jpeg_check.jpeg_problem(b"\xff\xd8\xff\xe0" + b"x" * 10)
