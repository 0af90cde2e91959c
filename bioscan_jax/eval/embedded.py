"""The result of embedding records for ``bioscan-jax``: one vector and one ``status`` per record.

One rule for every embedder (k-mer counts, BarcodeBERT, CLIBD image and DNA towers): a record
whose status is ``ok`` (or ``ok (...)``) has a finite vector that is not all zero; any other record
has a NaN row and a status saying why. :class:`Embedded` enforces this when it is built, so a
vector no search can use (a NaN from a record without one complete k-mer, an overflow, a zero
vector whose cosine similarity is undefined) is marked, never scored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

#: Statuses given here to rows an embedder called ``ok`` but whose vector cannot be searched.
NON_FINITE, ZERO_VECTOR = "non-finite embedding", "zero embedding"


def is_ok(status: Sequence[str]) -> np.ndarray:
    """``[n] bool``: the statuses that carry an embedding (``ok`` or ``ok (...)``)."""
    return np.asarray([str(s) == "ok" or str(s).startswith("ok (") for s in status], dtype=bool)


@dataclasses.dataclass
class Embedded:
    """``embeddings [n, d] float32`` (NaN rows where the status is not ok) and ``status [n]``."""

    embeddings: np.ndarray
    status: list[str]

    def __post_init__(self):
        self.embeddings = np.asarray(self.embeddings, np.float32)
        self.status = [str(s) for s in self.status]
        if self.embeddings.ndim != 2 or len(self.embeddings) != len(self.status):
            raise ValueError(f"Embedded: {self.embeddings.shape} embeddings for {len(self.status)} statuses")
        ok = is_ok(self.status)
        finite = np.isfinite(self.embeddings).all(axis=1)
        nonzero = (self.embeddings != 0).any(axis=1) if self.embeddings.shape[1] else np.zeros(len(ok), bool)
        for i in np.flatnonzero(ok & ~finite):
            self.status[i] = NON_FINITE
        for i in np.flatnonzero(ok & finite & ~nonzero):
            self.status[i] = ZERO_VECTOR
        if self.embeddings.shape[1]:
            self.embeddings[~is_ok(self.status)] = np.nan

    @property
    def ok(self) -> np.ndarray:
        return is_ok(self.status)


def check_searchable(vectors: np.ndarray, ids: Sequence[str], what: str) -> None:
    """Raises if a vector about to be searched is non-finite or all zero: :class:`Embedded` keeps
    such rows out, so reaching here is a bug in the code, not a user's input."""
    vectors = np.asarray(vectors)
    bad = ~np.isfinite(vectors).all(axis=1) | ~(vectors != 0).any(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise AssertionError(f"{what}: {int(bad.sum())} non-finite or zero vector(s) reached the search "
                             f"(first: record {str(ids[i])!r}); they must carry a non-ok status instead")
