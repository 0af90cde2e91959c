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


def perturb(module, seed: int):
    """A torch module with its weights moved well away from their init (LoRA B, which the
    references initialise to zero, included), so that a wrong mapping cannot pass; eval mode."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return module.eval()
