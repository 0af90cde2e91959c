"""Reference rules written out from the reference code (not from ours), shared by the tests."""

from __future__ import annotations

import itertools


def bioscan5m_tokens(barcode: str, k: int, max_len: int = 660) -> tuple[list[int], list[int]]:
    """BarcodeBERT (BIOSCAN-5M branch): ``data/data_split.py`` strips trailing N from the whole
    barcode, then ``barcodebert/datasets.py::KmerTokenizer.__call__`` (padding, offset 0) cuts or
    pads it to ``max_len`` with N; att_mask 1 for the first len(x)//k tokens; a k-mer that is not
    pure ACGT is [UNK] (1), ACGT k-mers are 2 + their itertools.product index."""
    vocab = {"".join(p): 2 + i for i, p in enumerate(itertools.product("ACGT", repeat=k))}
    x = barcode.rstrip("N")
    att = [1] * (max_len // k)
    if len(x) > max_len:
        x = x[:max_len]
    else:
        att[len(x) // k:] = [0] * (len(att) - len(x) // k)
        x = x + "N" * (max_len - len(x))
    return [vocab.get(x[i:i + k], 1) for i in range(0, len(x) - k + 1, k)], att
