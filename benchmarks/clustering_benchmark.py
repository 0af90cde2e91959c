"""Time and peak memory of the zero-shot clustering step: Ward + cut on 50-dim data.

Compares our O(n·d)-memory Ward (``bioscan_jax.eval.ward.ward_cluster``: fastcluster's
nearest-neighbour chain on centroids, then an exact cut into k clusters) with scikit-learn's
``AgglomerativeClustering(linkage="ward")``, which builds the condensed distance matrix and a
working copy of it (about 8·n² bytes: 3.2 GB at 20k points, 17.7 GB at 47k).

Each measurement runs in a fresh subprocess so that its peak RSS (``ru_maxrss``) is its own;
``baseline_rss_mb`` is the peak just before the clustering call (interpreter, imports, data) and
``increment_mb`` the clustering's own addition. scikit-learn is skipped, with a JSON line saying
why, where its predicted distance-matrix memory exceeds ``--sklearn-max-gb``.

Data: synthetic "UMAP-like" 50-dim float32 points around k partly overlapping centres, k in the
ratio of species to records of BIOSCAN-5M test + test_unseen (about 4,363 species over 47,260
records), with long-tailed cluster sizes. Ward's running time depends on the data; numbers on a
shared machine are noisy.

Usage::

    python benchmarks/clustering_benchmark.py                      # n = 5k, 10k, 20k, 47k
    python benchmarks/clustering_benchmark.py --sizes 5000,10000 --impls ours

Prints one JSON line per measurement (and one per skipped case, and one per size where both
implementations ran saying whether their partitions agree).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHMARK = "zsc_ward_cluster"
IMPLS = ("ours", "sklearn")
DEFAULT_SIZES = (5_000, 10_000, 20_000, 47_000)
#: Records and species of BIOSCAN-5M test + test_unseen (design notes §5).
_PAPER_RECORDS = 39_373 + 7_887
_PAPER_SPECIES = 3_483 + 880


def num_clusters(n: int) -> int:
    """Number of clusters for n records, in the species/records ratio of the paper's set."""
    return max(2, round(n * _PAPER_SPECIES / _PAPER_RECORDS))


def make_data(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Seeded clustered data: (x float32 (n, d), true labels, k); every cluster non-empty."""
    k = num_clusters(n)
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(mean=0.0, sigma=1.0, size=k)
    y = np.concatenate([np.arange(k), rng.choice(k, size=n - k, p=weights / weights.sum())])
    rng.shuffle(y)
    centres = rng.normal(scale=1.0, size=(k, d))  # partly overlapping clusters
    x = centres[y] + rng.normal(size=(n, d))
    return x.astype(np.float32), y, k


def sklearn_predicted_bytes(n: int) -> int:
    """Distance-matrix memory of scikit-learn's ward: condensed matrix plus its working copy."""
    return 2 * (n * (n - 1) // 2) * 8


def _rss_mb() -> tuple[float, float]:
    """(peak RSS, current RSS) of this process in MiB (Linux: ru_maxrss is in KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return peak, current


def run_child(impl: str, n: int, d: int, seed: int, labels_out: str | None) -> dict:
    """One measurement, meant to run in a fresh process."""
    from sklearn.metrics import adjusted_mutual_info_score

    if impl == "ours":
        from bioscan_jax.eval.ward import ward_cluster

        def cluster(x, k):
            return ward_cluster(x, n_clusters=k)

    else:
        from sklearn.cluster import AgglomerativeClustering

        def cluster(x, k):
            return AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(x)

    x, y, k = make_data(n, d, seed)
    baseline_peak, baseline_now = _rss_mb()
    t0 = time.perf_counter()
    labels = cluster(x, k)
    elapsed = time.perf_counter() - t0
    peak, _ = _rss_mb()
    if labels_out:
        np.save(labels_out, labels)
    return {
        "benchmark": BENCHMARK,
        "impl": impl,
        "n": n,
        "d": d,
        "n_clusters": k,
        "n_clusters_found": int(np.unique(labels).size),
        "time_s": round(elapsed, 3),
        "peak_rss_mb": round(peak, 1),
        "baseline_rss_mb": round(max(baseline_peak, baseline_now), 1),
        "increment_mb": round(peak - max(baseline_peak, baseline_now), 1),
        "under_4gb": peak < 4096,
        "ami_vs_truth": round(float(adjusted_mutual_info_score(y, labels)), 4),
        "data": f"synthetic blobs, seed {seed}",
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }


def _spawn(impl: str, n: int, args: argparse.Namespace, labels_out: str) -> dict:
    cmd = [
        sys.executable, __file__, "--child", impl, "--n", str(n), "--dim", str(args.dim),
        "--seed", str(args.seed), "--labels-out", labels_out,
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout_s)
    if proc.returncode != 0:
        return {
            "benchmark": BENCHMARK, "impl": impl, "n": n, "error": f"exit code {proc.returncode}",
            "stderr_tail": proc.stderr[-800:],
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = np.unique(np.stack([a, b], axis=1), axis=0).shape[0]
    return pairs == np.unique(a).size == np.unique(b).size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="comma-separated n")
    parser.add_argument("--impls", default=",".join(IMPLS), help="comma-separated: ours, sklearn")
    parser.add_argument("--dim", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sklearn-max-gb", type=float, default=8.0,
                        help="skip scikit-learn where its predicted distance-matrix memory exceeds this")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="per measurement")
    parser.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--labels-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(run_child(args.child, args.n, args.dim, args.seed, args.labels_out)), flush=True)
        return

    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    bad = [i for i in impls if i not in IMPLS]
    if bad:
        parser.error(f"unknown impl(s) {bad}; valid: {list(IMPLS)}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            ran = {}
            for impl in impls:
                if impl == "sklearn" and sklearn_predicted_bytes(n) > args.sklearn_max_gb * 2**30:
                    gb = sklearn_predicted_bytes(n) / 2**30
                    print(json.dumps({
                        "benchmark": BENCHMARK, "impl": impl, "n": n, "d": args.dim, "skipped": True,
                        "reason": f"predicted {gb:.1f} GiB of O(n^2) distance matrices exceeds "
                                  f"--sklearn-max-gb {args.sklearn_max_gb:g}",
                    }), flush=True)
                    continue
                out = os.path.join(tmp, f"{impl}_{n}.npy")
                result = _spawn(impl, n, args, out)
                print(json.dumps(result), flush=True)
                if "error" not in result:
                    ran[impl] = out
            if len(ran) == 2:
                same = _same_partition(np.load(ran["ours"]), np.load(ran["sklearn"]))
                print(json.dumps({"benchmark": BENCHMARK, "n": n, "check": "same_partition_ours_vs_sklearn",
                                  "value": bool(same)}), flush=True)


if __name__ == "__main__":
    main()
