"""DNA normalisation, the k-mer tokenizer, MLM masking and k-mer counts."""

import itertools
import random

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bioscan_jax.data import dna
from bioscan_jax.data.schema import MAX_NUCLEOTIDES

# ----------------------------------------------------------------------------- vocabulary layout


@pytest.mark.parametrize(
    ("k", "kmer", "expected"),
    [
        (4, "AAAA", 2),
        (4, "AAAC", 3),
        (4, "AACA", 6),
        (4, "ACGT", 2 + 0 * 64 + 1 * 16 + 2 * 4 + 3),  # 29
        (4, "TTTT", 257),
        (5, "AAAAA", 2),
        (5, "AAAAC", 3),
        (5, "CAAAA", 2 + 256),
        (5, "TTTTT", 2 + 1023),
        (6, "GATTAC", 2 + 2 * 1024 + 0 * 256 + 3 * 64 + 3 * 16 + 0 * 4 + 1),  # 2291
        (6, "TTTTTT", 4097),
        (8, "AAAAAAAA", 2),
        (8, "ACGTACGT", 2 + 4096 + 2 * 1024 + 3 * 256 + 16 + 2 * 4 + 3),  # 6941
        (8, "TTTTTTTT", 65537),
    ],
)
def test_kmer_ids_are_pinned(k, kmer, expected):
    tok = dna.KmerTokenizer(k)
    ids, mask = tok(kmer)
    assert ids[0] == expected
    assert ids[1:].tolist() == [dna.UNK_ID] * (tok.num_tokens - 1)  # N padding
    assert mask.tolist() == [True] + [False] * (tok.num_tokens - 1)
    assert tok.decode([expected]) == [kmer]


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_vocabulary_is_itertools_product_order(k):
    tok = dna.KmerTokenizer(k, max_nucleotides=k)
    kmers = ["".join(p) for p in itertools.product("ACGT", repeat=k)]
    ids, _ = tok(kmers)
    assert ids[:, 0].tolist() == list(range(dna.NUM_SPECIAL, dna.NUM_SPECIAL + 4**k))


@pytest.mark.parametrize(("k", "tokens", "vocab"), [(4, 165, 258), (5, 132, 1026), (6, 110, 4098), (8, 82, 65538)])
def test_token_counts_and_vocab_sizes(k, tokens, vocab):
    tok = dna.KmerTokenizer(k)
    assert (tok.num_tokens, tok.vocab_size, tok.num_kmers) == (tokens, vocab, 4**k)
    ids, mask = tok(["ACGT" * 200, "A"])
    assert ids.shape == mask.shape == (2, tokens)
    assert ids.dtype == np.int32 and mask.dtype == bool
    assert dna.MAX_K == 15 and tok.max_nucleotides == MAX_NUCLEOTIDES == 660


# ----------------------------------------------------------------------------- padding, masks, normalisation


def test_padding_truncation_and_mask_lengths():
    tok = dna.KmerTokenizer(4)
    seqs = ["A" * 643, "C" * 660, "G" * 700, "T" * 3]
    ids, mask = tok(seqs)
    assert mask.sum(axis=1).tolist() == [643 // 4, 165, 165, 0]
    assert (ids[0, :160] == 2).all() and ids[0, 160] == dna.UNK_ID  # 3 bases + 1 N of padding
    assert (ids[0, 161:] == dna.UNK_ID).all()
    assert (ids[2] == 172).all()  # GGGG = 2 + 2*64 + 2*16 + 2*4 + 2, truncated at 660
    assert (ids[3] == dna.UNK_ID).all()
    *_, report = tok.tokenize(seqs)
    assert report["truncated"] == 1 and report["no_tokens"] == [3]


def test_normalisation_rules():
    assert dna.normalize("acgu") == "ACGT"
    # Gaps become N in place (BarcodeBERT reads them as written: their k-mers are [UNK]).
    assert dna.normalize("AC-G.T") == "ACNGNT"
    assert dna.normalize("ACRYSWKMBDHVN") == "AC" + "N" * 11
    assert dna.normalize("ryswkmbdhvn") == "N" * 11
    assert dna.normalize("A" * 700) == "A" * 660
    assert dna.normalize("A" * 700, max_nucleotides=None) == "A" * 700
    assert dna.normalize("ACGTNNN", strip_trailing_n=True) == "ACGT"
    assert dna.normalize(b"acgt") == "ACGT"
    # Stripping comes before truncation, as data_split.py strips the whole barcode: N inside the
    # 660-nt window stay when bases follow after it.
    assert dna.normalize("A" * 650 + "N" * 20 + "C", strip_trailing_n=True) == "A" * 650 + "N" * 10
    assert dna.normalize("A" * 650 + "N" * 20, strip_trailing_n=True) == "A" * 650


def test_tokens_follow_normalisation():
    tok = dna.KmerTokenizer(4)
    ids, mask = tok(["ACGT" * 3, "acgu" * 3, "AC-T" + "ACGT" * 2, "ACRT" + "ACGT" * 2])
    assert (ids[0] == ids[1]).all()
    assert ids[2, :3].tolist() == ids[3, :3].tolist() == [dna.UNK_ID, 29, 29]  # the frame is kept
    assert mask.sum(axis=1).tolist() == [3, 3, 3, 3]


def test_stride_and_overlap():
    tok = dna.KmerTokenizer(4, stride=1)
    assert tok.num_tokens == 657
    ids, mask = tok("AAAACGT")
    assert ids[:4].tolist() == [2, 3, 2 + 6, 29]
    assert tok.decode(ids[:4]) == ["AAAA", "AAAC", "AACG", "ACGT"]
    assert mask.sum() == 4  # (7 - 4) // 1 + 1
    tok2 = dna.KmerTokenizer(4, stride=2)
    assert tok2.num_tokens == (660 - 4) // 2 + 1
    ids2, mask2 = tok2("AAAACGTT")
    assert tok2.decode(ids2[:3]) == ["AAAA", "AACG", "CGTT"] and mask2.sum() == 3


def test_cls_token():
    tok = dna.KmerTokenizer(4, add_cls=True)
    assert tok.cls_id == tok.vocab_size - 1 == 2 + 256
    assert tok.num_tokens == 166
    ids, mask = tok(["ACGTACGT", "AC"])
    assert ids[:, 0].tolist() == [tok.cls_id] * 2 and mask[:, 0].all()
    assert ids[0, 1:3].tolist() == [29, 29] and mask[0].sum() == 3 and mask[1].sum() == 1
    assert tok.decode(ids[0, :2]) == ["[CLS]", "ACGT"]
    # k-mer ids are the same with and without CLS
    plain_ids, _ = dna.KmerTokenizer(4)(["ACGTACGT", "AC"])
    assert (ids[:, 1:] == plain_ids).all()


def test_offsets_drop_leading_nucleotides():
    tok = dna.KmerTokenizer(4)
    seqs = ["CAAAAGGGG", "CCAAAAGGGG", "AAAAGGGG"]
    ids, mask = tok(seqs, offsets=[1, 2, 0])
    assert (ids[:, :2] == [[2, 172], [2, 172], [2, 172]]).all()
    assert mask.sum(axis=1).tolist() == [2, 2, 2]
    offsets = dna.random_offsets(0, 1000, 4)
    assert offsets.min() == 0 and offsets.max() == 3
    assert (offsets == dna.random_offsets(0, 1000, 4)).all()
    with pytest.raises(ValueError, match="offsets"):
        tok(seqs, offsets=[1, 2])


def test_input_types_agree():
    seqs = ["ACGTNNACGT", "acgtacgtac", "GGGGCCCCTTTTAAAA"]
    tok = dna.KmerTokenizer(4)
    expected, expected_mask = tok(seqs)
    for variant in (
        tuple(seqs),
        [s.encode() for s in seqs],
        np.array(seqs),
        np.array(seqs, dtype="S"),
        pd.Series(seqs),
        pd.Series(seqs, dtype="string"),
    ):
        ids, mask = tok(variant)
        assert (ids == expected).all() and (mask == expected_mask).all()
    ids, mask = tok(seqs[0])
    assert ids.shape == (165,) and (ids == expected[0]).all()


def test_decode_specials_and_range():
    tok = dna.KmerTokenizer(3)
    assert tok.decode([[0, 1], [2, 65]]) == [["[MASK]", "[UNK]"], ["AAA", "TTT"]]
    with pytest.raises(ValueError, match="ids must be in"):
        tok.decode([66])


# ----------------------------------------------------------------------------- bad input


def test_invalid_character_names_record_and_character():
    tok = dna.KmerTokenizer(4)
    with pytest.raises(ValueError, match=r"record 'BAD-1' \(index 1\): invalid character 'X' at position 2"):
        tok(["ACGT", "ACXGT"], names=["OK-1", "BAD-1"])
    with pytest.raises(ValueError, match=r"record at index 0: invalid character 'é'"):
        tok(["ACéGT"])
    with pytest.raises(ValueError, match=r"invalid character '\\x00'"):
        tok(["AC\x00GT"])
    with pytest.raises(ValueError, match=r"record 'p1': invalid character '\*'"):
        dna.normalize("AC*T", name="p1")
    with pytest.raises(ValueError, match="invalid character ' '"):
        dna.normalize_batch(["ACGT ", "ACGT"])


def test_lenient_mode_counts_invalid_characters():
    tok = dna.KmerTokenizer(4)
    seqs = ["ACGTXXACGT", "ACGT", "ééACGT*", b"AC\xffGT"]
    ids, mask, report = tok.tokenize(seqs, names=["a", "b", "c", "d"], errors="count")
    assert report["invalid"] == {"a": {"X": 2}, "c": {"é": 2, "*": 1}, "d": {"\xff": 1}}
    assert report["invalid_chars"] == 6 and report["missing"] == []
    reference, _ = tok(["ACGTNNACGT", "ACGT", "NNACGTN", "ACNGT"])
    assert (ids == reference).all()
    out, report2 = dna.normalize_batch(seqs, errors="count")
    assert out == ["ACGTNNACGT", "ACGT", "NNACGTN", "ACNGT"]
    assert report2["invalid"] == {0: {"X": 2}, 2: {"é": 2, "*": 1}, 3: {"\xff": 1}}


@pytest.mark.parametrize("missing", [None, float("nan"), pd.NA, "", b""])
def test_missing_barcodes_raise_with_record_name(missing):
    tok = dna.KmerTokenizer(4)
    with pytest.raises(ValueError, match=r"record 'P2' \(index 1\).*(missing|empty)"):
        tok(["ACGT", missing], names=["P1", "P2"])


def test_one_record_bad_input():
    tok = dna.KmerTokenizer(4)
    with pytest.raises(ValueError, match=r"record 'P9' \(index 0\): invalid character 'X' at position 2"):
        tok("ACXGT", names="P9")
    with pytest.raises(ValueError, match=r"record at index 0: missing DNA barcode"):
        tok("")
    ids, mask, report = tok.tokenize(b"ACXGTACGT", names=["P9"], errors="count")
    assert report["invalid"] == {"P9": {"X": 1}} and report["invalid_chars"] == 1
    assert ids[:2].tolist() == [dna.UNK_ID, 200] and mask.sum() == 2  # ACNG, TACG
    ids, mask, report = tok.tokenize("--", errors="count")  # two N: no whole k-mer
    assert report["no_tokens"] == [0] and not mask.any() and (ids == dna.UNK_ID).all()
    with pytest.raises(ValueError, match="empty"):  # gaps and N only, stripped: nothing left
        dna.KmerTokenizer(4, strip_trailing_n=True)(["ACGT", "-N-.-N"], names=["P1", "P2"])
    _, mask, report = tok.tokenize("ACG", errors="count")
    assert report["no_tokens"] == [0] and not mask.any()


def test_missing_barcodes_in_lenient_mode_are_marked():
    tok = dna.KmerTokenizer(4, add_cls=True)
    seqs = ["ACGTACGT", None, float("nan"), "", "-.-", "ACGTNN"]
    ids, mask, report = tok.tokenize(seqs, names=list("abcdef"), errors="count")
    assert report["missing"] == ["b", "c", "d"]  # "-.-" is three N: present, but no whole k-mer
    assert not mask[1:4].any()  # CLS included: nothing to attend to
    assert (ids[1:5, 1:] == dna.UNK_ID).all()
    assert mask[0].sum() == 3 and mask[5].sum() == 2
    out, report2 = dna.normalize_batch(seqs, errors="count")
    assert out == ["ACGTACGT", "", "", "", "NNN", "ACGTNN"] and report2["missing"] == [1, 2, 3]
    # Only N is empty once trailing N are stripped.
    stripped = dna.KmerTokenizer(4, strip_trailing_n=True)
    _, mask3, report3 = stripped.tokenize(["NNNNNNNN", "ACGTACGTN"], errors="count")
    assert report3["missing"] == [0] and mask3.sum(axis=1).tolist() == [0, 2]
    with pytest.raises(ValueError, match="empty after normalisation"):
        stripped(["NNNN"])


def test_errors_argument_is_checked():
    with pytest.raises(ValueError, match="errors must be"):
        dna.KmerTokenizer(4)(["ACGT"], errors="ignore")
    with pytest.raises(ValueError, match="k must be"):
        dna.KmerTokenizer(16)


# ----------------------------------------------------------------------------- parity with the per-sequence reference


def _random_sequences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabets = ["ACGT", "ACGTN", "ACGTNacgtn", "ACGTU-.RYNkm", "ACGTNNNNNN"]
    lengths = [1, 3, 4, 5, 8, 50, 300, 640, 659, 660, 661, 668, 700, 800]
    out = []
    for _ in range(n):
        length, alphabet = rng.choice(lengths), rng.choice(alphabets)
        seq = "".join(rng.choice(alphabet) for _ in range(length))
        if rng.random() < 0.3:  # a run of N, as in real barcodes
            start = rng.randrange(length)
            seq = seq[:start] + "N" * rng.randrange(1, 40) + seq[start:]
        out.append(seq if any(c in "ACGTUacgtu" for c in seq) else "A" + seq)
    return out


@pytest.fixture(scope="module")
def random_sequences() -> list[str]:
    return _random_sequences(400, seed=1)


@pytest.fixture(scope="module")
def real_sequences(real_barcodes_path) -> list[str]:
    return pd.read_csv(real_barcodes_path, sep="\t", usecols=["nucleotides"])["nucleotides"].iloc[::10].tolist()


@pytest.mark.parametrize(
    ("k", "options"),
    [
        (4, {}),
        (5, {}),
        (6, {}),
        (8, {}),
        (3, {}),
        (7, {}),
        (9, {}),
        (4, {"stride": 1}),
        (6, {"stride": 3}),
        (5, {"add_cls": True}),
        (4, {"strip_trailing_n": True}),
        (8, {"stride": 2, "add_cls": True, "strip_trailing_n": True}),
        (6, {"max_nucleotides": 100}),
    ],
)
@pytest.mark.parametrize("source", ["random_sequences", "real_sequences"])
def test_parity_with_reference(request, source, k, options):
    parity_sequences = request.getfixturevalue(source)
    tok = dna.KmerTokenizer(k, **options)
    offsets = dna.random_offsets(k, len(parity_sequences), k)
    ids, mask = tok(parity_sequences)
    ids_off, mask_off = tok(parity_sequences, offsets=offsets)
    for i, seq in enumerate(parity_sequences):
        ref_ids, ref_mask = dna.reference_tokenize(seq, k, **options)
        assert ids[i].tolist() == ref_ids, (i, seq[:40])
        assert mask[i].astype(int).tolist() == ref_mask, (i, seq[:40])
        ref_ids, ref_mask = dna.reference_tokenize(seq, k, offset=int(offsets[i]), **options)
        assert ids_off[i].tolist() == ref_ids, (i, seq[:40], offsets[i])
        assert mask_off[i].astype(int).tolist() == ref_mask, (i, seq[:40], offsets[i])
    for i in range(0, len(parity_sequences), 7):  # the one-record path
        one_ids, one_mask = tok(parity_sequences[i], offsets=[offsets[i]])
        assert (one_ids == ids_off[i]).all() and (one_mask == mask_off[i]).all(), i


def test_long_kmers_compose_from_4_mers(random_sequences):
    """k = 12 (three uint32 words per k-mer) agrees with three consecutive 4-mers."""
    ids4, _ = dna.KmerTokenizer(4)(random_sequences)
    ids12, mask12 = dna.KmerTokenizer(12)(random_sequences)
    parts = ids4[:, : 3 * ids12.shape[1]].reshape(len(random_sequences), -1, 3)
    valid = (parts >= dna.NUM_SPECIAL).all(axis=-1)
    values = ((parts[..., 0] - 2) << 16) | ((parts[..., 1] - 2) << 8) | (parts[..., 2] - 2)
    assert (ids12 == np.where(valid, values + 2, dna.UNK_ID)).all()
    assert ids12.max() < 2 + 4**12 and mask12.sum() > 0


def test_normalize_batch_parity(random_sequences):
    parity_sequences = random_sequences
    for options in ({}, {"strip_trailing_n": True}, {"max_nucleotides": None}):
        out, report = dna.normalize_batch(parity_sequences, **options)
        assert out == [dna.normalize(s, **options) for s in parity_sequences]
        assert report["missing"] == [] and report["invalid"] == {}


def test_blocks_do_not_change_results(random_sequences, monkeypatch):
    parity_sequences = random_sequences
    tok = dna.KmerTokenizer(4)
    ids, mask = tok(parity_sequences)
    monkeypatch.setattr(dna, "_BLOCK_BYTES", 4096)
    ids_small, mask_small = tok(parity_sequences)
    assert (ids == ids_small).all() and (mask == mask_small).all()


def test_normalize_batch_chunks_keep_batch_indices(random_sequences, monkeypatch):
    seqs = random_sequences[:50] + [None, "ACXT"] + random_sequences[50:60]
    expected, expected_report = dna.normalize_batch(seqs, errors="count")
    monkeypatch.setattr(dna, "_CHUNK_RECORDS", 7)
    out, report = dna.normalize_batch(pd.Series(seqs), errors="count")
    assert out == expected and report == expected_report
    assert report["missing"] == [50] and report["invalid"] == {51: {"X": 1}} and report["records"] == 62
    with pytest.raises(ValueError, match=r"record at index 51: invalid character 'X'"):
        dna.normalize_batch(seqs[:50] + ["ACGT", "ACXT"])


# ----------------------------------------------------------------------------- properties

_acgt = st.text(alphabet="ACGT", min_size=1, max_size=700)


@settings(max_examples=60, deadline=None)
@given(seq=_acgt, k=st.integers(1, 8))
def test_decode_round_trip(seq, k):
    tok = dna.KmerTokenizer(k)
    ids, mask = tok(seq)
    kept = min(len(seq), MAX_NUCLEOTIDES)
    assert ids.shape == mask.shape == (tok.num_tokens,)
    assert mask.sum() == kept // k
    tokens = tok.decode(ids[mask])
    assert "".join(tokens) == seq[: (kept // k) * k]
    assert not (ids[~mask] >= dna.NUM_SPECIAL).any()  # everything after the mask is [UNK]


@settings(max_examples=40, deadline=None)
@given(
    seqs=st.lists(st.text(alphabet="ACGTNacgtn-", min_size=0, max_size=80), min_size=1, max_size=8),
    k=st.integers(1, 6),
    stride=st.integers(1, 6),
    add_cls=st.booleans(),
)
def test_shapes_and_parity_property(seqs, k, stride, add_cls):
    tok = dna.KmerTokenizer(k, stride=stride, add_cls=add_cls, max_nucleotides=64)
    ids, mask, report = tok.tokenize(seqs, errors="count")
    assert ids.shape == mask.shape == (len(seqs), tok.num_tokens)
    assert ids.min() >= 0 and ids.max() < tok.vocab_size
    for i, seq in enumerate(seqs):
        if i in report["missing"]:
            assert not mask[i].any()
            continue
        ref_ids, ref_mask = dna.reference_tokenize(seq, k, stride=stride, add_cls=add_cls, max_nucleotides=64)
        assert ids[i].tolist() == ref_ids and mask[i].astype(int).tolist() == ref_mask


# ----------------------------------------------------------------------------- MLM


def test_mask_tokens_is_deterministic_and_skips_unk():
    tok = dna.KmerTokenizer(4)
    ids, mask = tok(_random_sequences(64, seed=2))
    masked, positions = dna.mask_tokens(ids, np.random.default_rng(0))
    masked2, positions2 = dna.mask_tokens(ids, 0)
    assert (masked == masked2).all() and (positions == positions2).all()
    assert positions.dtype == bool and positions.shape == ids.shape
    assert not positions[ids < dna.NUM_SPECIAL].any()  # never [UNK] / padding / [MASK]
    assert not positions[~mask].any()
    assert (masked[positions] == dna.MASK_ID).all() and (masked[~positions] == ids[~positions]).all()
    eligible = ids >= dna.NUM_SPECIAL
    assert 0.45 < positions.sum() / eligible.sum() < 0.55
    _, none = dna.mask_tokens(ids, 0, p=0.0)
    _, every = dna.mask_tokens(ids, 0, p=1.0)
    assert not none.any() and (every == eligible).all()
    _, limited = dna.mask_tokens(ids, 0, p=1.0, attention_mask=np.zeros_like(mask))
    assert not limited.any()


def test_mask_tokens_never_masks_cls():
    tok = dna.KmerTokenizer(4, add_cls=True)
    ids, _ = tok(["ACGT" * 50])
    _, positions = tok.mask_tokens(ids, 0, p=1.0)
    assert not positions[:, 0].any() and positions[:, 1:51].all()


def test_mlm_targets():
    tok = dna.KmerTokenizer(4, add_cls=True)
    ids, _ = tok(["ACGTAAAANNNNTTTT"])
    targets = tok.mlm_targets(ids)
    assert targets.dtype == np.int32
    assert targets[0, :6].tolist() == [dna.IGNORE_INDEX, 27, 0, dna.IGNORE_INDEX, 255, dna.IGNORE_INDEX]
    assert (targets[0, 6:] == dna.IGNORE_INDEX).all()
    masked, positions = tok.mask_tokens(ids, 3)
    only = tok.mlm_targets(ids, positions, masked_only=True)
    assert (only[positions] == targets[positions]).all() and (only[~positions] == dna.IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="masked_positions"):
        dna.mlm_targets(ids, masked_only=True)


# ----------------------------------------------------------------------------- k-mer counts


def test_kmer_counts_match_python_counts():
    seqs = _random_sequences(50, seed=3)
    for k, stride in ((3, 1), (4, 4)):
        tok = dna.KmerTokenizer(k, stride=stride)
        ids, _ = tok(seqs)
        counts = dna.kmer_counts(ids, k)
        assert counts.shape == (len(seqs), 4**k) and counts.dtype == np.int32
        vocab = {"".join(p): i for i, p in enumerate(itertools.product("ACGT", repeat=k))}
        for row, seq in zip(counts, seqs, strict=True):
            text = dna.normalize(seq)
            expected = np.zeros(4**k, dtype=np.int64)
            for start in range(0, len(text) - k + 1, stride):
                kmer = text[start : start + k]
                if kmer in vocab:
                    expected[vocab[kmer]] += 1
            assert (row == expected).all()
    assert dna.kmer_counts(np.array([2, 2, 1, 0]), 2).tolist()[0][:2] == [2, 0]
