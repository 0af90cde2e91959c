"""grain pipelines: DNA (MLM), images, CLIBD; sharding, epochs, checkpointed iterators."""

from __future__ import annotations

import json

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from bioscan_jax.data import dna, images, pipeline, schema, text, tfds_source
from bioscan_jax.data import fields
from tfds_builder.bioscan5m import make_dummy_data

tfds.disable_progress_bar()
NO_SHARD = None


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """cropped_256 built from dummy_data/."""
    data_dir = tmp_path_factory.mktemp("tfds")
    return tfds_source.prepare("cropped_256", str(data_dir), str(make_dummy_data.DUMMY_DIR), verify_md5=False)


@pytest.fixture(scope="module")
def source(built):
    """All 16 records of dummy_data/ via tfds_source.data_source."""
    return tfds_source.data_source("bioscan5m/cropped_256", "all", data_dir=str(built.data_dir_root))


@pytest.fixture(scope="module")
def records(source):
    """64 user-style records (str values): the 16 dummy records, 4 times, with new ids."""
    base = [tfds_source.normalize_record(source[i]) for i in range(len(source))]
    out = []
    for rep in range(4):
        for rec in base:
            out.append(dict(rec, processid=f"{rec['processid']}-{rep}"))
    return out


def _batches(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def _equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ----------------------------------------------------------------------------- DNA


def test_dna_mlm_batch(records):
    tok = dna.KmerTokenizer(4)
    ds = pipeline.dna_pipeline(records, tokenizer=tok, batch_size=8, train=True, mlm=True, label_rank="species",
                               keep=("processid",), shard=NO_SHARD)
    b = next(iter(ds))
    assert set(b) == {"ids", "attention_mask", "targets", "mlm_mask", "label", "processid"}
    assert b["ids"].shape == (8, 165) and b["ids"].dtype == np.int32
    assert b["attention_mask"].dtype == bool and b["mlm_mask"].dtype == bool
    # Masked positions hold [MASK]; only attended k-mers are masked; about half are.
    assert (b["ids"][b["mlm_mask"]] == dna.MASK_ID).all()
    assert not (b["mlm_mask"] & ~b["attention_mask"]).any()
    frac = b["mlm_mask"].sum() / b["attention_mask"].sum()
    assert 0.4 < frac < 0.6
    # Targets: the unmasked k-mer class at every k-mer position (BarcodeBERT), -1 elsewhere.
    by_id = {r["processid"]: r for r in records}
    seqs = [by_id[p]["dna_barcode"] for p in b["processid"]]
    assert b["label"].tolist() == [by_id[p]["species"] for p in b["processid"]]
    assert (b["targets"][~b["attention_mask"]] == -1).all()
    unmasked = b["attention_mask"] & ~b["mlm_mask"]
    assert (b["targets"][unmasked] == b["ids"][unmasked] - dna.NUM_SPECIAL).all()
    # Random offsets (training): each row equals tokenising the barcode minus a 0..3 nt prefix.
    for row, seq in enumerate(seqs):
        candidates = [tok([seq[o:]])[0][0] - dna.NUM_SPECIAL for o in range(tok.k)]
        expected = [np.where(c >= 0, c, -1) for c in candidates]
        assert any(np.array_equal(np.where(b["targets"][row] >= 0, b["targets"][row], -1), e) for e in expected)


def test_dna_eval_is_plain_tokenisation_in_order(records):
    tok = dna.KmerTokenizer(5)
    ds = pipeline.dna_pipeline(records, tokenizer=tok, batch_size=10, train=False, label_rank="genus", shard=NO_SHARD)
    batches = list(ds)
    assert [len(b["ids"]) for b in batches] == [10] * 6 + [4]  # one epoch, remainder kept
    ids, mask = tok([r["dna_barcode"] for r in records])
    np.testing.assert_array_equal(np.concatenate([b["ids"] for b in batches]), ids)
    np.testing.assert_array_equal(np.concatenate([b["attention_mask"] for b in batches]), mask)


def test_record_source_plain_tfds_source_and_user_records_give_the_same_batches(built, source):
    tok = dna.KmerTokenizer(4)
    plain = built.as_data_source(split="all", decoders={"image": tfds.decode.SkipDecoding()})
    assert isinstance(plain[0]["dna_barcode"], bytes) and isinstance(source[0]["dna_barcode"], str)
    user = [tfds_source.normalize_record(plain[i]) for i in range(len(plain))]
    for a, b in zip(user, [source[i] for i in range(len(source))], strict=True):
        assert a.keys() == b.keys()
        assert all(a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]) for k in a)  # NaN == NaN here
    kw = dict(tokenizer=tok, batch_size=4, train=True, mlm=True, label_rank="order", seed=3, shard=NO_SHARD)
    runs = [_batches(pipeline.dna_pipeline(s, **kw), 3) for s in (source, plain, user)]
    for a, b, c in zip(*runs):
        _equal(a, b)
        _equal(a, c)


def test_record_source_selects_features(source):
    small = source.select(["processid", "species"])
    assert small[0] == {"processid": source[0]["processid"], "species": source[0]["species"]}
    assert small.__getitems__([1, 0]) == [small[1], small[0]]
    with pytest.raises(KeyError, match="unknown feature"):
        source.select(["kingdom"])


def test_same_seed_same_batches_other_seed_other_batches(records):
    tok = dna.KmerTokenizer(4)
    make = lambda seed: pipeline.dna_pipeline(records, tokenizer=tok, batch_size=8, train=True, mlm=True, seed=seed, shard=NO_SHARD)
    a, b, c = _batches(make(0), 3), _batches(make(0), 3), _batches(make(1), 3)
    for x, y in zip(a, b):
        _equal(x, y)
    assert not np.array_equal(a[0]["ids"], c[0]["ids"])


def test_training_repeats_with_a_new_order_each_epoch(records):
    ds = pipeline.dna_pipeline(records, tokenizer=dna.KmerTokenizer(4), batch_size=16, train=True,
                               keep=("processid",), shard=NO_SHARD)
    batches = _batches(ds, 8)  # two epochs of 64
    epoch1 = np.concatenate([b["processid"] for b in batches[:4]])
    epoch2 = np.concatenate([b["processid"] for b in batches[4:]])
    assert sorted(epoch1) == sorted(epoch2) == sorted(r["processid"] for r in records)
    assert epoch1.tolist() != epoch2.tolist()


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("worker_count", [0, 1])
def test_iterator_state_restores_the_next_batch_in_a_new_pipeline(records, worker_count):
    tok = dna.KmerTokenizer(4)

    def make():
        return pipeline.dna_pipeline(records, tokenizer=tok, batch_size=8, train=True, mlm=True, seed=7,
                                     label_rank="species", keep=("processid",), shard=NO_SHARD,
                                     worker_count=worker_count)

    it = iter(make())
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # survives serialisation
    expected = next(it)
    del it
    restored = iter(make())
    restored.set_state(state)
    _equal(restored.__next__(), expected)


def test_grain_checkpoint_handler_round_trip(records, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    make = lambda: pipeline.image_pipeline(records, batch_size=4, train=True, seed=1, label_rank="order", shard=NO_SHARD)
    it = iter(make())
    next(it), next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        expected = next(it)
        restored = iter(make())
        mngr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    _equal(next(restored), expected)


# ----------------------------------------------------------------------------- sharding


def test_shards_are_disjoint_and_cover_eval_data(records):
    tok = dna.KmerTokenizer(4)
    seen = []
    for index in range(3):
        shard = grain.sharding.ShardOptions(shard_index=index, shard_count=3)
        ds = pipeline.dna_pipeline(records, tokenizer=tok, batch_size=5, train=False, keep=("processid",), shard=shard)
        seen.append([p for b in ds for p in b["processid"]])
    flat = [p for s in seen for p in s]
    assert sorted(flat) == sorted(r["processid"] for r in records) and len(set(flat)) == len(flat)


def test_training_shards_are_equal_sized(records):
    tok = dna.KmerTokenizer(4)
    sizes = []
    for index in range(3):
        shard = grain.sharding.ShardOptions(shard_index=index, shard_count=3, drop_remainder=True)
        ds = pipeline.dna_pipeline(records, tokenizer=tok, batch_size=7, train=True, num_epochs=1, shard=shard)
        sizes.append(sum(len(b["ids"]) for b in ds))
    assert sizes == [21, 21, 21]  # 64 // 3 = 21 per shard, 3 whole batches of 7


def test_default_shard_is_per_jax_process(records):
    ds = pipeline.dna_pipeline(records, tokenizer=dna.KmerTokenizer(4), batch_size=8, train=False)
    assert sum(len(b["ids"]) for b in ds) == len(records)  # one process here
    with pytest.raises(ValueError, match="shard"):
        pipeline.dna_pipeline(records, tokenizer=dna.KmerTokenizer(4), batch_size=8, train=False, shard="bogus")


# ----------------------------------------------------------------------------- images


def _jpeg(w, h, seed=0):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    import io

    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def test_image_train_and_eval_views(records):
    ds = pipeline.image_pipeline(records, batch_size=4, train=True, label_rank="family", keep=("processid",), shard=NO_SHARD)
    b = next(iter(ds))
    assert b["image"].shape == (4, 224, 224, 3) and b["image"].dtype == np.float32
    assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0
    assert b["label"].dtype == np.int32
    ev = next(iter(pipeline.image_pipeline(records, batch_size=4, train=False, keep=("processid",), shard=NO_SHARD)))
    by_id = {r["processid"]: r for r in records}
    for i, pid in enumerate(ev["processid"]):
        np.testing.assert_array_equal(ev["image"][i], images.eval_image(by_id[pid]["image"]))


def test_eval_view_is_resize_then_center_crop():
    data = _jpeg(300, 400)
    out = images.eval_image(data)
    ref = Image.open(__import__("io").BytesIO(data)).convert("RGB").resize((256, 341), Image.Resampling.BILINEAR)
    ref = np.asarray(ref.crop((16, 58, 240, 282)), np.float32) / 255
    np.testing.assert_allclose(out, ref, atol=1e-6)
    norm = images.eval_image(data, normalize=True)
    np.testing.assert_allclose(norm, (out - np.array(schema.RGB_MEAN, np.float32)) / np.array(schema.RGB_STD, np.float32), rtol=1e-5)


def test_train_view_is_random_but_seeded():
    data = _jpeg(512, 384)
    a = images.train_image(data, np.random.default_rng(0))
    b = images.train_image(data, np.random.default_rng(0))
    c = images.train_image(data, np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (224, 224, 3) and not np.array_equal(a, c)
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, w, h = images.random_resized_crop_box(341, 256, rng)
        assert 0 <= left and left + w <= 341 and 0 <= top and top + h <= 256 and w > 0 and h > 0


def test_large_jpegs_decode_at_reduced_scale_but_not_below_resize():
    img = images.decode(_jpeg(1024, 768), min_side=256)
    assert min(img.size) >= 256 and img.size[0] < 1024


def test_undecodable_image_names_the_record(records):
    bad = [dict(records[0], image=b"\xff\xd8\xff garbage")]
    with pytest.raises(ValueError, match=records[0]["processid"]):
        next(iter(pipeline.image_pipeline(bad, batch_size=1, train=False, shard=NO_SHARD)))


# ----------------------------------------------------------------------------- CLIBD + text


def test_taxonomy_text_and_vocab(records, tmp_path):
    texts = text.taxonomy_texts(records[:2])
    assert texts[0] == "Diptera Cecidomyiidae not_classified not_classified"
    vocab = text.TaxonomyVocab.from_records(records)
    assert vocab.words == tuple(sorted(vocab.words)) and "not_classified" in vocab.words
    vocab.save(tmp_path / "vocab.json")
    loaded = text.TaxonomyVocab.load(tmp_path / "vocab.json")
    assert loaded == vocab
    ids, mask = vocab.encode(texts + ["Unknownia bogus words " * 10])
    assert ids.shape == (3, 20) and ids[0, 0] == text.CLS_ID
    assert vocab.decode(ids[0]) == ["[CLS]", *texts[0].split(), "[SEP]"]
    assert ids[2, -1] == text.SEP_ID and mask[2].all() and (ids[2, 1:-1] == text.UNK_ID).all()
    assert (ids[0][~mask[0]] == text.PAD_ID).all()


def test_clibd_batch(records):
    vocab = text.TaxonomyVocab.from_records(records)
    tok = dna.KmerTokenizer(5)
    ds = pipeline.clibd_pipeline(records, tokenizer=tok, vocab=vocab, batch_size=6, train=True, keep=("processid",), shard=NO_SHARD)
    b = next(iter(ds))
    assert set(b) == {"image", "dna_ids", "dna_attention_mask", "text_ids", "text_attention_mask", "processid",
                      *(f"label_{r}" for r in schema.EVAL_RANKS)}
    assert b["image"].shape == (6, 224, 224, 3) and b["dna_ids"].shape == (6, 132) and b["text_ids"].shape == (6, 20)
    by_id = {r["processid"]: r for r in records}
    for i, pid in enumerate(b["processid"]):
        rec = by_id[pid]
        assert b["label_species"][i] == rec["species"]
        np.testing.assert_array_equal(b["dna_ids"][i], tok([rec["dna_barcode"]])[0][0])
        np.testing.assert_array_equal(b["text_ids"][i], vocab.encode(text.taxonomy_texts([rec]))[0][0])


def _as_spec(batch):
    return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in batch.items()}


def _spec(spec):
    return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in spec.items()}


@pytest.mark.parametrize("protocol, k", [("bioscan5m", 4), ("v1", 5), ("bioscan5m", 6)])
@pytest.mark.parametrize("mlm, label", [(True, False), (False, True), (False, False)])
def test_dna_batch_spec_is_what_the_pipeline_yields(records, protocol, k, mlm, label):
    """The planner compiles from the batch spec: every key, shape and dtype is the pipeline's."""
    tok = dna.tokenizer_for(protocol, k, max_nucleotides=100)
    ds = pipeline.dna_pipeline(records, tokenizer=tok, batch_size=5, train=True, mlm=mlm,
                               label_rank="species" if label else None, shard=NO_SHARD)
    assert _as_spec(next(iter(ds))) == _spec(pipeline.dna_batch_spec(5, tok, mlm=mlm, label=label))


@pytest.mark.parametrize("modalities, ranks", [(("image", "dna", "text"), ()), (("image", "dna"), ("species",)),
                                               (("dna", "text"), schema.EVAL_RANKS)])
def test_clibd_batch_spec_is_what_the_pipeline_yields(records, modalities, ranks):
    """The CLIBD batch spec is the pipeline's batch, restricted to the keys of the towers."""
    vocab = text.TaxonomyVocab.from_records(records, max_length=12)
    tok = dna.tokenizer_for("v1", 5, max_nucleotides=200)
    ds = pipeline.clibd_pipeline(records, tokenizer=tok, vocab=vocab, batch_size=3, train=True, label_ranks=ranks,
                                 image_size=64, resize=72, shard=NO_SHARD)
    spec = _spec(pipeline.clibd_batch_spec(3, tokenizer=tok, text_length=12, image_size=64, label_ranks=ranks,
                                           modalities=modalities))
    batch = _as_spec(next(iter(ds)))
    assert {k: batch[k] for k in spec} == spec
    dropped = set(batch) - set(spec)
    assert all(not k.startswith("label_") for k in dropped)  # only other towers' inputs are left out
    assert dropped == {"image", "dna_ids", "dna_attention_mask", "text_ids", "text_attention_mask"} - set(spec)


def test_label_rank_is_validated(records):
    with pytest.raises(ValueError, match="label_rank"):
        pipeline.dna_pipeline(records, tokenizer=dna.KmerTokenizer(4), batch_size=4, train=True, label_rank="kingdom")
    assert fields.INDEX_FEATURES[-1] == "dna_bin"


def test_one_order_for_every_epoch_as_clibd_sampler_without_set_epoch():
    """CLIBD's DistributedSampler never gets set_epoch: every epoch repeats one seeded order
    (reshuffle_each_epoch=False); the default draws a new order per epoch."""
    source = [{"processid": f"p{i}"} for i in range(10)]

    def epochs(**kw):
        ds = pipeline.records_pipeline(source, train=True, seed=42, shard=None, **kw)
        ids = [ds[i]["processid"] for i in range(30)]
        return ids[:10], ids[10:20], ids[20:]

    first, second, third = epochs(reshuffle_each_epoch=False)
    assert first == second == third and sorted(first) == sorted(r["processid"] for r in source)
    assert first != [r["processid"] for r in source]  # shuffled, not the source order
    first, second, _ = epochs()
    assert first != second and sorted(first) == sorted(second)


@pytest.mark.parametrize("processes", [2, 4])
def test_global_batches_and_their_randomness_do_not_depend_on_the_process_count(records, processes):
    """Each process reads its rows of every global batch of one global order, and every record's
    offset, MLM mask and image augmentation come from its position in that order: P processes
    (emulated with explicit shards) give the global batches of one process, bit for bit."""
    tok = dna.tokenizer_for("bioscan5m", 4, max_nucleotides=120)
    global_batch, steps = 16, 7  # 7 global batches of 16 over 64 records: the order crosses epochs

    def dna_global(count):
        its = [iter(pipeline.dna_pipeline(records, tokenizer=tok, batch_size=global_batch // count, train=True, seed=3,
                                          mlm=True, keep=("processid",),
                                          shard=grain.sharding.ShardOptions(i, count, drop_remainder=True)))
               for i in range(count)]
        return [{k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
                for parts in ([next(it) for it in its] for _ in range(steps))]

    one, many = dna_global(1), dna_global(processes)
    for a, b in zip(one, many, strict=True):
        for key in ("processid", "ids", "attention_mask", "targets", "mlm_mask"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert len({tuple(b["processid"]) for b in one}) == steps  # not one batch repeated

    vocab = text.TaxonomyVocab.from_records(records)

    def clibd_global(count):
        its = [iter(pipeline.clibd_pipeline(records, tokenizer=tok, vocab=vocab, batch_size=8 // count, train=True,
                                            seed=5, image_size=32, resize=36, keep=("processid",),
                                            shard=grain.sharding.ShardOptions(i, count, drop_remainder=True)))
               for i in range(count)]
        return [np.concatenate([next(it)["image"] for it in its]) for _ in range(3)]

    for a, b in zip(clibd_global(1), clibd_global(2), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_sharded_training_pipeline_needs_its_batch_size(records):
    with pytest.raises(ValueError, match="needs batch_size"):
        pipeline.records_pipeline(records, train=True, shard=grain.sharding.ShardOptions(0, 2, drop_remainder=True))
