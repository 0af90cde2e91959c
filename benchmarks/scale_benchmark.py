r"""The data and evaluation path at BIOSCAN-5M's size: time and peak memory of every stage.

    python benchmarks/scale_benchmark.py                         # 5,150,850 rows (the real size)
    python benchmarks/scale_benchmark.py --rows 200000           # scaled down
    python benchmarks/scale_benchmark.py --rows 1000000,5150850  # two sizes: growth per stage
    python benchmarks/scale_benchmark.py --rows 200000 --stages probes,zsc,retrieval

Input: a metadata CSV of ``--rows`` records written by the fast synthetic generator
(:mod:`bioscan_jax.data.synthetic.bulk`): the 23 official columns, the real split sizes and the
real fraction of distinct barcodes (2,486,492 of 5,150,850), scaled by ``rows / 5,150,850``; no
images. Stages, each in its own subprocess (so that its peak RSS is its own):

=================== ===========================================================================
generate            write that CSV (``bulk.write_metadata``)
tfds                build the TFDS ``bioscan5m/dna`` config from it (``tfds_source.prepare``,
                    ``verify_md5=False``: the file has the official name, not the official bytes)
barcodebert_data    the ``paper`` BarcodeBERT data stage: ``tasks.barcodebert.open_data`` (label
                    maps, every split it reads, barcode deduplication over the whole metadata)
probes              the 1-NN genus probe (keys: train after dedup, queries: test_unseen after
                    dedup) and the reference linear probe (train → test after dedup, batch 64,
                    SGD) for ``--probe-epochs`` epochs (the recipe runs 200: ``per_epoch_s``) on
                    random 768-d float32 embeddings (label centroids + noise)
zsc                 zero-shot clustering of test + test_unseen (47,260 at full size): UMAP to 50
                    dims, the O(n·d)-memory Ward, AMI (``eval.clustering.evaluate_clustering``);
                    from 4,096 records UMAP uses pynndescent, whose one-off numba compile (about a
                    minute) is run first on other data and reported apart (``umap_warmup_s``)
retrieval           CLIBD retrieval (``eval.retrieval.clibd_retrieval``), keys train +
                    key_unseen (325,668), queries test (39,373) and test_unseen (7,887), the
                    three pairs dna→dna, image→image, image→dna, 768-d
=================== ===========================================================================

Output: a ``machine`` line (CPU model, cores, memory, load), then one JSON line per stage with
``stage``, ``rows``, ``records`` (what the stage processes), ``wall_s`` (the stage's work, without
interpreter start and imports: those are in ``process_s``), ``peak_rss_gb`` (the stage process's
peak resident memory, ``ru_maxrss`` of it and its children, in GB = 1e9 bytes) and
``us_per_nlogn`` (``wall_s`` / (records·log2 records), µs). Exact nearest-neighbour search and
Ward compare every query with every key (every pair of records): their ``work`` (pairs) and
``ns_per_pair`` are given too. With two sizes a ``growth`` line per stage gives the exponent of
``wall_s`` in ``records`` (1 = linear) and the ratio of ``us_per_nlogn``. A ``summary`` line names
the slowest stage. Limits checked (``violations`` in the summary): peak RSS <= ``--max-rss-gb``
(16), and at two sizes a growth of ``us_per_nlogn`` above ``--max-nlogn-ratio`` (1.5) for stages
that are not all-pairs by definition.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bioscan_jax.data import schema  # noqa: E402  (light: numpy and pandas)
from bioscan_jax.data.synthetic import bulk  # noqa: E402

STAGES = ("generate", "tfds", "barcodebert_data", "probes", "zsc", "retrieval")
#: Stages whose work is all pairs by definition of the protocol (exact search, Ward).
ALL_PAIRS = ("probes", "zsc", "retrieval")
DIM = 768
#: From this many records UMAP searches neighbours with pynndescent, which numba compiles first.
UMAP_NNDESCENT_MIN = 4096


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def _peak_rss_gb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) * 1024 / 1e9  # ru_maxrss is in KiB on Linux


def machine_line() -> dict:
    from bioscan_jax import xla_cpu

    with open("/proc/meminfo") as f:
        mem_kib = next((int(line.split()[1]) for line in f if line.startswith("MemTotal:")), 0)
    return {"stage": "machine", "cpu_model": xla_cpu.cpu_model() or "?", "cpu_count": os.cpu_count(),
            "memory_gb": round(mem_kib * 1024 / 1e9, 1), "load_avg": os.getloadavg()[0],
            "python": sys.version.split()[0]}


# ============================================================================= the stages (each in its own process)


def stage_generate(args, spec: bulk.BulkSpec) -> dict:
    path = bulk.write_metadata(os.path.join(args.workdir, "source"), spec)
    return {"records": spec.rows, "csv_gb": round(os.path.getsize(path) / 1e9, 3),
            "unique_barcodes": spec.unique_barcodes, "split_rows": spec.split_rows}


def stage_tfds(args, spec: bulk.BulkSpec) -> dict:
    from bioscan_jax.data import tfds_source

    data_dir = os.path.join(args.workdir, "tfds")
    shutil.rmtree(data_dir, ignore_errors=True)
    builder = tfds_source.prepare("dna", data_dir=data_dir, manual_dir=os.path.join(args.workdir, "source"),
                                  verify_md5=False)
    sizes = {name: split.num_examples for name, split in builder.info.splits.items()}
    return {"records": sum(sizes.values()), "split_sizes": sizes}


def _barcodebert_paper_config(args):
    from configs import barcodebert as configs

    config = configs.get_config("paper")
    config.data.data_dir = os.path.join(args.workdir, "tfds")
    config.data.manual_dir = os.path.join(args.workdir, "source")
    config.data.verify_md5 = False
    return config


def stage_barcodebert_data(args, spec: bulk.BulkSpec) -> dict:
    from bioscan_jax.tasks.barcodebert import task as barcodebert

    data = barcodebert.open_data(_barcodebert_paper_config(args))
    expected = {"pretrain+other_heldout": spec.split_barcodes["pretrain"] + spec.split_barcodes["other_heldout"],
                **{s: spec.split_barcodes[s] for s in ("train", "test", "test_unseen", "val")}}
    used = {s: v["used"] for s, v in data.sizes.items()}
    return {"records": sum(v["records"] for v in data.sizes.values()), "sizes": data.sizes,
            "label_names": {c: len(v) for c, v in data.label_names.items()},
            "dedup_matches_generator": all(used.get(s) == n for s, n in expected.items())}


def _centroids(n_classes: int, rng):
    import numpy as np

    return rng.standard_normal((n_classes, DIM), dtype=np.float32)


def _embeddings(labels, centroids, rng, scale: float = 1.0):
    """Random 768-d float32 rows: the centroid of each row's label plus Gaussian noise."""
    import numpy as np

    out = centroids[labels]
    out += scale * rng.standard_normal(out.shape, dtype=np.float32)
    return out


def stage_probes(args, spec: bulk.BulkSpec) -> dict:
    import numpy as np

    from bioscan_jax.eval import probes

    rng = np.random.default_rng(args.seed)
    n_keys, n_queries, n_test = (spec.split_barcodes[s] for s in ("train", "test_unseen", "test"))
    genus, species = spec.rank_counts["genus"], spec.rank_counts["species"]
    key_species = rng.integers(0, spec.split_species["train"], n_keys)
    key_genus = key_species % genus
    test_species = rng.integers(0, spec.split_species["train"], n_test)
    query_genus = rng.integers(0, genus, n_queries)
    by_genus, by_species = _centroids(genus, rng), _centroids(species, rng)
    keys = _embeddings(key_genus, by_genus, rng) + _embeddings(key_species, by_species, rng)
    queries = _embeddings(query_genus, by_genus, rng) + _embeddings(query_genus, _centroids(genus, rng), rng)
    test = _embeddings(test_species % genus, by_genus, rng) + _embeddings(test_species, by_species, rng)
    t0 = time.perf_counter()
    knn = probes.knn_probe(keys, key_genus, queries, query_genus)
    t1 = time.perf_counter()
    linear = probes.linear_probe(keys, key_species, test, test_species,
                                 num_classes=species, recipe="reference", epochs=args.probe_epochs, batch_size=64,
                                 lr=0.01, momentum=0.9, weight_decay=1e-5)
    t2 = time.perf_counter()
    return {"records": n_keys + n_queries + n_test, "work": n_keys * n_queries, "knn_keys": n_keys,
            "knn_queries": n_queries, "knn_s": round(t1 - t0, 3), "knn_accuracy": knn["accuracy"],
            "linear_train": n_keys, "linear_test": n_test, "linear_classes": int(np.unique(key_species).size),
            "linear_epochs": args.probe_epochs, "linear_s": round(t2 - t1, 3),
            "per_epoch_s": round((t2 - t1) / args.probe_epochs, 3),
            "note": "linear: --probe-epochs epochs timed (one compile included); the reference recipe runs 200"}


def stage_zsc(args, spec: bulk.BulkSpec) -> dict:
    import numpy as np

    from bioscan_jax.eval import clustering

    rng = np.random.default_rng(args.seed)
    n_test, n_unseen = spec.split_rows["test"], spec.split_rows["test_unseen"]
    n_seen_species = spec.split_species["test"]
    species = np.concatenate([rng.integers(0, n_seen_species, n_test),
                              n_seen_species + rng.integers(0, spec.split_species["test_unseen"], n_unseen)])
    n_species = n_seen_species + spec.split_species["test_unseen"]
    genus = species % max(1, spec.rank_counts["genus"])
    emb = _embeddings(species, _centroids(n_species, rng), rng, scale=3.5)  # species AMI ~0.5, as the paper's DNA models
    compile_s = 0.0
    if species.size >= UMAP_NNDESCENT_MIN:  # numba compiles pynndescent on first use: a constant, timed apart
        t0 = time.perf_counter()
        clustering.reduce_embeddings(rng.standard_normal((UMAP_NNDESCENT_MIN + 100, DIM), dtype=np.float32))
        compile_s = time.perf_counter() - t0
    out = clustering.evaluate_clustering(emb, {"species": species, "genus": genus}, encoder="random",
                                         reduction="umap", seed=args.seed)
    n = species.size
    return {"records": n, "work": n * n, "n_clusters": out["n_clusters"], "ami_species": out["ami/species"],
            "excluded_s": compile_s, "umap_warmup_s": round(compile_s, 3),
            "umap_s": round(out["time/reduce_s"], 3), "ward_s": round(out["time/cluster_s"], 3),
            "ami_ari_s": round(out["time/score_s"], 3), "silhouette_s": round(out["time/silhouette_s"], 3)}


def _retrieval_inputs(spec: bulk.BulkSpec, rng):
    """Embeddings (image, dna) and labels (order ... species) of the key and query splits."""
    ranks = ("order", "family", "genus", "species")
    seen, unseen = spec.split_species["train"], spec.split_species["key_unseen"]
    pools = {"train": (0, seen), "test": (0, seen), "key_unseen": (seen, unseen), "test_unseen": (seen, unseen)}
    centroids = _centroids(seen + unseen, rng)
    embeddings, labels = {}, {}
    for split, (first, count) in pools.items():
        species = first + rng.integers(0, count, spec.split_rows[split])
        labels[split] = {r: species % max(1, spec.rank_counts[r]) for r in ranks[:-1]} | {"species": species}
        embeddings[split] = {m: _embeddings(species, centroids, rng, scale=2.5) for m in ("image", "dna")}
    return embeddings, labels


def stage_retrieval(args, spec: bulk.BulkSpec) -> dict:
    import numpy as np

    from bioscan_jax.eval import retrieval

    embeddings, labels = _retrieval_inputs(spec, np.random.default_rng(args.seed))
    keys = spec.split_rows["train"] + spec.split_rows["key_unseen"]
    queries = spec.split_rows["test"] + spec.split_rows["test_unseen"]
    out = retrieval.clibd_retrieval(embeddings, labels)
    pairs = [p for p in out if p != "skipped_pairs"]
    return {"records": keys + queries, "keys": keys, "queries": queries, "pairs": pairs,
            "work": len(pairs) * keys * queries,
            "species_macro_top1": {p: out[p]["report"]["species"]["macro_top1"]["hm"] for p in pairs}}


STAGE_FUNCTIONS = {"generate": stage_generate, "tfds": stage_tfds, "barcodebert_data": stage_barcodebert_data,
                   "probes": stage_probes, "zsc": stage_zsc, "retrieval": stage_retrieval}


def run_stage(args) -> int:
    """The child: run one stage, print its JSON line."""
    spec = bulk.plan(args.rows, unique_barcodes=args.unique_barcodes, seed=args.seed)
    t0 = time.perf_counter()
    result = STAGE_FUNCTIONS[args.stage](args, spec)
    wall = time.perf_counter() - t0 - result.pop("excluded_s", 0.0)  # one-off compiles timed apart
    n = max(int(result["records"]), 2)
    line = {"stage": args.stage, "rows": args.rows, **result, "wall_s": round(wall, 3),
            "peak_rss_gb": round(_peak_rss_gb(), 3), "us_per_nlogn": wall / (n * math.log2(n)) * 1e6}
    if "work" in line:
        line["ns_per_pair"] = wall / max(int(line["work"]), 1) * 1e9
    emit(**line)
    return 0


# ============================================================================= the parent


def _child(args, stage: str, rows: int, workdir: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--stage", stage, "--rows", str(rows), "--workdir", workdir,
           "--seed", str(args.seed), "--probe-epochs", str(args.probe_epochs)]
    if args.unique_barcodes is not None:
        cmd += ["--unique-barcodes", str(args.unique_barcodes)]
    env = dict(os.environ, BIOSCAN_JAX_COMPILATION_CACHE=os.environ.get("BIOSCAN_JAX_COMPILATION_CACHE", "off"))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=args.stage_timeout)
    process_s = round(time.perf_counter() - t0, 3)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"stage": stage, "rows": rows, "error": tail, "returncode": proc.returncode, "process_s": process_s}
    return {**json.loads(lines[-1]), "process_s": process_s}


def _growth(small: dict, large: dict) -> dict:
    n1, n2, t1, t2 = small["records"], large["records"], small["wall_s"], large["wall_s"]
    exponent = math.log(t2 / t1) / math.log(n2 / n1) if min(n1, n2, t1, t2) > 0 and n1 != n2 else None
    return {"stage": "growth", "of": small["stage"], "records": [n1, n2], "wall_s": [t1, t2],
            "exponent": exponent, "us_per_nlogn_ratio": large["us_per_nlogn"] / small["us_per_nlogn"]}


def run_all(args, sizes: list[int]) -> int:
    emit(**machine_line())
    results: dict[int, dict[str, dict]] = {}
    violations = []
    for rows in sizes:
        workdir = os.path.join(args.workdir, f"rows{rows}")
        os.makedirs(workdir, exist_ok=True)
        results[rows] = {}
        for stage in args.stages:
            line = _child(args, stage, rows, workdir)
            emit(**line)
            results[rows][stage] = line
            if "error" in line:
                violations.append(f"{stage} at {rows} rows failed: {line['error']}")
            elif line["peak_rss_gb"] > args.max_rss_gb:
                violations.append(f"{stage} at {rows} rows: peak RSS {line['peak_rss_gb']:.1f} GB > {args.max_rss_gb}")
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if len(sizes) >= 2:
        for stage in args.stages:
            a, b = results[sizes[0]].get(stage, {}), results[sizes[-1]].get(stage, {})
            if "wall_s" in a and "wall_s" in b:
                g = _growth(a, b)
                emit(**g)
                if stage not in ALL_PAIRS and g["us_per_nlogn_ratio"] > args.max_nlogn_ratio:
                    violations.append(f"{stage}: time/(n log n) grew {g['us_per_nlogn_ratio']:.2f}x")
    last = {s: r for s, r in results[sizes[-1]].items() if "wall_s" in r}
    slowest = max(last, key=lambda s: last[s]["wall_s"]) if last else None
    emit(stage="summary", rows=sizes[-1], slowest=slowest,
         slowest_wall_s=last[slowest]["wall_s"] if slowest else None,
         slowest_us_per_nlogn=last[slowest]["us_per_nlogn"] if slowest else None,
         total_wall_s=round(sum(r["wall_s"] for r in last.values()), 3), violations=violations)
    return 1 if any("failed" in v for v in violations) else 0


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=str(schema.OFFICIAL_NUM_RECORDS),
                   help="metadata rows, or several comma-separated (growth between the first and last)")
    p.add_argument("--unique-barcodes", type=int, default=None,
                   help="distinct barcodes (default: the real fraction, 2,486,492 per 5,150,850 rows)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {', '.join(STAGES)}")
    p.add_argument("--workdir", default="", help="where the CSV and the TFDS build go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the CSV and the TFDS build")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probe-epochs", type=int, default=1, help="linear-probe epochs timed (the recipe: 200)")
    p.add_argument("--max-rss-gb", type=float, default=16.0)
    p.add_argument("--max-nlogn-ratio", type=float, default=1.5)
    p.add_argument("--stage-timeout", type=float, default=None, help="seconds per stage process")
    p.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # the child's one stage
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        sizes = [int(r) for r in str(args.rows).split(",") if r.strip()]
        for rows in sizes:  # refuse what the generator cannot honour, before any work
            bulk.plan(rows, unique_barcodes=args.unique_barcodes, seed=args.seed)
        args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
        unknown = [s for s in args.stages if s not in STAGES]
        if unknown or not sizes:
            raise ValueError(f"--stages {unknown}: valid stages are {', '.join(STAGES)}" if unknown else "--rows is empty")
    except ValueError as e:
        print(f"scale_benchmark: {e}", file=sys.stderr)
        return 2
    if args.stage:
        args.rows = sizes[0]
        return run_stage(args)
    temporary = not args.workdir
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="bioscan_scale_")
    try:
        return run_all(args, sizes)
    finally:
        if temporary and not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
