"""How far can any DNA embedding go on the 1-NN genus probe of a dataset? (``--rank``: another rank)

The BarcodeBERT task reports the 1-NN genus accuracy on unseen species (keys = ``train``,
queries = ``test_unseen``) of the pretrained encoder, of the same encoder with random weights and
of k-mer counts. This script puts those numbers in context with encoder-free references on the
same keys and queries:

* non-overlapping k-mer counts (the task's own baseline, k = 3..8) and overlapping ones (stride 1,
  insensitive to where a read starts);
* the best ungapped alignment: for every query-key pair, the largest number of identical bases
  over all relative offsets of the two reads (one-hot cross-correlation by FFT), as an identity
  over the shorter read. This is the BLAST-like reference of the paper's table.

If these references sit close to the random-init encoder, no encoder can gain much on that probe
and the data, not the model, sets the ceiling. Prints one JSON line per method.

Usage::

    python benchmarks/probe_ceiling.py                          # embedded synthetic data
    python benchmarks/probe_ceiling.py --source bold --path ../shared/data/real_barcodes/canadian_invertebrates_100sp.tsv
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bioscan_jax.data import dna as dna_lib  # noqa: E402
from bioscan_jax.data import sources  # noqa: E402
from bioscan_jax.eval import probes  # noqa: E402
from configs import barcodebert as barcodebert_config  # noqa: E402

#: Padded read length for the FFT cross-correlation (two reads of up to 660 nt never wrap).
FFT_LENGTH = 2048


def kmer_vectors(seqs: list[str], k: int, stride: int, max_nucleotides: int) -> np.ndarray:
    tok = dna_lib.KmerTokenizer(k, stride=stride, max_nucleotides=max_nucleotides)
    ids, _ = tok(seqs)
    return dna_lib.kmer_counts(ids, k, dtype=np.float32)


def one_hot_spectra(seqs: list[str], max_nucleotides: int) -> tuple[np.ndarray, np.ndarray]:
    """rFFT of the 4-channel one-hot reads ``[N, 4, F]`` and the number of ACGT bases per read."""
    codes = np.full((len(seqs), FFT_LENGTH), 255, np.uint8)
    normalized, _ = dna_lib.normalize_batch(seqs, max_nucleotides=max_nucleotides, strip_trailing_n=True)
    for i, s in enumerate(normalized):
        codes[i, : len(s)] = np.frombuffer(s.encode(), np.uint8)
    onehot = np.stack([codes == b for b in b"ACGT"], axis=1).astype(np.float32)
    return np.fft.rfft(onehot, axis=-1), onehot.sum(axis=(1, 2))


def aligned_identity_nn(keys: list[str], queries: list[str], max_nucleotides: int) -> np.ndarray:
    """Index of the key with the highest best-offset ungapped identity, per query."""
    fk, nk = one_hot_spectra(keys, max_nucleotides)
    fq, nq = one_hot_spectra(queries, max_nucleotides)
    nearest = np.empty(len(queries), np.int64)
    for i in range(len(queries)):
        matches = np.fft.irfft((fq[i][None].conj() * fk).sum(1), n=FFT_LENGTH, axis=-1).max(-1)
        nearest[i] = np.argmax(matches / np.maximum(np.minimum(nq[i], nk), 1.0))
    return nearest


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="tfds", choices=("tfds", "bold"))
    parser.add_argument("--path", default="", help="source=bold: BOLD TSV or FASTA")
    parser.add_argument("--data-dir", default="", help="TFDS data dir ('' = default)")
    parser.add_argument("--ks", default="3,4,5,6,8")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rank", default="genus", help="label rank of the 1-NN probe")
    args = parser.parse_args(argv)

    config = barcodebert_config.get_config("tiny")
    config.data.source, config.data.path, config.data.data_dir = args.source, args.path, args.data_dir
    d = config.data
    data = sources.open_splits(d, [d.probe_key_split, d.probe_query_split],
                               features=("processid", "dna_barcode", args.rank), seed=args.seed)
    keys, queries = data[d.probe_key_split], data[d.probe_query_split]
    key_seqs, query_seqs = [r["dna_barcode"] for r in keys], [r["dna_barcode"] for r in queries]
    key_labels = np.asarray([r[args.rank] for r in keys])
    query_labels = np.asarray([r[args.rank] for r in queries])
    common = {"data": data.description, "rank": args.rank, "keys": len(keys), "queries": len(queries),
              "query_label_in_keys": float(np.isin(query_labels, key_labels).mean())}

    for stride_name in ("non-overlapping", "overlapping"):
        for k in (int(x) for x in args.ks.split(",")):
            t0 = time.perf_counter()
            stride = k if stride_name == "non-overlapping" else 1
            kx = kmer_vectors(key_seqs, k, stride, d.max_nucleotides)
            qx = kmer_vectors(query_seqs, k, stride, d.max_nucleotides)
            result = probes.knn_probe(kx, key_labels, qx, query_labels)
            print(json.dumps({"method": f"kmer_counts_{stride_name}", "k": k, "accuracy": result["accuracy"],
                              "seconds": time.perf_counter() - t0, **common}), flush=True)
    t0 = time.perf_counter()
    nearest = aligned_identity_nn(key_seqs, query_seqs, d.max_nucleotides)
    accuracy = float((key_labels[nearest] == query_labels).mean())
    print(json.dumps({"method": "best_ungapped_alignment", "accuracy": accuracy,
                      "seconds": time.perf_counter() - t0, **common}), flush=True)


if __name__ == "__main__":
    main()
