"""Tests of the synthetic BIOSCAN-5M generator: layout, schema, split rules, DNA signal, images."""

from __future__ import annotations

import hashlib
import pathlib
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bioscan_jax.data import schema, synthetic
from bioscan_jax.data.synthetic import images as images_lib

NUM_RECORDS = 1500
SEED = 0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[pathlib.Path, pd.DataFrame]:
    """A small dataset with images, written once for the module: (root, metadata)."""
    root = tmp_path_factory.mktemp("synthetic")
    csv_path = synthetic.generate(root, num_records=NUM_RECORDS, seed=SEED, workers=2)
    assert csv_path == root / schema.METADATA_RELPATH
    return root, schema.read_metadata(csv_path)


@pytest.fixture(scope="module")
def df(dataset) -> pd.DataFrame:
    return dataset[1]


@pytest.fixture(scope="module")
def default_metadata() -> pd.DataFrame:
    """Metadata of the default-size dataset (no images needed for the DNA checks)."""
    return synthetic.simulate(synthetic.DEFAULT_NUM_RECORDS, SEED).metadata


def _image_path(root: pathlib.Path, row) -> pathlib.Path:
    chunk = "" if pd.isna(row.chunk) else row.chunk
    return root / schema.image_relpath(schema.DEFAULT_IMAGE_PACKAGE, row.split, chunk, row.processid)


# ----------------------------------------------------------------------------- schema and layout


def test_csv_has_official_columns_and_dtypes(dataset):
    root, df = dataset
    header = (root / schema.METADATA_RELPATH).read_text().splitlines()[0].split(",")
    assert tuple(header) == schema.COLUMNS
    assert len(df) == NUM_RECORDS
    for column, dtype in schema.COLUMN_DTYPES.items():
        assert str(df[column].dtype) == str(pd.Series([], dtype=dtype).dtype), column


def test_chunk_column_follows_schema_and_keeps_leading_zeros(df):
    assert pd.api.types.is_string_dtype(df["chunk"])
    expected = [schema.chunk_for(p, s) for p, s in zip(df["processid"], df["split"], strict=True)]
    assert df["chunk"].fillna("").tolist() == expected
    chunks = df["chunk"].dropna()
    assert chunks.str.startswith("0").any(), "no chunk with a leading zero survived the round trip"
    lengths = df.assign(n=df["chunk"].str.len().fillna(0)).groupby("split")["n"].unique()
    for split in schema.SPLITS:
        assert set(lengths[split]) == {schema.CHUNK_HEX_CHARS.get(split, 0)}, split


def test_every_split_is_present(df):
    assert set(df["split"]) == set(schema.SPLITS)


def test_every_image_exists_and_is_a_256px_jpeg(dataset):
    root, df = dataset
    written = {p.relative_to(root).as_posix() for p in (root / schema.IMAGES_RELDIR).rglob("*.jpg")}
    expected = set()
    for row in df.itertuples(index=False):
        path = _image_path(root, row)
        expected.add(path.relative_to(root).as_posix())
        with Image.open(path) as im:
            assert im.format == "JPEG", path
            assert im.mode == "RGB", path
            assert min(im.size) == images_lib.SHORT_SIDE, (path, im.size)
            assert max(im.size) <= images_lib.MAX_LONG_SIDE, (path, im.size)
    assert written == expected
    with Image.open(_image_path(root, next(df.itertuples(index=False)))) as im:
        im.load()  # decodes fully


def test_images_are_bright_like_bioscan(dataset):
    root, df = dataset
    rows = df.sample(60, random_state=0).itertuples(index=False)
    means = [np.asarray(Image.open(_image_path(root, r)), dtype=np.float64).mean(axis=(0, 1)) / 255 for r in rows]
    mean = np.mean(means, axis=0)
    assert np.all(np.abs(mean - np.array(schema.RGB_MEAN)) < 0.08), mean


# ----------------------------------------------------------------------------- identifiers and labels


def test_identifiers_look_like_bioscan(df):
    assert df["processid"].is_unique and df["sampleid"].is_unique
    assert df["processid"].str.fullmatch(r"[A-Z]{4}\d+-\d{2}").all()
    assert df["sampleid"].str.fullmatch(r"BIOUG\d{5}-[A-H]\d{2}").all()
    bins = df["dna_bin"].dropna()
    assert bins.str.fullmatch(r"BOLD:[A-Z]{3}\d{4}").all()
    assert 0 < df["dna_bin"].isna().mean() < 0.1


def test_taxonomy_is_a_tree_under_arthropoda(df):
    assert (df["phylum"] == "Arthropoda").all()
    assert (df["class"] == "Insecta").mean() > 0.6
    assert df["class"].nunique() >= 2
    for child, parent in (("order", "class"), ("family", "order"), ("genus", "family"), ("species", "genus")):
        pairs = df[[child, parent]].dropna().drop_duplicates()
        assert pairs[child].is_unique, f"a {child} has several {parent}s"
    labelled = df.dropna(subset=["species"])
    assert all(s.startswith(g + " ") for s, g in zip(labelled["species"], labelled["genus"], strict=True))
    names = pd.concat([df[r].dropna() for r in ("order", "family", "subfamily", "genus")]).unique()
    assert all(re.fullmatch(r"[A-Z][a-z]+", n) for n in names)
    assert df["family"].dropna().str.endswith("idae").all()
    assert df["subfamily"].dropna().str.endswith("inae").all()
    # Some families have no subfamilies: genus filled, subfamily empty.
    assert (df["genus"].notna() & df["subfamily"].isna()).any()


def test_taxon_and_inferred_ranks_agree_with_filled_ranks(df):
    ranks = list(synthetic.LABEL_RANKS)
    filled = df[ranks].notna()
    assert (df["inferred_ranks"].astype(int) == filled.sum(axis=1)).all()
    lowest = [row.dropna().iloc[-1] if row.notna().any() else "Arthropoda" for _, row in df[ranks].iterrows()]
    assert df["taxon"].tolist() == lowest
    # Labels are filled top-down: no rank is filled below an empty one (subfamily may be absent).
    for upper, lower in (("class", "order"), ("order", "family"), ("family", "genus"), ("genus", "species")):
        assert not (df[upper].isna() & df[lower].notna()).any(), (upper, lower)


def test_bioscan_1m_index_is_nullable_and_only_for_insects(df):
    index = df["index_bioscan_1M_insect"]
    assert index.isna().any() and index.notna().any()
    assert index.dropna().is_unique
    assert (df.loc[index.notna(), "class"] == "Insecta").all()


def test_geography_is_plausible_with_some_gaps(df):
    assert df["country"].notna().mean() > 0.95
    assert df["province_state"].isna().any() and df["coord-lat"].isna().any()
    lat, lon = df["coord-lat"].dropna(), df["coord-lon"].dropna()
    assert lat.between(-90, 90).all() and lon.between(-180, 180).all()
    assert df.loc[df["province_state"].notna(), "country"].notna().all()


# ----------------------------------------------------------------------------- split rules


def _species(df: pd.DataFrame, splits) -> set[str]:
    return set(df.loc[df["split"].isin(splits), "species"].dropna())


def test_labelled_splits_have_species_and_pretrain_mostly_does_not(df):
    labelled = df[df["split"] != "pretrain"]
    assert labelled["species"].notna().all()
    pretrain = df[df["split"] == "pretrain"]
    assert pretrain["species"].isna().mean() > 0.95
    assert pretrain["genus"].isna().mean() > 0.5
    assert pretrain["order"].notna().mean() > 0.9
    assert (df["split"] == "pretrain").mean() > 0.5  # the bulk of the records


def test_seen_and_unseen_species_follow_bioscan_rules(df):
    seen = _species(df, schema.SEEN_SPLITS)
    unseen = _species(df, schema.UNSEEN_SPLITS)
    heldout = _species(df, ["other_heldout"])
    assert seen and unseen and heldout
    assert not seen & unseen and not heldout & (seen | unseen)
    assert all(re.fullmatch(r"[A-Z][a-z]+ [a-z]+", s) for s in seen)
    assert all(re.fullmatch(r"[A-Z][a-z]+ sp\. [A-Z]{3}\d{4}", s) for s in unseen)
    train_genera = set(df.loc[df["split"] == "train", "genus"])
    unseen_genera = set(df.loc[df["split"].isin(schema.UNSEEN_SPLITS), "genus"])
    assert unseen_genera <= train_genera
    assert _species(df, ["val", "test"]) <= _species(df, ["train"])
    assert _species(df, ["val_unseen", "test_unseen"]) <= _species(df, ["key_unseen"])


def test_same_barcode_means_same_split(df):
    per_barcode = df.groupby("dna_barcode")["split"].nunique()
    assert per_barcode.max() == 1
    sizes = df["dna_barcode"].value_counts()
    assert (sizes > 1).any(), "no shared barcodes: the rule would be untested"
    assert df.groupby("dna_barcode")["species"].nunique().max() <= 1


def test_seen_species_have_enough_training_records(default_metadata):
    df = default_metadata
    train = df[df["split"] == "train"]["species"].value_counts()
    assert train.min() >= 15
    assert 50 <= len(train) <= 150
    assert set(df.loc[df["split"] == "test", "species"]) == set(train.index)


# ----------------------------------------------------------------------------- DNA


def test_barcodes_look_like_coi(df):
    codes = df["dna_barcode"]
    assert codes.str.fullmatch(r"[ACGTN]+").all()
    lengths = codes.str.len()
    assert lengths.between(500, 700).all() and lengths.median() == 658
    text = "".join(codes)
    bases = len(text) - text.count("N")
    assert 0.62 <= (text.count("A") + text.count("T")) / bases <= 0.72
    stripped = codes.str.rstrip("N")
    assert (stripped.str.len() < lengths).any()  # trailing N
    assert stripped.str.contains("N").mean() > 0.1  # internal N runs


def _kmer_profiles(seqs, k: int) -> np.ndarray:
    """Unit-norm counts of overlapping ACGT k-mers (k-mers with N are skipped)."""
    lut = np.full(256, 4, dtype=np.int64)
    lut[np.frombuffer(b"ACGT", dtype=np.uint8)] = np.arange(4)
    weights = 4 ** np.arange(k - 1, -1, -1)
    out = np.zeros((len(seqs), 4**k), dtype=np.float64)
    for i, seq in enumerate(seqs):
        codes = lut[np.frombuffer(seq.encode(), dtype=np.uint8)]
        windows = np.lib.stride_tricks.sliding_window_view(codes, k)
        windows = windows[(windows < 4).all(axis=1)]
        out[i] = np.bincount(windows @ weights, minlength=4**k)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def _nearest_label_accuracy(df: pd.DataFrame, query_split: str, rank: str, k: int) -> float:
    keys = df[df["split"] == "train"]
    queries = df[df["split"] == query_split]
    sims = _kmer_profiles(queries["dna_barcode"], k) @ _kmer_profiles(keys["dna_barcode"], k).T
    predicted = keys[rank].to_numpy()[sims.argmax(axis=1)]
    return float(np.mean(predicted == queries[rank].to_numpy()))


@pytest.mark.parametrize("k", [4, 6])
def test_dna_signal_is_calibrated_like_real_barcodes(default_metadata, k):
    """1-NN on k-mer profiles: species of seen test records almost always, genus of unseen
    species (keys = train) well above chance but far from perfect, as on real COI."""
    species_accuracy = _nearest_label_accuracy(default_metadata, "test", "species", k)
    genus_accuracy = _nearest_label_accuracy(default_metadata, "test_unseen", "genus", k)
    queries = default_metadata.loc[default_metadata["split"] == "test_unseen", "genus"]
    chance = queries.value_counts(normalize=True).max()
    assert species_accuracy >= 0.95
    assert 0.5 <= genus_accuracy <= 0.9
    assert genus_accuracy > chance + 0.3


def test_divergence_grows_with_taxonomic_distance(default_metadata):
    """Mean p-distance of full-length, N-free barcodes: within species < within genus < across orders."""
    d = default_metadata
    d = d[d["species"].notna() & (d["dna_barcode"].str.len() == 658) & ~d["dna_barcode"].str.contains("N")]
    d = d.groupby("species").head(4).reset_index(drop=True)
    seqs = np.stack([np.frombuffer(s.encode(), dtype=np.uint8) for s in d["dna_barcode"]])
    rng = np.random.default_rng(0)
    i, j = rng.integers(0, len(d), (2, 40000))
    keep = i != j
    i, j = i[keep], j[keep]
    dist = (seqs[i] != seqs[j]).mean(axis=1)
    same = {r: d[r].to_numpy()[i] == d[r].to_numpy()[j] for r in ("species", "genus", "order")}
    within_species = dist[same["species"]].mean()
    within_genus = dist[same["genus"] & ~same["species"]].mean()
    across_orders = dist[~same["order"]].mean()
    assert within_species < 0.02
    assert 0.04 < within_genus < 0.12
    assert across_orders > 0.18
    assert within_species < within_genus < across_orders


# ----------------------------------------------------------------------------- image sizes


def test_size_fields_match_the_drawn_specimens(dataset):
    root, df = dataset
    sim = synthetic.simulate(NUM_RECORDS, SEED)
    jobs = synthetic.specimen_jobs(sim, SEED)
    for i in np.random.default_rng(1).choice(len(df), 25, replace=False):
        row = df.iloc[i]
        mask = np.asarray(images_lib.specimen_mask(jobs[i])) > 0
        h, w = mask.shape
        ys, xs = np.nonzero(mask)
        bw, bh = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        assert row["area_fraction"] == round(bw * bh / (w * h), 4)
        assert row["scale_factor"] == round(min(bw, bh) / 256, 4)
        if not np.isnan(row["image_measurement_value"]):
            assert row["image_measurement_value"] == mask.sum()
        # The mask is where the specimen is in the photograph: it differs from the background.
        image = np.asarray(Image.open(_image_path(root, row)), dtype=np.float64)
        assert image.shape[:2] == (h, w)
        background = np.median(image[~mask], axis=0)
        contrast = np.abs(image - background).sum(axis=2)
        assert contrast[mask].mean() > 4 * contrast[~mask].mean()
    assert df["image_measurement_value"].isna().any()
    assert df["area_fraction"].between(0.05, 1.0).all() and df["scale_factor"].between(0.05, 1.33).all()


def test_images_carry_taxonomic_signal(dataset):
    """Colour statistics of the specimen pixels: 1-NN finds the order far above chance."""
    root, df = dataset
    rows = df[df["split"] == "train"].groupby("order").head(40).reset_index(drop=True)
    feats = []
    for row in rows.itertuples(index=False):
        image = np.asarray(Image.open(_image_path(root, row)).resize((64, 64)), dtype=np.float64) / 255
        dark = image.mean(axis=2) < np.median(image.mean(axis=2)) - 0.1
        pixels = image[dark] if dark.sum() > 10 else image.reshape(-1, 3)
        feats.append(np.r_[pixels.mean(axis=0), pixels.std(axis=0), dark.mean()])
    x = np.asarray(feats)
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-9)
    dist = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(dist, np.inf)
    labels = rows["order"].to_numpy()
    accuracy = np.mean(labels[dist.argmin(axis=1)] == labels)
    chance = rows["order"].value_counts(normalize=True).max()
    assert accuracy > chance + 0.2, (accuracy, chance)


# ----------------------------------------------------------------------------- determinism and API


def _digest(root: pathlib.Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.md5(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    one = synthetic.generate(tmp_path / "one", num_records=300, seed=3, workers=1)
    two = synthetic.generate(tmp_path / "two", num_records=300, seed=3, workers=2)
    assert _digest(tmp_path / "one") == _digest(tmp_path / "two")
    meta_only = synthetic.generate(tmp_path / "meta", num_records=300, seed=3, images=False)
    assert meta_only.read_bytes() == one.read_bytes() == two.read_bytes()
    assert not (tmp_path / "meta" / schema.IMAGES_RELDIR).exists()
    other = synthetic.generate(tmp_path / "other", num_records=300, seed=4, images=False)
    assert other.read_bytes() != one.read_bytes()


def test_image_package_names_the_folder(tmp_path):
    csv_path = synthetic.generate(tmp_path, num_records=120, seed=0, image_package="original_256", workers=1)
    df = schema.read_metadata(csv_path)
    row = df.iloc[0]
    chunk = "" if pd.isna(row["chunk"]) else row["chunk"]
    assert (tmp_path / schema.image_relpath("original_256", row["split"], chunk, row["processid"])).exists()
    with pytest.raises(ValueError, match="image package"):
        synthetic.generate(tmp_path, num_records=120, image_package="thumbnails")


def test_cli_writes_metadata(tmp_path, capsys):
    assert synthetic.main(["--out", str(tmp_path), "--records", "150", "--seed", "5", "--no-images"]) == 0
    df = schema.read_metadata(tmp_path / schema.METADATA_RELPATH)
    assert len(df) == 150 and set(df["split"]) == set(schema.SPLITS)
    assert "wrote 150 records" in capsys.readouterr().out


def test_rejects_too_few_records_and_negative_seeds():
    with pytest.raises(ValueError, match="at least"):
        synthetic.simulate(synthetic.MIN_NUM_RECORDS - 1)
    with pytest.raises(ValueError, match="seed"):
        synthetic.simulate(500, seed=-1)
