"""Preparing and opening the ``bioscan5m`` TFDS dataset, and normalising its records.

Importing this module registers the builder (``tfds.builder('bioscan5m')`` then works
from any directory; :mod:`bioscan_jax.data.registration`). It does not import TensorFlow.

* :func:`prepare` builds a config (``array_record`` shards, no TensorFlow needed);
* :func:`data_source` opens a split expression for random access (grain's input):
  a :class:`RecordSource` of normalised records, parsed straight from the stored
  ``tf.train.Example`` protos (only the features asked for);
* :func:`normalize_record` is the one place where decoded records are normalised:
  TFDS gives ``Text`` as ``bytes`` (``str`` under ``tfds.testing.mock_data``) and
  scalars as ``int``/numpy scalars/0-d arrays depending on the path; user records
  (BOLD imports, hand-made dicts) may use either. After it: text is ``str``, indices
  and integers are ``int``, floats are ``float``, ``image`` stays JPEG ``bytes``;
* :func:`label_names` / :func:`names_of` map label indices back to strings.
"""

from __future__ import annotations

import collections.abc
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.proto import tf_example_pb2

from bioscan_jax.data import fields, registration, schema

if TYPE_CHECKING:
    from tfds_builder.bioscan5m.bioscan5m_dataset_builder import Bioscan5mConfig

registration.register()
NAME = "bioscan5m"

__all__ = [
    "NAME",
    "RecordSource",
    "builder",
    "data_source",
    "label_names",
    "names_of",
    "normalize_record",
    "prepare",
    "synthetic_config",
    "tfds_split",
]

_TEXT = frozenset(fields.TEXT_FEATURES)
_INT = frozenset(fields.INDEX_FEATURES + fields.UINT8_FEATURES + fields.INT64_FEATURES + fields.DERIVED_FEATURES)
_FLOAT = frozenset(fields.FLOAT_FEATURES)


def synthetic_config(num_records: int, seed: int = 0, *, images: bool = True) -> "Bioscan5mConfig":
    """A synthetic builder config (:func:`tfds_builder.bioscan5m.synthetic_config`)."""
    from tfds_builder.bioscan5m import bioscan5m_dataset_builder  # pylint: disable=import-outside-toplevel

    return bioscan5m_dataset_builder.synthetic_config(num_records, seed, images=images)


def builder(
    config: str | Bioscan5mConfig = schema.DEFAULT_IMAGE_PACKAGE,
    data_dir: str | None = None,
    **builder_kwargs: Any,
) -> tfds.core.DatasetBuilder:
    """The ``bioscan5m`` builder of a config name or :class:`Bioscan5mConfig`."""
    if isinstance(config, str):
        return tfds.builder(f"{NAME}/{config}", data_dir=data_dir, **builder_kwargs)
    return tfds.builder(NAME, config=config, data_dir=data_dir, **builder_kwargs)


def prepare(
    builder_config: str | Bioscan5mConfig = schema.DEFAULT_IMAGE_PACKAGE,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    *,
    on_bad_record: str = "raise",
    verify_md5: bool = True,
    verify_images: bool = True,
    download_dir: str | None = None,
) -> tfds.core.DatasetBuilder:
    """Builds (once) and returns the builder of a config.

    ``manual_dir`` holds the official files, extracted or zipped (not needed for the
    synthetic configs). ``on_bad_record='skip'`` skips and counts unusable records
    (see ``builder.info.metadata['skipped']``); ``verify_md5=False`` accepts a metadata
    CSV named like the official one whose md5 differs; ``verify_images=False`` skips
    decoding each image at build time (only the structural JPEG check remains). These
    apply when the dataset is built; a prepared dataset is reused as it is.
    """
    b = builder(builder_config, data_dir, on_bad_record=on_bad_record, verify_md5=verify_md5,
                verify_images=verify_images)
    b.download_and_prepare(
        download_dir=download_dir,
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir),
    )
    return b


def tfds_split(split: str, available: Sequence[str] | None = None) -> str:
    """A split expression for TFDS: metasplits (``seen``, ``unseen``, ``all``) and the
    ``validation`` alias are expanded with :func:`schema.resolve_split`; TFDS slices
    (``train[:10%]``) pass through. With ``available``, splits absent from the
    prepared dataset are dropped from metasplits (a named split must exist)."""
    parts = []
    for part in (p.strip() for p in split.split("+")):
        if "[" in part:
            parts.append(part)
            continue
        names = schema.resolve_split(part)
        if available is not None and part in schema.METASPLITS:
            names = tuple(n for n in names if n in available) or names
        parts.extend(names)
    return "+".join(parts)


def data_source(
    name: str | Bioscan5mConfig = f"{NAME}/{schema.DEFAULT_IMAGE_PACKAGE}",
    split: str = "train",
    data_dir: str | None = None,
    *,
    features: Sequence[str] | None = None,
    **builder_kwargs: Any,
) -> "RecordSource":
    """Random-access records of a prepared split expression (no TensorFlow).

    ``name`` is ``'bioscan5m/<config>'`` (or a :class:`Bioscan5mConfig`); ``split`` any
    split expression (:func:`tfds_split`). Records come already normalised (see
    :func:`normalize_record`), images as the stored JPEG bytes; ``features`` keeps only
    those (faster). The dataset must already be prepared (see :func:`prepare`).
    """
    if isinstance(name, str):
        b = tfds.builder(name, data_dir=data_dir, **builder_kwargs)
    else:
        b = builder(name, data_dir, **builder_kwargs)
    if not b.is_prepared():
        raise FileNotFoundError(
            f"{b.name}/{b.builder_config.name} is not prepared in {b.data_dir}; "
            "run bioscan_jax.data.tfds_source.prepare(...) first."
        )
    raw = b.as_data_source(
        split=tfds_split(split, list(b.info.splits)), deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
    )
    return RecordSource(raw, _kinds(b.info.features), features)


def _kinds(features) -> dict[str, str]:
    """Feature name -> how to read it from a serialized tf.train.Example."""
    kinds = {}
    for name in features.keys():
        if name == fields.IMAGE or name in _TEXT:
            kinds[name] = "bytes" if name == fields.IMAGE else "text"
        elif name in _FLOAT:
            kinds[name] = "float"
        elif name in _INT:
            kinds[name] = "int"
        else:
            raise ValueError(f"unexpected feature {name!r}")
    return kinds


class RecordSource(collections.abc.Sequence):
    """Random access to the normalised records of a prepared split (grain's input).

    Reads the serialized examples from the array_record shards and parses only the
    selected features with the protobuf library: several times faster than decoding
    every feature with TFDS's generic NumPy decoder. Picklable (grain workers).
    """

    def __init__(self, raw_source, kinds: Mapping[str, str], features: Sequence[str] | None = None):
        if features is not None:
            unknown = [f for f in features if f not in kinds]
            if unknown:
                raise KeyError(f"unknown feature(s) {unknown}; available: {sorted(kinds)}")
            kinds = {f: kinds[f] for f in dict.fromkeys(features)}
        self._raw = raw_source
        self._kinds = dict(kinds)

    @property
    def features(self) -> tuple[str, ...]:
        return tuple(self._kinds)

    def select(self, features: Sequence[str]) -> "RecordSource":
        """The same records with only ``features``."""
        return RecordSource(self._raw, self._kinds, features)

    def __len__(self) -> int:
        return len(self._raw)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self._parse(self._raw[index])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [self._parse(r) for r in self._raw.__getitems__(list(indices))]

    def __iter__(self):
        # Sequence's default __iter__ stops on IndexError; array_record raises ValueError.
        for start in range(0, len(self), 1024):
            yield from self.__getitems__(range(start, min(start + 1024, len(self))))

    def __repr__(self) -> str:
        return f"RecordSource({len(self)} records, features={list(self._kinds)})"

    def _parse(self, serialized: bytes) -> dict[str, Any]:
        feature = tf_example_pb2.Example.FromString(serialized).features.feature
        out = {}
        for name, kind in self._kinds.items():
            f = feature[name]
            if kind == "text":
                out[name] = f.bytes_list.value[0].decode("utf-8")
            elif kind == "int":
                out[name] = int(f.int64_list.value[0])
            elif kind == "float":
                out[name] = float(f.float_list.value[0])
            else:
                out[name] = f.bytes_list.value[0]
        return out


# ----------------------------------------------------------------------------- records


def _as_str(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8")
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return _as_str(value.item())
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return str(value)


def _as_int(value) -> int:
    if value is None:
        return schema.MISSING_INDEX
    return int(np.asarray(value).item()) if not isinstance(value, int) else value


def _as_float(value) -> float:
    if value is None:
        return float("nan")
    return float(np.asarray(value).item()) if not isinstance(value, float) else value


def _as_image(value):
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype == object:
        return bytes(value.item())
    return value  # JPEG bytes, or a decoded uint8 array


def normalize_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """One decoded record with plain Python values (see the module docstring).

    Unknown keys are kept as they are; the image is kept as ``bytes`` (or the decoded
    array when the source decoded it).
    """
    out = {}
    for key, value in record.items():
        if key in _TEXT:
            out[key] = _as_str(value)
        elif key in _INT:
            out[key] = _as_int(value)
        elif key in _FLOAT:
            out[key] = _as_float(value)
        elif key == fields.IMAGE:
            out[key] = _as_image(value)
        else:
            out[key] = value
    return out


# ----------------------------------------------------------------------------- labels


def label_names(info_or_builder) -> dict[str, list[str]]:
    """Label names per label column (``species`` -> [...]), as stored at build time.

    Index ``i`` of feature ``<column>`` names ``label_names(...)[<column>][i]``; the
    lists are built over the whole metadata CSV, so they agree across splits.
    """
    info = getattr(info_or_builder, "info", info_or_builder)
    metadata = info.metadata
    if metadata is None or "label_names" not in metadata:
        raise KeyError(f"{info.full_name}: no label_names in the dataset metadata")
    return {c: list(v) for c, v in metadata["label_names"].items()}


def names_of(indices, names: Sequence[str], missing: str = "") -> np.ndarray:
    """Maps label indices (any shape; ``-1`` = missing) to their names (object array)."""
    table = np.asarray(list(names) + [missing], dtype=object)
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size and (idx.max(initial=-1) >= len(names) or idx.min(initial=0) < -1):
        raise IndexError(f"label index out of range [-1, {len(names)}): {idx.min()}..{idx.max()}")
    return table[np.where(idx < 0, len(names), idx)]
