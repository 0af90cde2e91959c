"""DNA embedders named by a SPEC, for ``bioscan-jax embed`` / ``index`` / ``identify``.

SPEC (:func:`resolve`):

* ``kmer:K`` — normalised overlapping k-mer counts (stride 1, trailing N stripped): the strong
  zero-training baseline, so every user can compare;
* a checkpoint file or directory in any format :func:`bioscan_jax.convert.barcodebert.load` reads
  (Hugging Face directory, BarcodeBERT training ``.pt``, v1 ``.pth``, CLIBD ``best.pth``): the
  reference probe embedding of that checkpoint's version;
* a Hugging Face hub id (``owner/name``, or ``owner/name:file``), read from the local cache or the
  hub (:mod:`bioscan_jax.convert.hub`);
* a BarcodeBERT run workdir of this project (``<workdir>/pretrain/checkpoints``): its pretrained
  encoder, masked mean with trailing N stripped.

Every record gets a ``status``: ``ok``; ``ok (n invalid characters read as N)``; or why it has no
embedding (``no barcode``, ``no valid bases``, ``no complete k-mer``), its row then NaN. Nothing is
dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from bioscan_jax.data import dna as dna_lib
from bioscan_jax.data.pipeline import ROW
from bioscan_jax.eval.embedded import Embedded, is_ok

#: Statuses of records without an embedding.
NO_BARCODE, NO_VALID_BASES, NO_KMER = "no barcode", "no valid bases", "no complete k-mer"


def _statuses(names: Sequence[str], seqs: Sequence[Any], report: dict[str, Any]) -> list[str]:
    missing, no_tokens = set(report.get("missing", [])), set(report.get("no_tokens", []))
    invalid = report.get("invalid", {})
    out = []
    for name, seq in zip(names, seqs):
        if name in missing:
            out.append(NO_BARCODE if not isinstance(seq, str) or not seq.strip() else NO_VALID_BASES)
        elif not any(c in "ACGTUacgtu" for c in str(seq)):
            out.append(NO_VALID_BASES)
        elif name in no_tokens:
            out.append(NO_KMER)
        elif name in invalid:
            out.append(f"ok ({sum(invalid[name].values())} invalid characters read as N)")
        else:
            out.append("ok")
    return out


class KmerEmbedder:
    """Frequencies of the overlapping k-mers (stride 1) of each barcode, trailing N stripped."""

    def __init__(self, k: int, max_nucleotides: int = 660):
        if not 1 <= k <= 8:
            raise ValueError(f"kmer:{k}: k must be in 1..8")
        self.k, self.name = k, f"kmer:{k}"
        self.tokenizer = dna_lib.tokenizer_for("bioscan5m", k, stride=1, max_nucleotides=max_nucleotides)
        self.dim = 4**k
        self.describe = {"spec": self.name, "kind": "kmer", "k": k, "stride": 1}

    def embed(self, ids: Sequence[str], seqs: Sequence[Any], *, batch_size: int = 4096, progress: bool = False
              ) -> Embedded:
        names = [str(i) for i in ids]
        out = np.full((len(seqs), self.dim), np.nan, np.float32)
        statuses: list[str] = []
        for start in range(0, len(seqs), batch_size):
            part, part_names = list(seqs[start:start + batch_size]), names[start:start + batch_size]
            tok_ids, mask, report = self.tokenizer.tokenize(part, names=part_names, errors="count")
            counts = dna_lib.kmer_counts(np.where(mask, tok_ids, dna_lib.UNK_ID), self.k, dtype=np.float32)
            status = _statuses(part_names, part, report)
            total = counts.sum(1, keepdims=True)
            ok = is_ok(status)
            for i in np.flatnonzero(ok & (total[:, 0] == 0)):  # every window holds a gap or an N
                status[i] = NO_KMER
            ok &= total[:, 0] > 0
            out[start:start + len(part)][ok] = counts[ok] / total[ok]
            statuses.extend(status)
        return Embedded(out, statuses)


class BertEmbedder:
    """A loaded BarcodeBERT encoder (:class:`bioscan_jax.convert.barcodebert.Loaded`), batched
    on all local devices with :func:`bioscan_jax.eval.embed.embed_batches`."""

    def __init__(self, loaded, name: str, max_nucleotides: int = 660):
        from bioscan_jax.convert import barcodebert as bb_load

        self.loaded, self.name = loaded, name
        self.tokenizer = loaded.tokenizer(max_nucleotides)
        self.dim = loaded.config.hidden_size
        self._fn = bb_load.embed_fn(loaded.protocol)
        self.describe = {"spec": name, "kind": "barcodebert", "format": loaded.format,
                         "protocol": loaded.protocol.name, "k": loaded.config.k, "layers": loaded.config.num_layers,
                         "heads": loaded.config.num_heads, "hidden": loaded.config.hidden_size}

    def embed(self, ids: Sequence[str], seqs: Sequence[Any], *, batch_size: int = 256, progress: bool = False
              ) -> Embedded:
        import jax

        from bioscan_jax.eval import embed as embed_lib
        from bioscan_jax import sharding as mesh_lib

        names = [str(i) for i in ids]
        tok_ids, mask, report = self.tokenizer.tokenize(list(seqs), names=names, errors="count")
        status = _statuses(names, seqs, report)
        ok = np.flatnonzero(is_ok(status))
        out = np.full((len(seqs), self.dim), np.nan, np.float32)
        if ok.size:
            mesh = mesh_lib.make_mesh(dict(data=-1, fsdp=1, tensor=1))
            batch_size = max(len(jax.devices()), batch_size - batch_size % len(jax.devices()))
            batches = ({"ids": tok_ids[ok[i:i + batch_size]], "attention_mask": mask[ok[i:i + batch_size]],
                        ROW: np.arange(i, min(i + batch_size, ok.size))} for i in range(0, ok.size, batch_size))
            if progress:
                from tqdm import tqdm

                batches = tqdm(batches, total=-(-ok.size // batch_size), desc=f"embedding with {self.name}", unit="batch")
            result = embed_lib.embed_batches(self.loaded.model, batches, self._fn, mesh=mesh, batch_size=batch_size)
            out[ok] = result["embedding"]
        return Embedded(out, status)


def resolve(spec: str, *, num_heads: int | None = None, max_nucleotides: int = 660):
    """The embedder a SPEC names (module docstring)."""
    if spec.startswith("kmer:"):
        try:
            k = int(spec.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"model spec {spec!r}: expected kmer:K with an integer K") from None
        return KmerEmbedder(k, max_nucleotides)
    from bioscan_jax.convert import barcodebert as bb_load

    try:
        loaded = bb_load.resolve(spec, what="model spec", num_heads=num_heads)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}; or kmer:K, the k-mer profile of every read") from None
    return BertEmbedder(loaded, spec, max_nucleotides)
