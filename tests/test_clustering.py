"""Tests of the zero-shot clustering evaluation: Ward + cut, scores, reduction, fusion, errors."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.cluster.hierarchy import fcluster
from sklearn.cluster import AgglomerativeClustering
from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score, silhouette_score

from bioscan_jax.eval import clustering as zsc
from bioscan_jax.eval.ward import cut_linkage, ward_cluster, ward_linkage


def _blobs(n: int, k: int, d: int, seed: int, spread: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * spread
    y = np.arange(n) % k  # every cluster present
    rng.shuffle(y)
    return centres[y] + rng.normal(size=(n, d)), y


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when the labelings are equal up to renaming (a bijection between labels)."""
    pairs = np.unique(np.stack([a, b], axis=1), axis=0).shape[0]
    return pairs == np.unique(a).size == np.unique(b).size


# ----------------------------------------------------------------------------- Ward


@pytest.mark.parametrize(
    ("kind", "n", "k", "d", "seed"),
    [
        ("blobs", 60, 3, 10, 0),
        ("blobs", 500, 25, 10, 1),
        ("blobs", 2000, 100, 50, 2),
        ("noise", 300, 30, 20, 3),
        ("noise", 2000, 200, 50, 4),
        ("noise2d", 1000, 200, 2, 5),
    ],
)
def test_ward_matches_sklearn(kind, n, k, d, seed):
    if kind == "blobs":
        x, _ = _blobs(n, k, d, seed)
    else:
        x = np.random.default_rng(seed).normal(size=(n, d))
    ours = ward_cluster(x, n_clusters=k)
    ref = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(x)
    assert np.unique(ours).size == k
    assert _same_partition(ours, ref)
    assert adjusted_mutual_info_score(ref, ours) == pytest.approx(1.0)


def test_ward_distance_threshold_matches_sklearn():
    x, _ = _blobs(400, 12, 8, seed=6)
    z = ward_linkage(x)
    t = float(np.median(z[-30:, 2]))  # somewhere among the top merges
    ours = cut_linkage(z, distance_threshold=t)
    ref = AgglomerativeClustering(n_clusters=None, distance_threshold=t, linkage="ward").fit(x)
    assert np.unique(ours).size == ref.n_clusters_
    assert _same_partition(ours, ref.labels_)


def test_cut_gives_exactly_k_with_tied_heights():
    # Two pairs of duplicate points: both first merges have height 0. Cutting at a height
    # (fcluster maxclust) cannot separate them and returns 2 clusters for k=3; replaying
    # n - k merges gives exactly 3.
    x = np.array([[0.0, 0.0], [0.0, 0.0], [5.0, 5.0], [5.0, 5.0]])
    z = ward_linkage(x)
    assert np.unique(fcluster(z, t=3, criterion="maxclust")).size == 2
    labels = cut_linkage(z, n_clusters=3)
    assert np.unique(labels).size == 3
    # Many duplicates (identical barcodes → identical DNA embeddings).
    rng = np.random.default_rng(7)
    x = np.repeat(rng.normal(size=(50, 4)), 6, axis=0)
    for k in (10, 50, 51, 120, 300):
        assert np.unique(cut_linkage(ward_linkage(x), n_clusters=k)).size == k


def test_cut_labels_canonical_and_bounds():
    x, _ = _blobs(100, 5, 3, seed=8)
    z = ward_linkage(x)
    labels = cut_linkage(z, n_clusters=5)
    assert labels.dtype == np.int64 and labels[0] == 0
    _, first = np.unique(labels, return_index=True)
    assert np.all(np.diff(first) > 0)  # numbered in order of first appearance
    assert np.array_equal(cut_linkage(z, n_clusters=100), np.arange(100))
    assert np.all(cut_linkage(z, n_clusters=1) == 0)
    with pytest.raises(ValueError, match="n_clusters"):
        cut_linkage(z, n_clusters=101)
    with pytest.raises(ValueError, match="exactly one"):
        cut_linkage(z)


# ----------------------------------------------------------------------------- scores


def test_scores_equal_sklearn_and_exclude_missing():
    rng = np.random.default_rng(9)
    n = 400
    pred = rng.integers(0, 20, n)
    species = np.where(rng.random(n) < 0.7, pred, rng.integers(0, 20, n))
    genus = species // 3
    genus_missing = genus.copy()
    genus_missing[rng.random(n) < 0.25] = -1
    labels = {"genus": genus_missing, "species": species, "dna_bin": np.full(n, -1)}
    out = zsc.score_clustering(pred, labels, missing="drop")

    assert out["ami/species"] == adjusted_mutual_info_score(species, pred)
    assert out["ari/species"] == adjusted_rand_score(species, pred)
    assert out["n_used/species"] == n and out["n_excluded/species"] == 0
    keep = genus_missing != -1
    assert out["n_excluded/genus"] == int((~keep).sum()) > 0
    assert out["n_used/genus"] == int(keep.sum())
    assert out["ami/genus"] == adjusted_mutual_info_score(genus[keep], pred[keep])
    assert out["ari/genus"] == adjusted_rand_score(genus[keep], pred[keep])
    assert out["ami/genus"] != adjusted_mutual_info_score(genus_missing, pred)  # -1 is not a class
    assert out["n_classes/genus"] == np.unique(genus[keep]).size
    assert np.isnan(out["ami/dna_bin"]) and out["n_used/dna_bin"] == 0 and out["n_excluded/dna_bin"] == n
    # the other policy is on record too
    assert out["ami_class/genus"] == adjusted_mutual_info_score(genus_missing, pred)


def test_missing_label_is_its_own_class_by_default_as_the_reference_notebook():
    """zs-ssl-clustering notebooks/results-BIOSCAN5M.ipynb scores adjusted_mutual_info_score on
    cat.codes, where a missing label is -1: one more class, every record kept."""
    rng = np.random.default_rng(3)
    n = 300
    pred = rng.integers(0, 12, n)
    genus = np.where(rng.random(n) < 0.6, pred // 2, rng.integers(0, 6, n))
    genus[rng.random(n) < 0.3] = -1
    out = zsc.score_clustering(pred, {"genus": genus})
    assert out["ami/genus"] == adjusted_mutual_info_score(genus, pred)
    assert out["ari/genus"] == adjusted_rand_score(genus, pred)
    assert out["n_used/genus"] == n and out["n_excluded/genus"] == 0
    assert out["n_missing/genus"] == int((genus == -1).sum()) > 0
    assert out["n_classes/genus"] == np.unique(genus).size  # -1 counted
    keep = genus != -1
    assert out["ami_drop/genus"] == adjusted_mutual_info_score(genus[keep], pred[keep])
    with pytest.raises(ValueError, match="missing="):
        zsc.score_clustering(pred, {"genus": genus}, missing="ignore")


def test_elementwise_zscore_prenorm_is_per_partition_and_modality_as_the_reference():
    """zs-ssl-clustering io.py::load_embeddings with prenorm='elementwise_zscore': each (partition,
    modality) block is centred and divided by its own column std (ddof 0), then modalities are
    concatenated along features and partitions along records."""
    rng = np.random.default_rng(4)
    image = rng.normal(5.0, 2.0, size=(30, 4)).astype(np.float32)
    dna = rng.normal(-1.0, 0.5, size=(30, 3)).astype(np.float32)
    partition = np.array(["test"] * 18 + ["test_unseen"] * 12)
    image[18:] += 10.0  # the partitions differ in offset: per-partition statistics remove it

    def reference(block):  # the reference's two lines, in float64 for comparison
        block = block.astype(np.float64)
        block = block - np.mean(block, axis=0)
        return block / np.std(block, axis=0)

    expected = np.concatenate([
        np.concatenate([reference(image[:18]), reference(dna[:18])], axis=1),
        np.concatenate([reference(image[18:]), reference(dna[18:])], axis=1)], axis=0)
    got = zsc.prenorm_embeddings({"image": image, "dna": dna}, partition, "elementwise_zscore")
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # one partition (None) is the whole-set z-score of each modality; 'fused' is the previous rule
    whole = zsc.prenorm_embeddings({"dna": dna}, None, "elementwise_zscore")
    np.testing.assert_allclose(whole, reference(dna), atol=1e-5)
    np.testing.assert_array_equal(zsc.prenorm_embeddings({"dna": dna}, partition, "fused"), dna)
    np.testing.assert_allclose(zsc.prenorm_embeddings({"image": image, "dna": dna}, partition, "fused"),
                               zsc.fuse_embeddings({"image": image, "dna": dna}))
    with pytest.raises(ValueError, match="prenorm="):
        zsc.prenorm_embeddings({"dna": dna}, partition, "l2")


def test_label_checks():
    pred = np.zeros(10, dtype=int)
    with pytest.raises(ValueError, match="Unknown label column"):
        zsc.score_clustering(pred, {"bin": np.zeros(10, int)})
    with pytest.raises(ValueError, match=r"shape \(10,\)"):
        zsc.score_clustering(pred, {"species": np.zeros(9, int)})
    with pytest.raises(ValueError, match="integer"):
        zsc.score_clustering(pred, {"species": np.zeros(10)})
    with pytest.raises(ValueError, match="-2"):
        zsc.score_clustering(pred, {"species": np.full(10, -2)})


def test_silhouette_subsample_matches_sklearn():
    x, y = _blobs(300, 6, 5, seed=10)
    full, n_full = zsc.silhouette(x, y, max_samples=1000)
    assert n_full == 300 and full == pytest.approx(silhouette_score(x, y))
    sub, n_sub = zsc.silhouette(x, y, max_samples=100, seed=3)
    idx = np.sort(np.random.default_rng(3).choice(300, size=100, replace=False))
    assert n_sub == 100 and sub == pytest.approx(silhouette_score(x[idx], y[idx]))
    assert np.isnan(zsc.silhouette(x, np.zeros(300, int))[0])


# ----------------------------------------------------------------------------- fusion


def test_fusion_zscores_then_concatenates():
    rng = np.random.default_rng(11)
    image = rng.normal(3.0, 5.0, size=(50, 4)).astype(np.float32)
    dna = rng.normal(-1.0, 0.1, size=(50, 3))
    dna[:, 2] = 7.0  # constant feature
    fused = zsc.fuse_embeddings({"image": image, "dna": dna})
    assert fused.shape == (50, 7) and fused.dtype == np.float64
    np.testing.assert_allclose(fused.mean(axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(fused[:, :6].std(axis=0), 1.0, rtol=1e-5)
    assert np.all(fused[:, 6] == 0.0)
    np.testing.assert_allclose(fused[:, :4], (image - image.mean(0)) / image.std(0), rtol=1e-4, atol=1e-5)
    assert zsc.fuse_embeddings({"image": image, "image2": image}).dtype == np.float32
    with pytest.raises(ValueError, match="different numbers of records"):
        zsc.fuse_embeddings({"image": image, "dna": dna[:40]})
    dna[5, 0] = np.nan
    with pytest.raises(ValueError, match=r"dna: 1 of 50"):
        zsc.fuse_embeddings({"image": image, "dna": dna})


# ----------------------------------------------------------------------------- bad input


def test_nan_inf_embeddings_rejected_with_encoder_and_count():
    x, y = _blobs(100, 5, 8, seed=12)
    x[[3, 40], 1] = np.nan
    x[70, 0] = np.inf
    with pytest.raises(ValueError, match=r"DINO ViT-B: 3 of 100 embedding rows contain NaN or inf \(first at row 3\)"):
        zsc.evaluate_clustering(x, {"species": y}, encoder="DINO ViT-B", reduction="none")


def test_too_few_records_or_one_species():
    x, y = _blobs(20, 5, 4, seed=13)
    with pytest.raises(ValueError, match="only one species"):
        zsc.evaluate_clustering(x, {"species": np.zeros(20, int)}, encoder="enc", reduction="none")
    species = np.arange(20) + 100  # 19 species over 20 records is fine
    species[1] = 100
    assert zsc.evaluate_clustering(x, {"species": species}, reduction="none")["n_clusters"] == 19
    with pytest.raises(ValueError, match="fewer than the 30 clusters"):
        zsc.evaluate_clustering(x, {"species": y}, reduction="none", n_clusters=30)
    with pytest.raises(ValueError, match="no record has a species label"):
        zsc.evaluate_clustering(x, {"species": np.full(20, -1)}, reduction="none")
    with pytest.raises(ValueError, match="needs more than 51 records"):
        zsc.evaluate_clustering(x, {"species": y}, encoder="enc")  # UMAP to 50 dims


def test_fewer_records_than_species():
    # 40 records of which 30 are labelled with 30 distinct species: k = 30 <= 40 is fine;
    # with a subset of 25 records the same labels give 25 < 30 species... every record
    # distinct, so build it directly.
    x = np.random.default_rng(14).normal(size=(25, 3))
    species = np.arange(25)
    assert zsc.evaluate_clustering(x, {"species": species}, reduction="none")["n_clusters"] == 25
    with pytest.raises(ValueError, match="25 records is fewer than the 26 clusters"):
        zsc.cluster_embeddings(x, n_clusters=26, reduction="none")


# ----------------------------------------------------------------------------- pipeline


def _labelled_set(seed: int = 15, n: int = 240, k: int = 12, d: int = 32):
    x, species = _blobs(n, k, d, seed, spread=4.0)
    genus = species // 3
    order = species // 6
    subfamily = genus.copy()
    subfamily[::7] = -1
    return x, {"order": order, "subfamily": subfamily, "genus": genus, "species": species}


def test_evaluate_result_dict_reduction_none():
    x, labels = _labelled_set()
    out = zsc.evaluate_clustering(x, labels, encoder="enc", reduction="none", missing="drop")
    assert out["encoder"] == "enc" and out["n_records"] == 240 and out["n_features"] == 32
    assert out["n_clusters"] == out["n_species"] == 12
    assert out["reduction"] == "none"
    ref = AgglomerativeClustering(n_clusters=12, linkage="ward").fit_predict(x)
    assert out["ami/species"] == pytest.approx(adjusted_mutual_info_score(labels["species"], ref))
    assert list(k for k in out if k.startswith("ami/")) == ["ami/order", "ami/subfamily", "ami/genus", "ami/species"]
    assert out["n_excluded/subfamily"] == len(range(0, 240, 7)) and out["n_used/subfamily"] == 240 - 35
    assert -1.0 <= out["silhouette"] <= 1.0 and out["silhouette/n_samples"] == 240
    for key in ("reduce", "cluster", "score", "silhouette", "total"):
        assert out[f"time/{key}_s"] >= 0.0


def test_evaluate_distance_threshold():
    x, labels = _labelled_set()
    z = ward_linkage(x)
    t = float((z[-12, 2] + z[-11, 2]) / 2)  # between the 12th and 11th last merges → 12 clusters
    out = zsc.evaluate_clustering(x, labels, reduction="none", distance_threshold=t)
    assert out["n_clusters"] == 12 and out["distance_threshold"] == t


def test_pca_reduction_deterministic():
    x, labels = _labelled_set()
    a = zsc.evaluate_clustering(x, labels, reduction="pca", n_components=8)
    b = zsc.evaluate_clustering(x, labels, reduction="pca", n_components=8)
    assert a["reduction/n_components"] == 8
    assert a["ami/species"] == b["ami/species"] and a["silhouette"] == b["silhouette"]
    with pytest.raises(ValueError, match="Unknown reduction"):
        zsc.reduce_embeddings(x, "tsne")


def test_umap_reference_deterministic():
    x, labels = _labelled_set(n=200, k=10, d=64)
    first, red1, _ = zsc.cluster_embeddings(x, n_clusters=10, seed=0)
    second, red2, info = zsc.cluster_embeddings(x, n_clusters=10, seed=0)
    assert red1.shape == (200, 50)
    assert info["reduction/n_neighbors"] == 30 and not info["reduction/n_neighbors_adapted"]
    np.testing.assert_array_equal(red1, red2)
    np.testing.assert_array_equal(first, second)
    # Well-separated blobs survive UMAP + Ward.
    assert adjusted_mutual_info_score(labels["species"], first) > 0.9


def test_umap_adapts_n_neighbors_for_small_sets():
    x, _ = _blobs(20, 4, 6, seed=16)
    with pytest.warns(UserWarning, match="n_neighbors lowered from 30 to 19"):
        red, info = zsc.reduce_embeddings(x, "umap", n_components=2)
    assert red.shape == (20, 2)
    assert info["reduction/n_neighbors"] == 19 and info["reduction/n_neighbors_adapted"]


def test_umap_import_is_tensorflow_free():
    import sys

    if "tensorflow" in sys.modules:
        pytest.skip("TensorFlow was already imported by another test")
    zsc.import_umap()
    assert "tensorflow" not in sys.modules
    assert "umap.parametric_umap" not in sys.modules  # the temporary block is lifted


# ----------------------------------------------------------------------------- plots


def test_plots_write_pngs(tmp_path):
    from bioscan_jax.eval import clustering_plots as plots

    results = {
        "BarcodeBERT (DNA)": {"ami/class": 0.9, "ami/order": 0.8, "ami/species": 0.45},
        "DINO ViT-B (image)": {"order": 0.5, "species": 0.21},
    }
    p = plots.plot_ami_by_rank(results, tmp_path / "ami.png", title="ZSC")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    xy = np.random.default_rng(17).normal(size=(300, 2))
    order = np.arange(300) % 25
    order[:10] = -1
    names = [f"Order{i}" for i in range(25)]
    q = plots.plot_umap_scatter(xy, order, tmp_path / "sub" / "umap.png", order_names=names)
    assert q.exists() and q.stat().st_size > 1000
    assert plots.rank_display_name("dna_bin") == "BIN"
