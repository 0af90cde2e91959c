"""One tokenizer per model protocol: every task and loader that tokenises for a protocol gets the
same ids, each reference's rule is pinned, and the library builds a KmerTokenizer in one place."""

from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest

from bioscan_jax.convert import barcodebert as bb_load
from bioscan_jax.data import dna
from configs import barcodebert as barcodebert_config
from configs import clibd as clibd_config
from configs import zsc as zsc_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
BARCODES = ["ACGT" * 10 + "NNNN", "acgtnACGTRYacgt" + "N" * 9, "A" * 650 + "N" * 20 + "C", "TTGA" * 170 + "NN"]


def _ids(tokenizer):
    ids, mask = tokenizer(BARCODES)
    return np.where(mask, ids, -1)


def test_bioscan5m_strips_trailing_n_and_v1_keeps_them():
    strip = dna.tokenizer_for("bioscan5m", 4)
    keep = dna.tokenizer_for("v1", 4)
    ids_s, mask_s = strip("ACGT" * 10 + "NNNN")
    ids_k, mask_k = keep("ACGT" * 10 + "NNNN")
    assert mask_s.sum() == 10 and mask_k.sum() == 11  # data/data_split.py rstrip('N') vs the barcode as stored
    assert ids_k[10] == dna.UNK_ID and (ids_s[:10] == ids_k[:10]).all()


def test_every_tokenizer_of_a_protocol_gives_the_same_ids():
    bb = barcodebert_config.get_config("tiny")
    bb_paper = barcodebert_config.get_config("paper")
    zsc = zsc_config.get_config("tiny")
    built = {
        "bioscan5m": [
            dna.tokenizer_for(bb.model.tokenization, 4),  # BarcodeBERT task (pretraining, probes, fine-tuning)
            dna.tokenizer_for(bb_paper.model.tokenization, 4),
            dna.tokenizer_for(zsc.barcodebert.model.tokenization, 4),  # ZSC's on-the-fly BarcodeBERT
            bb_load.BIOSCAN5M_PROTOCOL.tokenizer(4),  # a released BIOSCAN-5M checkpoint
        ],
        "v1": [
            dna.tokenizer_for(clibd_config.get_config("tiny").model.dna.tokenization, 4),  # CLIBD's DNA tower
            dna.tokenizer_for(clibd_config.get_config("paper").model.dna.tokenization, 4),
            bb_load.V1_PROTOCOL.tokenizer(4),  # v1 .pth / CLIBD best.pth
        ],
    }
    for name, tokenizers in built.items():
        want = _ids(dna.tokenizer_for(name, 4))
        for t in tokenizers:
            np.testing.assert_array_equal(_ids(t), want, err_msg=name)
    assert not np.array_equal(_ids(built["bioscan5m"][0]), _ids(built["v1"][0]))


def test_unknown_protocol_is_one_line():
    with pytest.raises(ValueError, match="unknown tokenization protocol 'bioscan1m'; valid: bioscan5m, v1"):
        dna.tokenizer_for("bioscan1m", 4)


def test_the_library_constructs_a_kmer_tokenizer_in_one_function():
    sites = []
    for path in sorted((ROOT / "bioscan_jax").rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"(?<![\"'\w])KmerTokenizer\(", line) and not line.lstrip().startswith(("f\"", "class ")):
                sites.append(f"{path.relative_to(ROOT)}:{n}")
    assert len(sites) == 1 and sites[0].startswith("bioscan_jax/data/dna.py"), sites
