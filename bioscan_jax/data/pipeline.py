"""grain input pipelines: DNA (BarcodeBERT), images, and CLIBD (image + DNA + text).

Every pipeline starts from a random-access *source*: a prepared split
(:func:`bioscan_jax.data.tfds_source.data_source`, which parses only the features the
pipeline reads), a plain ``tfds.data_source``, or any sequence of record dicts whose
keys are the builder's feature names (BOLD imports, hand-made records). The
steps, all on a :class:`grain.MapDataset` so that each batch is a pure function of
(seed, batch index):

1. training: one global order of the records (shuffled per epoch, or one order repeated), cut
   into global batches of ``batch_size * process_count``, each process reading its contiguous
   ``batch_size`` rows of every global batch, so the global batches, and every record's
   randomness (keyed by its position in the global order, :data:`RNG_KEY`), are the same for any
   number of processes; evaluation: a per-process shard (``ShardByJaxProcess`` by default);
2. :func:`tfds_source.normalize_record` (bytes -> str, 0-d arrays -> scalars);
3. per-record work that cannot be batched (JPEG decode + augmentation);
4. batching (``drop_remainder=True`` for training) and per-batch work that is much
   faster batched: k-mer tokenisation with random offsets, MLM masking, text encoding;
5. ``to_iter_dataset`` (reader threads) and, with ``worker_count > 0``, worker
   processes (``mp_prefetch``).

``batch_size`` is per process (the global batch is ``batch_size * process_count``).
The returned :class:`grain.IterDataset` yields dicts of numpy arrays. Its iterator is
checkpointable: ``it.get_state()`` / ``it.set_state(state)`` (or
``grain.checkpoint.CheckpointSave/CheckpointRestore`` under orbax) resume at exactly
the next batch, also in a new process.

Batch keys:

* :func:`dna_pipeline`: ``ids`` int32 [B, T] (masked when ``mlm``),
  ``attention_mask`` bool [B, T]; with ``mlm``: ``targets`` int32 [B, T] (k-mer class,
  ``-1`` = ignore) and ``mlm_mask`` bool [B, T] (positions replaced by ``[MASK]``);
  with ``label_rank``: ``label`` int32 [B] (``-1`` = missing).
* :func:`image_pipeline`: ``image`` float32 [B, 224, 224, 3]; ``label`` with ``label_rank``.
* :func:`clibd_pipeline`: ``image``, ``dna_ids``, ``dna_attention_mask``, ``text_ids``,
  ``text_attention_mask``, ``label_<rank>`` int32 [B] for each of ``label_ranks``.
* ``keep=('processid', ...)`` adds raw record fields as numpy arrays (strings too).

:func:`dna_batch_spec` and :func:`clibd_batch_spec` give the same batches as
``jax.ShapeDtypeStruct``\ s (the global batch): the memory planner compiles from them, and a test
holds them equal to what the pipelines yield.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from bioscan_jax.data import dna as dna_lib
from bioscan_jax.data import images as images_lib
from bioscan_jax.data import schema
from bioscan_jax.data import text as text_lib
from bioscan_jax.data.tfds_source import normalize_record
from bioscan_jax.data import fields

__all__ = [
    "clibd_batch_spec",
    "clibd_pipeline",
    "dna_batch_spec",
    "dna_pipeline",
    "image_pipeline",
    "records_pipeline",
]

ShardArg = grain.sharding.ShardOptions | str | None

#: Position of a record in its source. Every record of a one-pass (``train=False``) pipeline
#: carries it, and so do its batches: results gathered from several processes, each of which read
#: its own shard, are put back in source order by it (:func:`bioscan_jax.eval.embed.embed_batches`).
ROW = "row"
#: A training record's random key: a function of the seed and its position in the global order
#: (never of the process count). Per-record augmentation, random offsets and MLM masks draw from
#: ``np.random.default_rng(record[RNG_KEY])``.
RNG_KEY = "rng_key"


def _with_row(index: int, record: Mapping[str, Any]) -> dict[str, Any]:
    return {**record, ROW: index}


class _WithRngKey:
    """``(position, record) -> record + {RNG_KEY: splitmix64(seed, position)}`` (picklable)."""

    def __init__(self, seed: int):
        self.seed = int(seed)

    def __call__(self, index: int, record: Mapping[str, Any]) -> dict[str, Any]:
        return {**record, RNG_KEY: record_key(self.seed, index)}


def record_key(seed: int, position: int) -> int:
    """A 64-bit key from ``(seed, position)`` (splitmix64 of both): distinct positions give
    unrelated streams."""
    mask = (1 << 64) - 1
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(position) + 0x632BE59BD9B4E019) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def record_rngs(records: Sequence[Mapping[str, Any]], rng: np.random.Generator) -> list[np.random.Generator] | None:
    """One generator per record from its :data:`RNG_KEY` (training records), else ``None``."""
    if not records or RNG_KEY not in records[0]:
        return None
    return [np.random.default_rng(int(r[RNG_KEY])) for r in records]


# ----------------------------------------------------------------------------- transforms


class NormalizeRecord(grain.transforms.Map):
    """:func:`tfds_source.normalize_record` as a grain transform."""

    def map(self, element):
        return normalize_record(element)


def _labels(records: Sequence[Mapping[str, Any]], rank: str) -> np.ndarray:
    return np.fromiter((r[rank] for r in records), dtype=np.int32, count=len(records))


def _kept(records: Sequence[Mapping[str, Any]], keep: Sequence[str]) -> dict[str, np.ndarray]:
    """The ``keep`` fields of ``records`` as arrays, plus :data:`ROW` when the records carry it."""
    names = dict.fromkeys((*keep, *((ROW,) if records and ROW in records[0] else ())))
    return {k: np.asarray([r[k] for r in records]) for k in names}


class DnaBatch(grain.transforms.RandomMap):
    """A list of records -> tokenised DNA (+ MLM masking, label), with the batch's rng."""

    def __init__(self, tokenizer, *, random_offset: bool, mlm: bool, mask_prob: float, masked_only: bool,
                 label_rank: str | None, keep: Sequence[str], prefix: str = ""):
        self.tokenizer = tokenizer
        self.random_offset = random_offset
        self.mlm, self.mask_prob, self.masked_only = mlm, mask_prob, masked_only
        self.label_rank = label_rank
        self.keep = tuple(keep)
        self.prefix = prefix

    def tokens(self, records, rng) -> dict[str, np.ndarray]:
        tok = self.tokenizer
        seqs = [r[fields.feature_name("dna_barcode")] for r in records]
        names = [r.get("processid", i) for i, r in enumerate(records)]
        rows = record_rngs(records, rng)  # training: one stream per record (RNG_KEY)
        offsets = None
        if self.random_offset:
            offsets = (dna_lib.random_offsets(rng, len(seqs), tok.k) if rows is None else
                       np.asarray([g.integers(0, tok.k) for g in rows], np.int32))
        ids, attention = tok(seqs, names=names, offsets=offsets)
        p = self.prefix
        if not self.mlm:
            return {f"{p}ids": ids, f"{p}attention_mask": attention}
        draws = None if rows is None else np.stack([g.random(ids.shape[1], dtype=np.float32) for g in rows])
        masked_ids, masked = tok.mask_tokens(ids, rng, self.mask_prob, attention_mask=attention, draws=draws)
        return {
            f"{p}ids": masked_ids,
            f"{p}attention_mask": attention,
            f"{p}targets": tok.mlm_targets(ids, masked, masked_only=self.masked_only),
            f"{p}mlm_mask": masked,
        }

    def random_map(self, element, rng):
        out = self.tokens(element, rng)
        if self.label_rank:
            out["label"] = _labels(element, self.label_rank)
        out.update(_kept(element, self.keep))
        return out


class ImageRecord(grain.transforms.RandomMap):
    """One record -> ``{'image': float32 HWC, <passed-through fields>}`` (train or eval view)."""

    def __init__(self, *, train: bool, crop: int, resize: int, normalize: bool, passthrough: Sequence[str]):
        self.train, self.crop, self.resize, self.normalize = train, crop, resize, normalize
        self.passthrough = tuple(passthrough)

    def random_map(self, element, rng):
        data = element[fields.IMAGE]
        if RNG_KEY in element:  # a training record: its own stream, whatever the process count
            rng = np.random.default_rng(int(element[RNG_KEY]))
        try:
            if self.train:
                image = images_lib.train_image(data, rng, resize=self.resize, crop=self.crop, normalize=self.normalize)
            else:
                image = images_lib.eval_image(data, resize=self.resize, crop=self.crop, normalize=self.normalize)
        except ValueError as e:
            raise ValueError(f"record {element.get('processid')!r}: {e}") from e
        out = {k: element[k] for k in self.passthrough}
        out[fields.IMAGE] = image
        return out


class ImageBatch(grain.transforms.Map):
    """A list of image records -> stacked arrays."""

    def __init__(self, label_rank: str | None, keep: Sequence[str]):
        self.label_rank, self.keep = label_rank, tuple(keep)

    def map(self, element):
        out = {fields.IMAGE: np.stack([r[fields.IMAGE] for r in element])}
        if self.label_rank:
            out["label"] = _labels(element, self.label_rank)
        out.update(_kept(element, self.keep))
        return out


class ClibdBatch(grain.transforms.RandomMap):
    """A list of image records (with DNA and labels passed through) -> the CLIBD batch."""

    def __init__(self, dna: DnaBatch, vocab: text_lib.TaxonomyVocab, label_ranks: Sequence[str], keep: Sequence[str]):
        self.dna, self.vocab = dna, vocab
        self.label_ranks, self.keep = tuple(label_ranks), tuple(keep)

    def random_map(self, element, rng):
        out = {fields.IMAGE: np.stack([r[fields.IMAGE] for r in element])}
        out.update(self.dna.tokens(element, rng))
        text_ids, text_mask = self.vocab.encode(text_lib.taxonomy_texts(element))
        out["text_ids"], out["text_attention_mask"] = text_ids, text_mask
        for rank in self.label_ranks:
            out[f"label_{rank}"] = _labels(element, rank)
        out.update(_kept(element, self.keep))
        return out


# ----------------------------------------------------------------------------- plumbing


def _shard_options(shard: ShardArg, drop_remainder: bool) -> grain.sharding.ShardOptions | None:
    if shard is None or isinstance(shard, grain.sharding.NoSharding):
        return None
    if shard == "jax":
        return grain.sharding.ShardByJaxProcess(drop_remainder=drop_remainder)
    if isinstance(shard, grain.sharding.ShardOptions):
        return shard
    raise ValueError(f"shard must be 'jax', None or a grain.sharding.ShardOptions, got {shard!r}")


def records_pipeline(
    source: Sequence[Mapping[str, Any]],
    *,
    train: bool,
    seed: int = 0,
    shard: ShardArg = "jax",
    num_epochs: int | None = None,
    features: Sequence[str] | None = None,
    reshuffle_each_epoch: bool = True,
    batch_size: int | None = None,
) -> grain.MapDataset:
    """Shard -> shuffle (training) -> repeat -> :class:`NormalizeRecord` over a source.

    Training (module docstring, step 1) needs ``batch_size``, the per-process batch, when the
    records are sharded over several processes.

    ``reshuffle_each_epoch=False`` (training): one seeded order, repeated by every epoch, as a
    torch ``DistributedSampler(shuffle=True)`` that is never given ``set_epoch`` (CLIBD's
    ``bioscanclip/util/dataset.py``); ``True``: a new order each epoch (grain's shuffle).

    ``num_epochs=None``: repeat forever when training, one pass otherwise. With
    ``shard='jax'`` each JAX process reads ``1/process_count`` of the records (the
    same number on every process when training). ``features``: the fields the
    pipeline reads; a :class:`tfds_source.RecordSource` then parses only those.
    Evaluation records (``train=False``) get their source position as :data:`ROW`.
    """
    if len(source) == 0:
        raise ValueError("empty source")
    if features is not None and getattr(source, "features", None) is not None:  # a RecordSource (or a view of one)
        source = source.select([f for f in dict.fromkeys(features) if f in source.features])
    ds = grain.MapDataset.source(source).seed(seed)
    options = _shard_options(shard, drop_remainder=train)
    if train:
        ds = _global_training_order(ds, seed, num_epochs, reshuffle_each_epoch)
        if options is not None and options.shard_count > 1:
            if not batch_size:
                raise ValueError("records_pipeline: a sharded training pipeline needs batch_size (per process)")
            ds = _process_rows(ds, options.shard_index, options.shard_count, int(batch_size), seed)
        return ds.map(NormalizeRecord())
    ds = ds.map_with_index(_with_row)  # before sharding: the index is the source position
    if options is not None and options.shard_count > 1:
        n = len(ds)
        ds = ds[options.shard_index :: options.shard_count]
        if len(ds) == 0:
            raise ValueError(f"shard {options.shard_index}/{options.shard_count} of {n} records is empty")
    if num_epochs not in (None, 1):
        ds = ds.repeat(num_epochs)
    return ds.map(NormalizeRecord())


def _global_training_order(ds: grain.MapDataset, seed: int, num_epochs: int | None,
                           reshuffle_each_epoch: bool) -> grain.MapDataset:
    """The records in training order over all epochs (``num_epochs=None``: forever), each with
    its :data:`RNG_KEY`."""
    if reshuffle_each_epoch:
        ds = ds.shuffle()
    else:
        order = np.random.default_rng(seed).permutation(len(ds))
        ds = grain.MapDataset.range(len(ds)).seed(seed).map(_Reorder(ds, order))
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    return ds.map_with_index(_WithRngKey(seed))


def _process_rows(ds: grain.MapDataset, index: int, count: int, batch_size: int, seed: int) -> grain.MapDataset:
    """Process ``index`` of ``count``: rows ``[index * batch_size, (index + 1) * batch_size)`` of
    every global batch of ``count * batch_size`` consecutive records; incomplete global batches
    are dropped, so every process yields the same number of records."""
    global_batch = count * batch_size
    n = (len(ds) // global_batch) * batch_size
    if n == 0:
        raise ValueError(f"{len(ds)} training records are fewer than one global batch of {global_batch} "
                         f"({count} processes x {batch_size})")
    return grain.MapDataset.range(n).seed(seed).map(_ProcessRow(ds, index, count, batch_size))


class _ProcessRow:
    """Local position ``j`` -> the global record this process reads there (picklable)."""

    def __init__(self, dataset: grain.MapDataset, index: int, count: int, batch_size: int):
        self.dataset, self.index, self.count, self.batch_size = dataset, index, count, batch_size

    def __call__(self, j: int):
        batch, row = divmod(int(j), self.batch_size)
        return self.dataset[batch * self.count * self.batch_size + self.index * self.batch_size + row]


class _Reorder:
    """``i -> dataset[order[i]]``: a fixed permutation of a map dataset (picklable for workers)."""

    def __init__(self, dataset: grain.MapDataset, order: np.ndarray):
        self.dataset, self.order = dataset, order

    def __call__(self, i: int):
        return self.dataset[int(self.order[i])]


def _finish(ds: grain.MapDataset, *, worker_count: int, read_threads: int | None, prefetch: int | None,
            worker_buffer_size: int = 2) -> grain.IterDataset:
    options = grain.ReadOptions()
    if read_threads is not None:
        options.num_threads = read_threads
    if prefetch is not None:
        options.prefetch_buffer_size = prefetch
    it = ds.to_iter_dataset(options)
    if worker_count > 0:
        _ensure_flags_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=worker_buffer_size)
        )
    return it


def _ensure_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside an absl app, use their defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _check_fields(name: str, value: str | None, allowed: Sequence[str]) -> None:
    if value is not None and value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


# ----------------------------------------------------------------------------- pipelines


def dna_pipeline(
    source: Sequence[Mapping[str, Any]],
    *,
    tokenizer: dna_lib.KmerTokenizer,
    batch_size: int,
    train: bool,
    seed: int = 0,
    mlm: bool = False,
    mask_prob: float = 0.5,
    masked_only: bool = False,
    label_rank: str | None = None,
    random_offset: bool | None = None,
    drop_remainder: bool | None = None,
    shard: ShardArg = "jax",
    num_epochs: int | None = None,
    worker_count: int = 0,
    read_threads: int | None = None,
    prefetch: int | None = None,
    keep: Sequence[str] = (),
) -> grain.IterDataset:
    """DNA batches for BarcodeBERT pretraining (``mlm=True``), fine-tuning and probes.

    Tokenisation runs once per batch (vectorised). ``random_offset`` (default: ``train``)
    drops the first ``randint(k)`` nucleotides of each barcode. ``label_rank`` is a rank
    or ``dna_bin``. See the module docstring for the batch keys.
    """
    _check_fields("label_rank", label_rank, fields.INDEX_FEATURES)
    needed = ["processid", fields.feature_name("dna_barcode"), *([label_rank] if label_rank else []), *keep]
    ds = records_pipeline(source, train=train, seed=seed, shard=shard, num_epochs=num_epochs, features=needed,
                          batch_size=batch_size)
    ds = ds.batch(batch_size, drop_remainder=train if drop_remainder is None else drop_remainder, batch_fn=list)
    ds = ds.random_map(
        DnaBatch(
            tokenizer,
            random_offset=train if random_offset is None else random_offset,
            mlm=mlm,
            mask_prob=mask_prob,
            masked_only=masked_only,
            label_rank=label_rank,
            keep=keep,
        )
    )
    return _finish(ds, worker_count=worker_count, read_threads=read_threads, prefetch=prefetch)


def image_pipeline(
    source: Sequence[Mapping[str, Any]],
    *,
    batch_size: int,
    train: bool,
    seed: int = 0,
    label_rank: str | None = None,
    image_size: int = images_lib.CROP,
    resize: int = images_lib.RESIZE,
    normalize: bool = False,
    drop_remainder: bool | None = None,
    shard: ShardArg = "jax",
    num_epochs: int | None = None,
    worker_count: int = 0,
    read_threads: int | None = None,
    prefetch: int | None = None,
    keep: Sequence[str] = (),
) -> grain.IterDataset:
    """Image batches: training augmentation or the eval view (see :mod:`images`)."""
    _check_fields("label_rank", label_rank, fields.INDEX_FEATURES)
    passthrough = tuple(dict.fromkeys(([label_rank] if label_rank else []) + list(keep)))
    needed = ["processid", fields.IMAGE, *passthrough]
    ds = records_pipeline(source, train=train, seed=seed, shard=shard, num_epochs=num_epochs, features=needed,
                          batch_size=batch_size)
    ds = ds.random_map(ImageRecord(train=train, crop=image_size, resize=resize, normalize=normalize, passthrough=passthrough))
    ds = ds.batch(batch_size, drop_remainder=train if drop_remainder is None else drop_remainder, batch_fn=list)
    ds = ds.map(ImageBatch(label_rank, keep))
    return _finish(ds, worker_count=worker_count, read_threads=read_threads, prefetch=prefetch)


def clibd_pipeline(
    source: Sequence[Mapping[str, Any]],
    *,
    tokenizer: dna_lib.KmerTokenizer,
    vocab: text_lib.TaxonomyVocab,
    batch_size: int,
    train: bool,
    seed: int = 0,
    label_ranks: Sequence[str] = schema.EVAL_RANKS,
    dna_random_offset: bool = False,
    image_size: int = images_lib.CROP,
    resize: int = images_lib.RESIZE,
    normalize: bool = False,
    drop_remainder: bool | None = None,
    shard: ShardArg = "jax",
    num_epochs: int | None = None,
    worker_count: int = 0,
    read_threads: int | None = None,
    prefetch: int | None = None,
    keep: Sequence[str] = (),
    reshuffle_each_epoch: bool = True,
) -> grain.IterDataset:
    """CLIBD batches: image view, tokenised DNA, taxonomy text ids and labels per rank
    (``reshuffle_each_epoch``: :func:`records_pipeline`)."""
    for rank in label_ranks:
        _check_fields("label_ranks", rank, fields.INDEX_FEATURES)
    passthrough = tuple(
        dict.fromkeys(
            ["processid", fields.feature_name("dna_barcode")]
            + list(label_ranks)
            + [fields.name_feature(r) for r in schema.EVAL_RANKS]
            + list(keep)
        )
    )
    needed = [fields.IMAGE, *passthrough]
    ds = records_pipeline(source, train=train, seed=seed, shard=shard, num_epochs=num_epochs, features=needed,
                          reshuffle_each_epoch=reshuffle_each_epoch, batch_size=batch_size)
    ds = ds.random_map(ImageRecord(train=train, crop=image_size, resize=resize, normalize=normalize, passthrough=passthrough))
    ds = ds.batch(batch_size, drop_remainder=train if drop_remainder is None else drop_remainder, batch_fn=list)
    dna = DnaBatch(tokenizer, random_offset=dna_random_offset, mlm=False, mask_prob=0.0, masked_only=False,
                   label_rank=None, keep=(), prefix="dna_")
    ds = ds.random_map(ClibdBatch(dna, vocab, label_ranks, keep))
    return _finish(ds, worker_count=worker_count, read_threads=read_threads, prefetch=prefetch)


# ----------------------------------------------------------------------------- batch specs


def _struct(shape: tuple[int, ...], dtype) -> Any:
    import jax  # the pipelines themselves never need jax

    return jax.ShapeDtypeStruct(shape, np.dtype(dtype))


def dna_batch_spec(batch_size: int, tokenizer: dna_lib.KmerTokenizer, *, mlm: bool = False, label: bool = False,
                   prefix: str = "") -> dict[str, Any]:
    """The batch :func:`dna_pipeline` yields (without ``keep``), as ``{key: jax.ShapeDtypeStruct}``."""
    t = tokenizer.num_tokens
    spec = {f"{prefix}ids": _struct((batch_size, t), np.int32),
            f"{prefix}attention_mask": _struct((batch_size, t), np.bool_)}
    if mlm:
        spec[f"{prefix}targets"] = _struct((batch_size, t), np.int32)
        spec[f"{prefix}mlm_mask"] = _struct((batch_size, t), np.bool_)
    if label:
        spec["label"] = _struct((batch_size,), np.int32)
    return spec


def clibd_batch_spec(batch_size: int, *, tokenizer: dna_lib.KmerTokenizer, text_length: int, image_size: int,
                     label_ranks: Sequence[str] = schema.EVAL_RANKS,
                     modalities: Sequence[str] = ("image", "dna", "text")) -> dict[str, Any]:
    """The batch :func:`clibd_pipeline` yields (without ``keep``), restricted to the keys of
    ``modalities`` (what a model with those towers reads), as ``{key: jax.ShapeDtypeStruct}``."""
    spec: dict[str, Any] = {}
    if "image" in modalities:
        spec[fields.IMAGE] = _struct((batch_size, image_size, image_size, images_lib.CHANNELS), np.float32)
    if "dna" in modalities:
        spec.update(dna_batch_spec(batch_size, tokenizer, prefix="dna_"))
    if "text" in modalities:
        spec["text_ids"] = _struct((batch_size, text_length), np.int32)
        spec["text_attention_mask"] = _struct((batch_size, text_length), np.bool_)
    for rank in label_ranks:
        spec[f"label_{rank}"] = _struct((batch_size,), np.int32)
    return spec
