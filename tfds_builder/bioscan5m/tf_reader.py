"""``tf.data`` over array_record shards, for ``builder.as_dataset`` / ``tfds.load``.

TFDS 4.9 writes array_record without TensorFlow and serves it to
``tfds.data_source``, but ``ArrayRecordFileAdapter.make_tf_data`` raises
``NotImplementedError``. This module fills that gap for our builder only: the
serialized examples are streamed from the shards by ``array_record``'s reader inside
``tf.data.Dataset.from_generator``, then parsed and decoded by TFDS's own
``ExampleParser`` and feature decoders, so the elements are exactly those
``tfds.load`` returns for a TFRecord dataset. Split slicing (``'train[:10%]'``,
``'train+val'``), ``shuffle_files``, ``ReadConfig`` interleave/parallelism/options,
``input_context`` sharding and ``add_tfds_id`` are honoured.

Imported lazily: only ``as_dataset`` needs TensorFlow.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from tensorflow_datasets.core import example_parser
from tensorflow_datasets.core import splits as splits_lib
from tensorflow_datasets.core.utils import read_config as read_config_lib

_READ_BLOCK = 256
_DEFAULT_CYCLE_LENGTH = 16


def _records(path, skip, take, add_id):
    """Yields the serialized examples [skip, skip+take) of one shard (optionally with a tfds_id)."""
    path = path.decode() if isinstance(path, bytes) else str(path)
    reader = array_record_module.ArrayRecordReader(path)
    try:
        name = os.path.basename(path).encode()
        end = int(skip) + int(take)
        for start in range(int(skip), end, _READ_BLOCK):
            stop = min(start + _READ_BLOCK, end)
            for i, record in enumerate(reader.read(start, stop), start=start):
                if add_id:
                    yield name + b"__" + str(i).encode(), record
                else:
                    yield record
    finally:
        reader.close()


def as_dataset(info, *, split, decoders=None, read_config=None, shuffle_files=False) -> tf.data.Dataset:
    """The ``tf.data.Dataset`` of one split expression of an array_record dataset."""
    read_config = read_config or tfds.ReadConfig()
    if isinstance(decoders, tfds.decode.PartialDecoding):
        features = decoders.extract_features(info.features)
        decoders = decoders.decoders
    else:
        features = info.features
    parser = example_parser.ExampleParser(features.get_serialized_info())

    instructions = splits_lib.SplitDict(list(info.splits.values()))[split].file_instructions
    if read_config.experimental_interleave_sort_fn is not None:
        instructions = read_config.experimental_interleave_sort_fn(instructions)
    if not instructions:
        raise ValueError(f"Split {split!r} corresponds to no data.")
    paths = [os.fspath(i.filename) for i in instructions]
    skips = np.array([i.skip for i in instructions], dtype=np.int64)
    takes = np.array([i.take for i in instructions], dtype=np.int64)
    add_id = bool(read_config.add_tfds_id)

    files = tf.data.Dataset.from_tensor_slices((paths, skips, takes))
    if read_config.input_context:
        files = files.shard(read_config.input_context.num_input_pipelines, read_config.input_context.input_pipeline_id)
    if shuffle_files:
        files = files.shuffle(
            len(paths),
            seed=read_config.shuffle_seed,
            reshuffle_each_iteration=read_config.shuffle_reshuffle_each_iteration,
        )
    if read_config.repeat_filenames:
        files = files.repeat()

    signature = (
        (tf.TensorSpec((), tf.string), tf.TensorSpec((), tf.string)) if add_id else tf.TensorSpec((), tf.string)
    )

    def read_file(path, skip, take):
        return tf.data.Dataset.from_generator(
            _records, args=(path, skip, take, add_id), output_signature=signature
        )

    cycle_length = read_config.interleave_cycle_length
    if cycle_length == read_config_lib.MISSING or cycle_length is None:
        cycle_length = 1 if info.disable_shuffling else _DEFAULT_CYCLE_LENGTH
    deterministic = not (shuffle_files and read_config.shuffle_seed is None)
    ds = files.interleave(
        read_file,
        cycle_length=cycle_length,
        block_length=read_config.interleave_block_length,
        num_parallel_calls=read_config.num_parallel_calls_for_interleave_files,
        deterministic=deterministic,
    )
    if read_config.assert_cardinality and not read_config.input_context and not read_config.repeat_filenames:
        ds = ds.apply(tf.data.experimental.assert_cardinality(int(takes.sum())))
    ds = ds.with_options(read_config.options)

    def parse_and_decode(serialized):
        return features.decode_example(parser.parse_example(serialized), decoders=decoders)

    if add_id:
        def parse_with_id(tfds_id, serialized):
            example = parse_and_decode(serialized)
            example["tfds_id"] = tfds_id
            return example

        return ds.map(parse_with_id, num_parallel_calls=read_config.num_parallel_calls_for_decode)
    return ds.map(parse_and_decode, num_parallel_calls=read_config.num_parallel_calls_for_decode)
