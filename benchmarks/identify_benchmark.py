"""``bioscan-jax identify`` on real barcodes, and ``index`` + ``identify`` throughput.

  python benchmarks/identify_benchmark.py --model kmer:5
  python benchmarks/identify_benchmark.py --model workdirs/barcodebert_tiny
  python benchmarks/identify_benchmark.py --model kmer:5 --throughput --references 100000 --queries 10000

Accuracy: the real BOLD barcodes of ../shared/data/real_barcodes, split by species with the
project's seeded split (80 seen species: 80% of their records are the reference, 20% queries;
20 unseen species: all records are queries). Reported: species top-1 of seen-species queries,
order/family/genus of unseen-species queries, the novelty AUROC on the queries (unseen = novel)
and the calibrated threshold's precision/recall. Throughput: references and queries drawn from
the real barcodes with 1% random substitutions. One JSON line per result.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import sys
import tempfile
import time

import numpy as np
import pandas as pd

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
REAL = REPO.parent / "shared" / "data" / "real_barcodes" / "canadian_invertebrates_100sp.tsv"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def accuracy(model: str, seed: int, out: pathlib.Path) -> dict:
    from sklearn.metrics import roc_auc_score

    from bioscan_jax import cli
    from bioscan_jax.data import bold

    raw = pd.read_csv(REAL, sep="\t", dtype=str)
    frame, _ = bold.read(REAL)
    frame = bold.assign_species_split(frame, unseen_fraction=0.2, test_fraction=0.2, seed=seed)
    split = dict(zip(frame["processid"], frame["split"]))
    raw["split"] = raw["processid"].map(split)
    raw[raw["split"] == "train"].drop(columns="split").to_csv(out / "reference.tsv", sep="\t", index=False)
    queries = raw[raw["split"].isin(["test", "test_unseen"])]
    queries.drop(columns="split").to_csv(out / "queries.tsv", sep="\t", index=False)
    t0 = time.perf_counter()
    rc = cli.main(["identify", "--model", model, "--reference", str(out / "reference.tsv"), "--input",
                   str(out / "queries.tsv"), "--out", str(out / "predictions.tsv"), "--quiet", "--seed", str(seed)])
    seconds = time.perf_counter() - t0
    assert rc == 0
    pred = pd.read_csv(out / "predictions.tsv", sep="\t", dtype=str, keep_default_na=False).set_index("id")
    truth = queries.set_index("processid")
    seen = truth.index[truth["split"] == "test"]
    unseen = truth.index[truth["split"] == "test_unseen"]

    def acc(ids, rank):
        return float((pred.loc[ids, rank] == truth.loc[ids, f"{rank}_name"].fillna("")).mean())

    score = pred.loc[truth.index, "novel_score"].astype(float).to_numpy()
    is_novel = (truth["split"] == "test_unseen").to_numpy()
    report = json.loads((out / "predictions.tsv.json").read_text())
    flagged = pred.loc[truth.index, "novel"].to_numpy() == "true"
    return {"benchmark": "identify_real_barcodes", "model": model, "seed": seed,
            "reference_records": report["reference_records"], "seen_queries": len(seen), "unseen_queries": len(unseen),
            "species_top1_seen": acc(seen, "species"), "genus_top1_seen": acc(seen, "genus"),
            "genus_top1_unseen": acc(unseen, "genus"), "family_top1_unseen": acc(unseen, "family"),
            "order_top1_unseen": acc(unseen, "order"),
            "novelty_auroc_queries": float(roc_auc_score(is_novel, score)),
            "novelty_precision_queries": float((flagged & is_novel).sum() / max(flagged.sum(), 1)),
            "novelty_recall_queries": float((flagged & is_novel).sum() / max(is_novel.sum(), 1)),
            "calibration": report["novelty"], "seconds": seconds}


def _mutated(seqs: np.ndarray, n: int, rng: np.random.Generator) -> list[str]:
    picks = seqs[rng.integers(0, len(seqs), n)]
    out = []
    for s in picks:
        b = np.frombuffer(s.encode(), np.uint8).copy()
        hit = rng.random(b.size) < 0.01
        b[hit] = np.frombuffer(b"ACGT", np.uint8)[rng.integers(0, 4, int(hit.sum()))]
        out.append(b.tobytes().decode())
    return out


def throughput(model: str, references: int, queries: int, out: pathlib.Path) -> list[dict]:
    from bioscan_jax import cli

    raw = pd.read_csv(REAL, sep="\t", dtype=str).dropna(subset=["nucleotides"])
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(raw), references)
    ref = raw.iloc[idx].copy()
    ref["processid"] = [f"R{i}" for i in range(references)]
    ref["nucleotides"] = _mutated(raw["nucleotides"].to_numpy(), references, rng)
    ref.to_csv(out / "reference.tsv", sep="\t", index=False)
    pd.DataFrame({"processid": [f"Q{i}" for i in range(queries)],
                  "nucleotides": _mutated(raw["nucleotides"].to_numpy(), queries, rng)}).to_csv(
        out / "queries.tsv", sep="\t", index=False)
    t0 = time.perf_counter()
    assert cli.main(["index", "--model", model, "--reference", str(out / "reference.tsv"), "--out",
                     str(out / "index"), "--quiet"]) == 0
    t1 = time.perf_counter()
    assert cli.main(["identify", "--reference", str(out / "index"), "--input", str(out / "queries.tsv"),
                     "--out", str(out / "predictions.tsv"), "--quiet"]) == 0
    t2 = time.perf_counter()
    return [{"benchmark": "index", "model": model, "references": references, "seconds": t1 - t0,
             "records_per_s": references / (t1 - t0)},
            {"benchmark": "identify", "model": model, "references": references, "queries": queries,
             "seconds": t2 - t1, "queries_per_s": queries / (t2 - t1), "peak_rss_mb": _peak_rss_mb()}]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="kmer:5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--throughput", action="store_true")
    p.add_argument("--references", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=10_000)
    args = p.parse_args()
    if not REAL.exists():
        sys.exit(f"real barcodes not found at {REAL}")
    with tempfile.TemporaryDirectory() as tmp:
        rows = throughput(args.model, args.references, args.queries, pathlib.Path(tmp)) if args.throughput else [
            accuracy(args.model, args.seed, pathlib.Path(tmp))]
    for row in rows:
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
