"""Tests of the CLIBD retrieval evaluation, the blockwise nearest-key search and the report."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

from bioscan_jax.data.schema import EVAL_RANKS
from bioscan_jax.eval.knn import nearest_keys
from bioscan_jax.eval.report import bar_chart, format_table, pair_title
from bioscan_jax.eval.retrieval import (
    clibd_retrieval,
    embed_batches,
    evaluate_retrieval,
    harmonic_mean,
    retrieval_report,
)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NAN = float("nan")


def _angles(degrees) -> np.ndarray:
    rad = np.deg2rad(np.asarray(degrees, np.float64))
    return np.stack([np.cos(rad), np.sin(rad)], axis=1).astype(np.float32)


# ----------------------------------------------------------------------------- hand example
#
# Keys on the unit circle (index: angle -> order, family, genus, species); key 2 has a NaN
# embedding (failed decode) and key 4 has no species label.
#   K0:   0 deg -> 0, 0, 0, 0
#   K1:  90 deg -> 0, 0, 1, 1
#   K2:  NaN    -> 0, 0, 0, 0      (excluded: n_keys_nan = 1)
#   K3: 180 deg -> 0, 1, 2, 2
#   K4: 270 deg -> 1, 2, 3, -1
# Queries (angle; nearest keys by angular distance; true order, family, genus, species):
#   Q0:  10 deg; K0, K1, K4 ; 0, 0, 0, 0
#   Q1:  80 deg; K1, K0, K3 ; 0, 0, 0, 0
#   Q2: 170 deg; K3, K1, K4 ; 0, 1, 2, 2
#   Q3: 200 deg; K3, K4, K1 ; 1, 2, 3, 3    (a species absent from the keys)
#   Q4: 260 deg; K4, K3, K0 ; 1, 2, 3, -1   (no species label: excluded at species)
#   Q5: NaN                 ; 0, 0, 0, 0    (excluded everywhere)
#
# Top-1 hits (nearest key's label == true label):
#   order   Q0 y Q1 y Q2 y Q3 n Q4 y -> micro 4/5; macro (o0: 3/3, o1: 1/2) = 0.75
#   family  Q0 y Q1 y Q2 y Q3 n Q4 y -> micro 4/5; macro (f0: 2/2, f1: 1/1, f2: 1/2) = 2.5/3
#   genus   Q0 y Q1 n Q2 y Q3 n Q4 y -> micro 3/5; macro (g0: 1/2, g2: 1/1, g3: 1/2) = 2/3
#   species Q0 y Q1 n Q2 y Q3 n      -> micro 2/4; macro (s0: 1/2, s2: 1/1, s3: 0/1) = 1.5/3
# Top-3 hits (true label among the 3 nearest keys' labels):
#   order, family, genus: every query -> 1.0
#   species Q0 y Q1 y (K0) Q2 y Q3 n (K3=2, K4=-1, K1=1) -> micro 3/4; macro (1 + 1 + 0)/3
KEY_EMB = np.concatenate([_angles([0, 90]), np.full((1, 2), NAN, np.float32), _angles([180, 270])])
KEY_LABELS = {
    "order": np.array([0, 0, 0, 0, 1]),
    "family": np.array([0, 0, 0, 1, 2]),
    "genus": np.array([0, 1, 0, 2, 3]),
    "species": np.array([0, 1, 0, 2, -1]),
}
QUERY_EMB = np.concatenate([_angles([10, 80, 170, 200, 260]), np.full((1, 2), NAN, np.float32)])
QUERY_LABELS = {
    "order": np.array([0, 0, 0, 1, 1, 0]),
    "family": np.array([0, 0, 1, 2, 2, 0]),
    "genus": np.array([0, 0, 2, 3, 3, 0]),
    "species": np.array([0, 0, 2, 3, -1, 0]),
}
EXPECTED = {
    "order": dict(micro_top1=4 / 5, macro_top1=0.75, micro_top3=1.0, macro_top3=1.0, n_used=5, n_classes=2),
    "family": dict(micro_top1=4 / 5, macro_top1=2.5 / 3, micro_top3=1.0, macro_top3=1.0, n_used=5, n_classes=3),
    "genus": dict(micro_top1=3 / 5, macro_top1=2 / 3, micro_top3=1.0, macro_top3=1.0, n_used=5, n_classes=3),
    "species": dict(micro_top1=2 / 4, macro_top1=1.5 / 3, micro_top3=3 / 4, macro_top3=2 / 3, n_used=4, n_classes=3),
}


@pytest.mark.parametrize("chunks", [(1024, 16384), (2, 2)], ids=["one-block", "blocks-of-2"])
def test_hand_computed_example(chunks):
    result = evaluate_retrieval(
        QUERY_EMB, QUERY_LABELS, KEY_EMB, KEY_LABELS, ks=(1, 3), query_chunk=chunks[0], key_chunk=chunks[1],
        missing_labels="exclude",
    )
    assert (result["n_queries"], result["n_queries_nan"], result["n_keys"], result["n_keys_nan"]) == (6, 1, 5, 1)
    for rank, expected in EXPECTED.items():
        got = result[rank]
        for metric, value in expected.items():
            assert got[metric] == pytest.approx(value), (rank, metric)
        assert got["n_excluded_nan"] == 1
        assert got["n_excluded_unlabelled"] == (1 if rank == "species" else 0)
        assert got["n_excluded"] == got["n_excluded_nan"] + got["n_excluded_unlabelled"]
        assert got["n_used"] + got["n_excluded"] == 6
    assert result["species"]["n_keys_unlabelled"] == 1 and result["genus"]["n_keys_unlabelled"] == 0


def test_missing_label_is_a_class_of_its_own_as_clibd_not_classified():
    """CLIBD writes not_classified for a missing label and compares strings: Q4 (no species)
    counts, and its nearest key K4 (no species either) is a hit. Species top-1: Q0 y, Q1 n, Q2 y,
    Q3 n, Q4 y -> micro 3/5; macro (s0 1/2, s2 1/1, s3 0/1, missing 1/1) = 2.5/4. Top-3: Q1 now
    hits (K0) -> micro 4/5, macro (1 + 1 + 0 + 1)/4."""
    result = evaluate_retrieval(QUERY_EMB, QUERY_LABELS, KEY_EMB, KEY_LABELS, ks=(1, 3))  # the default: 'class'
    species = result["species"]
    assert species["micro_top1"] == pytest.approx(3 / 5) and species["macro_top1"] == pytest.approx(2.5 / 4)
    assert species["micro_top3"] == pytest.approx(4 / 5) and species["macro_top3"] == pytest.approx(3 / 4)
    assert (species["n_used"], species["n_unlabelled"], species["n_excluded_unlabelled"], species["n_classes"]) == (5, 1, 0, 4)
    for rank in ("order", "family", "genus"):  # every query labelled there: both modes agree
        for metric, value in EXPECTED[rank].items():
            assert result[rank][metric] == pytest.approx(value), (rank, metric)
    with pytest.raises(ValueError, match="unknown missing_labels 'drop'"):
        evaluate_retrieval(QUERY_EMB, QUERY_LABELS, KEY_EMB, KEY_LABELS, missing_labels="drop")


def test_overall_accuracy_is_the_mean_of_top1_micro_and_macro_seen_and_unseen_over_ranks_and_pairs():
    """scripts/train_cl.py::compute_overall_acc on a crafted table; NaN cells are left out."""
    from bioscan_jax.eval.retrieval import overall_accuracy

    def cell(micro, macro):
        return {"micro_top1": micro, "macro_top1": macro, "micro_top3": 1.0, "macro_top3": 1.0}

    results = {"skipped_pairs": ["image_to_text"],
               "dna_to_dna": {"seen": {"genus": cell(0.9, 0.8), "species": cell(0.7, 0.6)},
                              "unseen": {"genus": cell(0.5, 0.4), "species": cell(0.3, float("nan"))}},
               "image_to_dna": {"seen": {"genus": cell(0.2, 0.2), "species": cell(0.1, 0.1)},
                                "unseen": {"genus": cell(0.0, 0.0), "species": cell(0.0, 0.0)}}}
    want = (0.9 + 0.8 + 0.7 + 0.6 + 0.5 + 0.4 + 0.3 + 0.2 + 0.2 + 0.1 + 0.1) / 15
    assert overall_accuracy(results, ("genus", "species")) == pytest.approx(want)


def test_hand_computed_harmonic_mean():
    seen = evaluate_retrieval(QUERY_EMB, QUERY_LABELS, KEY_EMB, KEY_LABELS, ks=(1,), missing_labels="exclude")
    # "Unseen" queries: Q3 and Q4 only. Top-1: Q3 misses at every rank, Q4 hits order/family/genus.
    unseen = evaluate_retrieval(
        QUERY_EMB[3:5], {r: v[3:5] for r, v in QUERY_LABELS.items()}, KEY_EMB, KEY_LABELS, ks=(1,),
        missing_labels="exclude",
    )
    report = retrieval_report(seen, unseen)
    assert list(report) == list(EVAL_RANKS)
    order = report["order"]["macro_top1"]
    assert (order["seen"], order["unseen"]) == pytest.approx((0.75, 0.5))
    assert order["hm"] == pytest.approx(2 / (1 / 0.75 + 1 / 0.5))  # 0.6
    assert report["genus"]["macro_top1"]["hm"] == pytest.approx(4 / 7)  # 2 / (3/2 + 2)
    # Unseen species: only Q3, a miss -> 0, and the H.M. is 0 when either side is 0.
    assert report["species"]["macro_top1"]["unseen"] == 0.0
    assert report["species"]["macro_top1"]["hm"] == 0.0


def test_harmonic_mean():
    assert harmonic_mean(0.5, 0.5) == pytest.approx(0.5)
    assert harmonic_mean(1.0, 0.5) == pytest.approx(2 / 3)
    assert harmonic_mean(0.9, 0.0) == 0.0
    assert np.isnan(harmonic_mean(NAN, 0.5))


# ----------------------------------------------------------------------------- search


def _random(n, d, seed):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def test_nearest_keys_matches_sklearn_and_chunking():
    queries, keys = _random(97, 16, 0), _random(1003, 16, 1) * 3.0  # scale must not matter
    nn = NearestNeighbors(n_neighbors=5, metric="cosine", algorithm="brute").fit(keys)
    dist, ref_idx = nn.kneighbors(queries)
    full_idx, full_sims = nearest_keys(queries, keys, 5, query_chunk=10_000, key_chunk=10_000)
    np.testing.assert_array_equal(np.asarray(full_idx), ref_idx)
    np.testing.assert_allclose(np.asarray(full_sims), 1 - dist, atol=1e-5)
    for q_chunk, k_chunk in ((7, 33), (32, 1000), (97, 4), (1, 1003)):
        idx, sims = nearest_keys(queries, keys, 5, query_chunk=q_chunk, key_chunk=k_chunk)
        np.testing.assert_array_equal(np.asarray(idx), ref_idx, err_msg=f"{q_chunk}x{k_chunk}")
        np.testing.assert_allclose(np.asarray(sims), np.asarray(full_sims), atol=1e-6)


def test_nearest_keys_mask_and_errors():
    queries, keys = _random(20, 8, 2), _random(50, 8, 3)
    mask = np.ones(50, bool)
    mask[::3] = False
    idx, _ = nearest_keys(queries, keys, 3, key_mask=mask, key_chunk=7)
    kept = np.flatnonzero(mask)
    ref = NearestNeighbors(n_neighbors=3, metric="cosine", algorithm="brute").fit(keys[kept]).kneighbors(queries)[1]
    np.testing.assert_array_equal(np.asarray(idx), kept[ref])
    # Equal similarities resolve to the lower key index, whatever the blocks.
    dup_keys = np.tile(np.eye(3, dtype=np.float32), (7, 1))
    for k_chunk in (1, 4, 21):
        dup_idx, _ = nearest_keys(np.eye(3, dtype=np.float32), dup_keys, 4, key_chunk=k_chunk)
        np.testing.assert_array_equal(np.asarray(dup_idx), [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]])
    with pytest.raises(ValueError, match="usable keys"):
        nearest_keys(queries, keys[:2], 3)
    with pytest.raises(ValueError, match="query set is empty"):
        nearest_keys(queries[:0], keys, 3)


def test_evaluate_matches_brute_force_on_random_data():
    rng = np.random.default_rng(4)
    queries, keys = _random(120, 12, 5), _random(400, 12, 6)
    k_labels = {r: rng.integers(0, n, size=400) for r, n in zip(EVAL_RANKS, (3, 6, 12, 25), strict=True)}
    q_labels = {r: rng.integers(-1, n, size=120) for r, n in zip(EVAL_RANKS, (3, 6, 12, 25), strict=True)}
    result = evaluate_retrieval(queries, q_labels, keys, k_labels, ks=(1, 3, 5), query_chunk=16, key_chunk=64,
                                missing_labels="exclude")
    sims = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
        keys / np.linalg.norm(keys, axis=1, keepdims=True)
    ).T
    order = np.argsort(-sims, axis=1)
    for rank in EVAL_RANKS:
        true = q_labels[rank]
        used = true >= 0
        for k in (1, 3, 5):
            hits = np.array([true[q] in k_labels[rank][order[q, :k]] for q in range(120)])[used]
            per_class = [hits[true[used] == c].mean() for c in np.unique(true[used])]
            assert result[rank][f"micro_top{k}"] == pytest.approx(hits.mean())
            assert result[rank][f"macro_top{k}"] == pytest.approx(np.mean(per_class))
        assert result[rank]["n_excluded_unlabelled"] == (~used).sum()


def test_bad_input_errors():
    labels1 = {r: np.zeros(1, int) for r in EVAL_RANKS}
    with pytest.raises(ValueError, match="query split 'test_unseen' is empty"):
        evaluate_retrieval(QUERY_EMB[:0], {r: v[:0] for r, v in QUERY_LABELS.items()}, KEY_EMB, KEY_LABELS,
                           query_split="test_unseen")
    with pytest.raises(ValueError, match="key split 'train\\+key_unseen' is empty"):
        evaluate_retrieval(QUERY_EMB, QUERY_LABELS, KEY_EMB[:0], {r: v[:0] for r, v in KEY_LABELS.items()},
                           key_split="train+key_unseen")
    with pytest.raises(ValueError, match="query split 'test' has no finite embedding"):
        evaluate_retrieval(QUERY_EMB[5:], {r: v[5:] for r, v in QUERY_LABELS.items()}, KEY_EMB, KEY_LABELS,
                           query_split="test")
    with pytest.raises(ValueError, match="has no finite embedding"):
        evaluate_retrieval(QUERY_EMB, QUERY_LABELS, KEY_EMB[2:3], {r: v[2:3] for r, v in KEY_LABELS.items()})
    with pytest.raises(ValueError, match="have no rank 'family'"):
        evaluate_retrieval(QUERY_EMB[:1], {"order": labels1["order"]}, KEY_EMB, KEY_LABELS)
    with pytest.raises(ValueError, match="usable keys"):
        evaluate_retrieval(QUERY_EMB, QUERY_LABELS, KEY_EMB, KEY_LABELS, ks=(1, 5))  # 4 usable keys
    # A rank with no labelled query reports NaN with the count, not an error.
    unlabelled = dict(QUERY_LABELS, species=np.full(6, -1))
    result = evaluate_retrieval(QUERY_EMB, unlabelled, KEY_EMB, KEY_LABELS, ks=(1,), missing_labels="exclude")
    assert result["species"]["n_used"] == 0 and result["species"]["n_excluded_unlabelled"] == 5
    assert np.isnan(result["species"]["macro_top1"])


# ----------------------------------------------------------------------------- protocol + report


def _synthetic_splits(seed=0):
    rng = np.random.default_rng(seed)
    sizes = {"train": 60, "key_unseen": 20, "test": 25, "test_unseen": 15}
    embeddings, labels = {}, {}
    for split, n in sizes.items():
        species = rng.integers(0, 8, size=n) + (8 if "unseen" in split else 0)
        centres = np.random.default_rng(1).normal(size=(16, 6))
        embeddings[split] = {
            "dna": (centres[species] + 0.3 * rng.normal(size=(n, 6))).astype(np.float32),
            "image": (centres[species] + 1.5 * rng.normal(size=(n, 6))).astype(np.float32),
        }
        labels[split] = {"order": species // 8, "family": species // 4, "genus": species // 2, "species": species}
    return embeddings, labels


def test_clibd_retrieval_protocol():
    embeddings, labels = _synthetic_splits()
    out = clibd_retrieval(embeddings, labels, pairs=[("dna", "dna"), ("image", "dna"), ("image", "text")], ks=(1, 3))
    assert out["skipped_pairs"] == ["image_to_text"]
    keys = np.concatenate([embeddings["train"]["dna"], embeddings["key_unseen"]["dna"]])
    key_labels = {r: np.concatenate([labels["train"][r], labels["key_unseen"][r]]) for r in EVAL_RANKS}
    direct = evaluate_retrieval(embeddings["test_unseen"]["image"], labels["test_unseen"], keys, key_labels, ks=(1, 3))
    assert out["image_to_dna"]["unseen"] == direct
    report = out["dna_to_dna"]["report"]
    cell = report["species"]["macro_top1"]
    assert cell["hm"] == pytest.approx(harmonic_mean(cell["seen"], cell["unseen"]))
    assert cell["seen"] > 0.8  # tight DNA clusters
    with pytest.raises(ValueError, match="split 'key_unseen' is missing"):
        clibd_retrieval({k: v for k, v in embeddings.items() if k != "key_unseen"},
                        {k: v for k, v in labels.items() if k != "key_unseen"})


def _paper_like_results():
    def rep(seen, unseen):
        return {r: {"macro_top1": {"seen": seen, "unseen": unseen, "hm": harmonic_mean(seen, unseen)}}
                for r in EVAL_RANKS}

    return {
        "No alignment": {"dna_to_dna": rep(0.847, 0.756), "image_to_image": rep(0.242, 0.126),
                         "image_to_dna": rep(0.0, 0.0)},
        "I+D+T": {"dna_to_dna": {"report": rep(0.980, 0.959)}, "image_to_image": rep(0.760, 0.601)},
    }


def test_format_table():
    table = format_table(_paper_like_results())
    assert "DNA→DNA (seen / unseen / H.M.)" in table and pair_title("image_to_dna") == "Image→DNA"
    rows = [line for line in table.splitlines() if line.startswith("| No") or line.startswith("| I+")]
    assert rows[0] == "| No alignment | 84.7 / 75.6 / 79.9 | 24.2 / 12.6 / 16.6 | 0.0 / 0.0 / 0.0 |"
    assert rows[1] == "| I+D+T | 98.0 / 95.9 / 96.9 | 76.0 / 60.1 / 67.1 | – |"
    multi = format_table(_paper_like_results(), ranks=("genus", "species"))
    assert "| I+D+T | genus |" in multi and "| I+D+T | species |" in multi


def test_bar_chart(tmp_path):
    path = bar_chart(_paper_like_results(), tmp_path / "retrieval.png")
    assert os.path.getsize(path) > 1000
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_embed_batches_drops_padding():
    batches = [{"x": np.arange(6.0).reshape(3, 2), "mask": np.array([1, 1, 1])},
               {"x": np.arange(6.0, 12.0).reshape(3, 2), "mask": np.array([1, 0, 0])}]
    out = embed_batches(lambda b: b["x"] * 2, batches)
    np.testing.assert_array_equal(out, np.arange(8.0).reshape(4, 2) * 2)


_SHARDED_SCRIPT = textwrap.dedent(
    """
    import json, os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from bioscan_jax.eval.knn import nearest_keys

    rng = np.random.default_rng(0)
    queries = rng.normal(size=(128, 8)).astype(np.float32)
    keys = rng.normal(size=(300, 8)).astype(np.float32)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    q_sh = jax.device_put(queries, NamedSharding(mesh, P("data")))
    k_rep = jax.device_put(keys, NamedSharding(mesh, P()))
    idx_sh, _ = nearest_keys(q_sh, k_rep, 5, query_chunk=32, key_chunk=64)
    idx_one, _ = nearest_keys(jax.device_put(queries, jax.devices()[0]), keys, 5, query_chunk=32, key_chunk=64)
    print("RESULT " + json.dumps(dict(
        equal=bool(np.array_equal(np.asarray(idx_sh), np.asarray(idx_one))),
        out_devices=len(idx_sh.sharding.device_set),
    )))
    """
)


def test_sharded_queries_give_the_same_neighbours():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-c", _SHARDED_SCRIPT], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    assert result["equal"], result
