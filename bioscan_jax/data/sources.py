"""Opening the splits a task needs, from the TFDS dataset or a user's BOLD export.

Both paths give the same thing: per split expression a random-access sequence of record dicts
keyed by the builder's feature names (``dna_barcode``, ``species`` index, ``species_name``...),
and the label names per label column (index ``i`` of ``species`` is ``label_names['species'][i]``).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from bioscan_jax import config_access
from bioscan_jax.data import schema
from bioscan_jax.data.schema import FIRST_OF_BARCODE

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Splits:
    """Record sources by split expression, plus the label names shared by all of them."""

    sources: dict[str, Sequence[Mapping[str, Any]]]
    label_names: dict[str, list[str]]
    description: str
    #: per split, what a task recorded of its size (e.g. before/after deduplication)
    sizes: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: what the records are, independent of where the files lie (:func:`content_identity`)
    identity: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: a BOLD import's report (rows read, kept, skipped per reason with the first lines), else None
    import_report: dict[str, Any] | None = None

    def __getitem__(self, split: str) -> Sequence[Mapping[str, Any]]:
        return self.sources[split]

    def num_classes(self, column: str) -> int:
        return len(self.label_names[column])


class Subset(collections.abc.Sequence):
    """A view of ``source`` restricted to ``indices`` (picklable for grain workers)."""

    def __init__(self, source: Sequence[Mapping[str, Any]], indices: np.ndarray):
        self._source, self._indices = source, np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self._source[int(self._indices[i])]

    def __getitems__(self, indices: Sequence[int]):
        picked = [int(self._indices[i]) for i in indices]
        getitems = getattr(self._source, "__getitems__", None)
        return getitems(picked) if getitems else [self._source[i] for i in picked]

    @property
    def features(self):
        return getattr(self._source, "features", None)

    def select(self, features: Sequence[str]) -> "Subset":
        """The same view over ``source.select(features)`` (a source that parses only those), or
        this view when the source reads whole records anyway (a list of dicts)."""
        inner = getattr(self._source, "select", None)
        return Subset(inner(features), self._indices) if inner is not None else self


def reference_dedup(source: Sequence[Mapping[str, Any]]) -> Sequence[Mapping[str, Any]]:
    """The records of ``source`` that BarcodeBERT's evaluation data keeps: the first row of each
    barcode after ``rstrip('N')`` over the *whole* metadata (``data/data_split.py::split_df``;
    the ``first_of_barcode`` feature, :func:`bioscan_jax.data.schema.first_of_barcode`)."""
    select = getattr(source, "select", None)
    view = select([FIRST_OF_BARCODE]) if select else source
    flags = np.fromiter((int(r[FIRST_OF_BARCODE]) for r in iter_records(view)), dtype=np.int64, count=len(view))
    return Subset(source, np.flatnonzero(flags))


def iter_records(source: Sequence[Mapping[str, Any]], chunk: int = 1024):
    """Every record of ``source`` in order, read ``chunk`` at a time through ``__getitems__``
    when the source has it: one array_record read per record costs ~250 µs, a batch ~28 µs per
    record (BarcodeBERT's deduplication over BIOSCAN-5M's 4.75M pretraining records: 20 min
    read one by one, 2 min in batches)."""
    getitems = getattr(source, "__getitems__", None)
    if getitems is None:
        yield from (source[i] for i in range(len(source)))
        return
    for start in range(0, len(source), chunk):
        yield from getitems(range(start, min(start + chunk, len(source))))


def _nonempty(value: Any) -> bool:
    return not pd.isna(value) and value != ""


def open_splits(data: Any, splits: Sequence[str], *, features: Sequence[str] | None = None,
                seed: int = 0) -> Splits:
    """Opens ``splits`` (split expressions) as described by a task's ``config.data``.

    ``data.source == 'tfds'``: the ``bioscan5m`` builder config ``data.builder_config`` is
    prepared once (``data.manual_dir`` for the official files; synthetic configs generate
    themselves, ``data.num_records`` > 0 picks a custom size; ``data.on_bad_record``,
    ``data.verify_md5`` and ``data.verify_images`` go to the builder) and read with
    :func:`bioscan_jax.data.tfds_source.data_source`.
    ``data.source == 'bold'``: ``data.path`` (BOLD TSV or FASTA) is imported and split by species
    with :func:`bioscan_jax.data.bold.assign_species_split`.
    """
    if data.source == "tfds":
        out = _open_tfds(data, splits, features, seed)
    elif data.source == "bold":
        out = _open_bold(data, splits, seed)
    else:
        raise ValueError(f"unknown config.data.source {data.source!r}; valid: 'tfds', 'bold'")
    out.identity = content_identity(data, out, seed)
    return out


def file_digest(path: Any, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def content_identity(data: Any, splits: Splits, seed: int) -> dict[str, Any]:
    """What determines the records of ``splits`` (part of a training stage's run identity):
    the dataset's name, config and version (TFDS) or the BOLD file's sha256 and the species-split
    settings, the bad-record policy, and the size of every opened split. Not where the files lie:
    a moved data directory or file is the same data."""
    sizes = {split: len(source) for split, source in splits.sources.items()}
    if data.source == "bold":
        return {"source": "bold", "sha256": file_digest(data.path),
                "unseen_fraction": float(data.unseen_fraction), "test_fraction": float(data.test_fraction),
                "split_seed": int(seed), "min_length": data.get("min_length", None), "sizes": sizes}
    return {"source": "tfds", "dataset": splits.description,
            "on_bad_record": str(data.get("on_bad_record", "raise")), "sizes": sizes}


#: What ``pretrain_split='auto'`` means for each source: BIOSCAN-5M's pretraining records
#: (unlabelled + other held-out species), or for a BOLD export the records without a species plus
#: the seen species' training records (never test or unseen-species records).
AUTO_PRETRAIN_SPLITS = {"tfds": "pretrain+other_heldout", "bold": "pretrain+train"}


def pretrain_split(data: Any, split: str | None = None) -> str:
    """``split`` (default ``data.pretrain_split``) with ``'auto'`` resolved for ``data.source``."""
    split = data.pretrain_split if split is None else split
    if split != "auto":
        return split
    if data.source not in AUTO_PRETRAIN_SPLITS:
        raise ValueError(f"unknown config.data.source {data.source!r}; valid: 'tfds', 'bold'")
    return AUTO_PRETRAIN_SPLITS[data.source]


def retrieval_splits(section: Any, queries: str = "query_splits") -> tuple[tuple[str, ...], tuple[str, str]]:
    """``(key splits, (seen query split, unseen query split))`` of a retrieval evaluation section
    (CLIBD's ``config.eval``: ``key_splits`` and ``query_splits``, or another pair of query
    splits such as ``val_query_splits``)."""
    keys = config_access.name_list(section.key_splits)
    pair = config_access.name_list(section[queries])
    if len(pair) != 2:
        raise ValueError(f"config.eval.{queries} must name (seen, unseen) splits, got {pair}")
    if not keys:
        raise ValueError("config.eval.key_splits is empty")
    return keys, (pair[0], pair[1])


def retrieval_query_fields(section: Any) -> tuple[str, ...]:
    """The query sets a retrieval evaluation section names: ``query_splits`` (the benchmark) and,
    when set, ``val_query_splits`` (validation during training), which must not share a split
    with the benchmark's queries (``ValueError``)."""
    val = config_access.name_list(config_access.get(section, "val_query_splits", ()))
    if not val:
        return ("query_splits",)
    _, test = retrieval_splits(section)
    if set(val) & set(test):
        raise ValueError(f"config.eval.val_query_splits={list(val)} shares a split with the test queries "
                         f"{list(test)}: training never evaluates on a test split")
    return ("query_splits", "val_query_splits")


def retrieval_eval_splits(section: Any, query_fields: Sequence[str] | None = None) -> tuple[str, ...]:
    """Every split a retrieval evaluation reads: the keys and the queries of ``query_fields``
    (default: every query set the section names, :func:`retrieval_query_fields`)."""
    out: list[str] = []
    for field in retrieval_query_fields(section) if query_fields is None else query_fields:
        keys, queries = retrieval_splits(section, field)
        out += [*keys, *queries]
    return tuple(dict.fromkeys(out))


def _open_tfds(data: Any, splits: Sequence[str], features, seed: int) -> Splits:
    from bioscan_jax.data import tfds_source  # TFDS only when this path is used

    config: Any = data.builder_config
    if config.startswith("synthetic") and int(data.get("num_records", 0) or 0) > 0:
        config = tfds_source.synthetic_config(int(data.num_records), seed, images=config != "synthetic_dna")
    builder = tfds_source.prepare(config, data_dir=data.get("data_dir") or None,
                                  manual_dir=data.get("manual_dir") or None,
                                  on_bad_record=str(data.get("on_bad_record", "raise")),
                                  verify_md5=bool(data.get("verify_md5", True)),
                                  verify_images=bool(data.get("verify_images", True)))
    available = list(builder.info.splits)
    sources = {}
    for split in splits:
        sources[split] = tfds_source.data_source(builder.builder_config, split, data_dir=builder.data_dir_root,
                                                 features=features)
        if len(sources[split]) == 0:
            raise ValueError(f"split {split!r} of {builder.info.full_name} is empty (available: {available})")
    return Splits(sources, tfds_source.label_names(builder), builder.info.full_name)


def frame_records(df, maps: Mapping[str, Sequence[str]]) -> list[dict[str, Any]]:
    """Records (builder feature names) from a metadata frame, label indices from ``maps``."""
    from bioscan_jax.data import fields

    idx = schema.label_indices(df, maps)
    first = schema.first_of_barcode(df["dna_barcode"])
    records = []
    columns = {c: df[c].tolist() for c in ("processid", "dna_barcode", "split")}
    names = {c: df[c].tolist() for c in schema.LABEL_COLUMNS}
    for i in range(len(df)):
        rec = {"processid": str(columns["processid"][i]),
               "dna_barcode": str(columns["dna_barcode"][i]) if _nonempty(columns["dna_barcode"][i]) else "",
               "split": str(columns["split"][i]), FIRST_OF_BARCODE: int(first[i])}
        for c in schema.LABEL_COLUMNS:
            rec[fields.feature_name(c)] = int(idx[c][i])
            v = names[c][i]
            rec[fields.name_feature(c)] = "" if pd.isna(v) else str(v)
        records.append(rec)
    return records


def _open_bold(data: Any, splits: Sequence[str], seed: int) -> Splits:
    from bioscan_jax.data import bold

    if not data.get("path"):
        raise ValueError("config.data.source='bold' needs config.data.path (a BOLD TSV or FASTA file)")
    # Everything about the file is checked here, before any model is built: the species and genus
    # columns, barcodes of at least config.data.min_length nt (default bold.MIN_LENGTH; those the
    # tokenizer will cut at config.data.max_nucleotides are counted), and species enough to split.
    min_length = data.get("min_length", bold.MIN_LENGTH)
    max_length = data.get("max_nucleotides", None)
    df, report = bold.read(data.path, require=("species", "genus"),
                           min_length=None if min_length is None else int(min_length),
                           max_length=None if max_length is None else int(max_length))
    print(import_report_text(report), flush=True)
    test_fraction = float(data.test_fraction)
    bold.check_species_split(df, str(data.path), test_fraction=test_fraction)
    df = bold.assign_species_split(df, unseen_fraction=float(data.unseen_fraction),
                                   test_fraction=test_fraction, seed=seed)
    maps = schema.label_maps(df)
    records = frame_records(df, maps)
    by_split: dict[str, list[int]] = collections.defaultdict(list)
    for i, r in enumerate(records):
        by_split[r["split"]].append(i)
    sources = {}
    for split in splits:
        names = schema.resolve_split(split)
        picked = sorted(i for name in names for i in by_split.get(name, []))
        if not picked:
            present = sorted(by_split)
            hint = (" (every record has a species, so nothing is left for 'pretrain': pretrain on the seen "
                    "species' training records with pretrain_split='auto' or 'pretrain+train')"
                    if "pretrain" in names and "train" not in names else "")
            raise ValueError(f"split {split!r} of the BOLD import {data.path} is empty (present: {present}){hint}")
        sources[split] = [records[i] for i in picked]
    return Splits(sources, maps, f"BOLD import {data.path}", import_report=report.as_dict())


def import_report_text(report: bold.ImportReport) -> str:
    """The import's one-line summary, then one line per skip reason and note with its first
    records or lines, as a user reads it before training starts."""
    lines = [f"BOLD import: {report.summary()}"]
    for what in (*sorted(report.skipped), *sorted(report.notes)):
        examples = report.examples.get(what)
        if examples:
            lines.append(f"  {what}: first {', '.join(examples)}")
    return "\n".join(lines)
