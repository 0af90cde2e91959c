"""Tokenizer benchmark: the vectorised k-mer tokenizer against a per-sequence Python one.

For each k, on one core (single process; numpy's element-wise loops use one thread), prints one
JSON line per implementation with its throughput in sequences/s for 660-nt windows, measured
from a Python list of ``str`` (so the str -> byte-matrix step is included):

* ``impl="python"``: :func:`bioscan_jax.data.dna.reference_tokenize` per sequence (normalise
  with ``str.translate``, slice k-mers, dict lookup) and ``np.array`` of the lists;
* ``impl="vectorised"``: :class:`bioscan_jax.data.dna.KmerTokenizer` on the whole batch, with
  ``speedup_vs_python``; its ids and masks are asserted identical to the Python ones on the
  Python subset before anything is printed.

Times are the best of ``--repeats`` runs (wall clock, ``seq_per_s``; CPU time of this process,
``cpu_seq_per_s``, is printed too: on a shared machine it is the steadier of the two). Input:
the 5,000 real barcodes of ``../shared/data/real_barcodes/`` tiled to ``--num-sequences``, or
random ACGT with N runs when they are absent.

    python benchmarks/tokenizer_benchmark.py
    python benchmarks/tokenizer_benchmark.py --num-sequences 50000 --ks 4 --cpu 0
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy is imported; the tokenizer uses no BLAS anyway

import argparse
import json
import pathlib
import platform
import sys
import time
from collections.abc import Callable

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

from bioscan_jax.data import dna  # noqa: E402
from bioscan_jax.data.schema import MAX_NUCLEOTIDES  # noqa: E402

REAL_BARCODES = REPO_ROOT.parent / "shared" / "data" / "real_barcodes" / "canadian_invertebrates_100sp.tsv"


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def load_sequences(num: int, seed: int = 0) -> tuple[list[str], str]:
    """``num`` barcodes: the real ones tiled, or random ACGT with N runs when absent."""
    if REAL_BARCODES.exists():
        import pandas as pd

        real = pd.read_csv(REAL_BARCODES, sep="\t", usecols=["nucleotides"])["nucleotides"].tolist()
        return (real * (num // len(real) + 1))[:num], "real_barcodes"
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.normal(600, 45, size=num), 300, 780).astype(int)
    letters = np.frombuffer(b"ACGT", dtype=np.uint8)[rng.integers(0, 4, size=(num, 780))]
    runs = rng.random(num) < 0.4  # ~40% have a run of N, like the real ones
    starts = rng.integers(0, 600, size=num)
    for i in np.flatnonzero(runs):  # data preparation, not timed
        letters[i, starts[i] : starts[i] + rng.integers(1, 30)] = ord("N")
    rows = letters.view("S780").ravel()
    return [row[:n].decode() for row, n in zip(rows, lengths, strict=True)], "random"


def best_of(fn: Callable[[], object], repeats: int) -> tuple[float, float, object]:
    """Best wall and best CPU seconds over ``repeats`` runs, and the last result."""
    wall, cpu, result = float("inf"), float("inf"), None
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        wall, cpu = min(wall, time.perf_counter() - w0), min(cpu, time.process_time() - c0)
    return wall, cpu, result


def python_tokenize(seqs: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    pairs = [dna.reference_tokenize(s, k) for s in seqs]
    return np.array([p[0] for p in pairs], dtype=np.int32), np.array([p[1] for p in pairs], dtype=bool)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-sequences", type=int, default=200_000, help="batch of the vectorised tokenizer")
    parser.add_argument("--python-sequences", type=int, default=20_000, help="subset for the Python tokenizer")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--python-repeats", type=int, default=3)
    parser.add_argument("--ks", default="4,5,6,8")
    parser.add_argument("--cpu", type=int, default=None, help="pin the process to this CPU")
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})

    seqs, source = load_sequences(args.num_sequences)
    subset = seqs[: args.python_sequences]
    common = {
        "benchmark": "kmer_tokenizer",
        "max_nucleotides": MAX_NUCLEOTIDES,
        "source": source,
        "mean_length": round(float(np.mean([len(s) for s in seqs])), 1),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "cpu_affinity": sorted(os.sched_getaffinity(0)),
    }
    for k in (int(x) for x in args.ks.split(",")):
        tok = dna.KmerTokenizer(k)
        py_wall, py_cpu, (py_ids, py_mask) = best_of(lambda: python_tokenize(subset, k), args.python_repeats)
        vec_ids, vec_mask = tok(subset)
        assert np.array_equal(vec_ids, py_ids) and np.array_equal(vec_mask, py_mask), f"k={k}: outputs differ"
        wall, cpu, (ids, _) = best_of(lambda: tok(seqs), args.repeats)
        assert ids.shape == (len(seqs), tok.num_tokens)
        py_rate, vec_rate = len(subset) / py_wall, len(seqs) / wall
        emit(
            **common,
            impl="python",
            k=k,
            tokens=tok.num_tokens,
            sequences=len(subset),
            repeats=args.python_repeats,
            best_s=round(py_wall, 4),
            seq_per_s=round(py_rate),
            cpu_seq_per_s=round(len(subset) / py_cpu),
        )
        emit(
            **common,
            impl="vectorised",
            k=k,
            tokens=tok.num_tokens,
            sequences=len(seqs),
            repeats=args.repeats,
            best_s=round(wall, 4),
            seq_per_s=round(vec_rate),
            cpu_seq_per_s=round(len(seqs) / cpu),
            speedup_vs_python=round(vec_rate / py_rate, 1),
            cpu_speedup_vs_python=round((len(seqs) / cpu) / (len(subset) / py_cpu), 1),
            identical_to_python=True,
        )


if __name__ == "__main__":
    main()
