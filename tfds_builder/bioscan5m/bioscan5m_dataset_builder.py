"""bioscan5m: BIOSCAN-5M insect images, DNA barcodes and taxonomic labels."""

from __future__ import annotations

import collections
import dataclasses
import time

import numpy as np
import pandas as pd
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from bioscan_jax.data import schema
from bioscan_jax.data import fields
from tfds_builder.bioscan5m import jpeg_check
from tfds_builder.bioscan5m import records
from tfds_builder.bioscan5m import sources

_HOMEPAGE = "https://biodiversitygenomics.net/5M-insects/"
#: Records whose images are sent to a checking process in one go (small, so that each split's first chunk is soon answered; bytes held: ~20 KB each).
CHECK_CHUNK = 64


def _chunks(iterable, size):
    chunk = []
    for item in iterable:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
_FILE_FORMAT = tfds.core.FileFormat.ARRAY_RECORD

_DESCRIPTION_OF_PACKAGE = {
    "cropped_256": "images cropped to the insect and resized to 256 px on the shorter side (default)",
    "original_256": "full images resized to 256 px on the shorter side",
    "cropped": "images cropped to the insect, full resolution",
    "original_full": "full images at 1024x768",
}


@dataclasses.dataclass(eq=False)
class Bioscan5mConfig(tfds.core.BuilderConfig):
    """A variant of the dataset.

    Attributes:
      image_package: which image package fills the ``image`` feature; ``None``: no
        images (metadata and DNA barcodes only).
      synthetic: generate simulated data with :func:`bioscan_jax.data.synthetic.generate`
        instead of reading the official files from the manual dir.
      num_records: records to simulate (``None``: the generator's default).
      seed: seed of the simulation.
    """

    image_package: str | None = schema.DEFAULT_IMAGE_PACKAGE
    synthetic: bool = False
    num_records: int | None = None
    seed: int = 0


def synthetic_config(num_records: int, seed: int = 0, *, images: bool = True) -> Bioscan5mConfig:
    """A custom synthetic config, named after its size and seed (its own data folder)."""
    return Bioscan5mConfig(
        name=f"synthetic{'' if images else '_dna'}_n{num_records}_s{seed}",
        description=f"Simulated BIOSCAN-5M, {num_records} records, seed {seed}.",
        image_package=schema.DEFAULT_IMAGE_PACKAGE if images else None,
        synthetic=True,
        num_records=num_records,
        seed=seed,
    )


BUILDER_CONFIGS = [
    *(
        Bioscan5mConfig(name=p, description=f"Metadata, DNA barcodes and {d}.", image_package=p)
        for p, d in _DESCRIPTION_OF_PACKAGE.items()
    ),
    Bioscan5mConfig(name="dna", description="Metadata and DNA barcodes only, no images: the fast path for DNA work.", image_package=None),
    Bioscan5mConfig(
        name="synthetic",
        description="Simulated data in the official layout (cropped_256 images); needs no download.",
        synthetic=True,
    ),
    Bioscan5mConfig(
        name="synthetic_dna",
        description="Simulated metadata and DNA barcodes, no images; needs no download.",
        image_package=None,
        synthetic=True,
    ),
]


def features_dict(with_image: bool) -> tfds.features.FeaturesDict:
    """The features of a config (see :mod:`bioscan_jax.data.fields` for the names)."""
    spec: dict = {}
    if with_image:
        spec[fields.IMAGE] = tfds.features.Image(encoding_format="jpeg", doc="JPEG bytes of the source file, unchanged")
    for name in fields.TEXT_FEATURES:
        spec[name] = tfds.features.Text()
    for name in fields.INDEX_FEATURES:
        spec[name] = tfds.features.Scalar(np.int32, doc=f"index into label_names['{fields.COLUMN_OF[name]}'], -1 = missing")
    for name in fields.FLOAT_FEATURES:
        spec[name] = tfds.features.Scalar(np.float32, doc="NaN = missing")
    for name in fields.UINT8_FEATURES:
        spec[name] = tfds.features.Scalar(np.uint8)
    for name in fields.INT64_FEATURES:
        spec[name] = tfds.features.Scalar(np.int64, doc="-1 = missing")
    spec[fields.FIRST_OF_BARCODE] = tfds.features.Scalar(
        np.uint8, doc="1 = first row of its barcode after rstrip('N') in the metadata (BarcodeBERT's dedup)")
    return tfds.features.FeaturesDict(spec)


class Builder(tfds.core.GeneratorBasedBuilder):
    """DatasetBuilder for BIOSCAN-5M.

    Builder kwargs (``tfds.builder('bioscan5m', **kwargs)``, ``builder_kwargs=`` of
    ``tfds.load``/``tfds.data_source``):

    * ``on_bad_record``: ``'raise'`` (default) or ``'skip'`` (skip, log and count in
      ``info.metadata['skipped']``);
    * ``verify_md5``: check the metadata CSV against the official md5 when it is named
      like the official file (default ``True``; synthetic configs never check).
    * ``verify_images``: decode every image with PIL before it is written
      (:func:`jpeg_check.verify_jpeg`: corrupt entropy-coded data, constant images; default
      ``True``); ``False`` keeps only the cheap structural check (:func:`jpeg_check.jpeg_problem`:
      not a JPEG, no end-of-image marker). Either way a bad image is a ``bad_image`` record.
    * ``image_check_workers``: processes that decode the images beside the writer (default
      :func:`jpeg_check.default_worker_count`: one per spare core; ``0`` decodes in this process).
    * ``file_format``: defaults to ``array_record`` (random access for
      ``tfds.data_source``; ``as_dataset``/``tfds.load`` read it too, see README).
    """

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release: BIOSCAN-5M metadata, DNA barcodes, four image packages, synthetic data.",
        "1.1.0": "first_of_barcode feature (BarcodeBERT's barcode deduplication); pandas' default NA strings are missing.",
    }
    BUILDER_CONFIGS = BUILDER_CONFIGS
    DEFAULT_CONFIG_NAME = schema.DEFAULT_IMAGE_PACKAGE
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
    Download BIOSCAN-5M from {_HOMEPAGE} (Google Drive / HuggingFace links there) and
    put the files in `manual_dir` (default `~/tensorflow_datasets/downloads/manual/`),
    either extracted or as the official zips, which are read in place:

    * metadata: `{sources.METADATA_ZIP}` (or the extracted
      `{schema.METADATA_RELPATH}`);
    * images of the package you build (not needed for the `dna` config):
      `BIOSCAN_5M_cropped_256.zip` (or its parts `BIOSCAN_5M_cropped_256_pretrain.01.zip`,
      `_pretrain.02.zip`, `_train.zip`, `_eval.zip`), `BIOSCAN_5M_original_256*.zip`,
      `BIOSCAN_5M_cropped.01.zip`..`.02.zip`, `BIOSCAN_5M_original_full.01.zip`..`.05.zip`;
      or the extracted `{schema.IMAGES_RELDIR}/<package>/<split>/<chunk>/<processid>.jpg`.

    The `synthetic` configs need no download.
    """

    # Set explicitly (TFDS would infer them from the module with `epath.resource_path`): the
    # builder's folder is this file's, however the package was imported.
    pkg_dir_path = epath.Path(__file__).parent

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def __init__(self, *, on_bad_record: str = "raise", verify_md5: bool = True, verify_images: bool = True,
                 image_check_workers: int | None = None, file_format=None, **kwargs):
        if on_bad_record not in records.ON_BAD_RECORD:
            raise ValueError(f"on_bad_record must be one of {records.ON_BAD_RECORD}, got {on_bad_record!r}")
        self._on_bad_record = on_bad_record
        self._verify_md5 = verify_md5
        self._verify_images = bool(verify_images)
        self._check_workers = jpeg_check.default_worker_count() if image_check_workers is None else int(image_check_workers)
        self._checkers: jpeg_check.CheckerProcesses | None = None
        super().__init__(file_format=file_format, **kwargs)
        # Default to array_record for new datasets; keep the format of prepared ones.
        if file_format is None and not (self.data_path / "dataset_info.json").exists():
            self.info.set_file_format(_FILE_FORMAT, override=True)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=features_dict(self.builder_config.image_package is not None),
            supervised_keys=None,
            homepage=_HOMEPAGE,
            metadata=tfds.core.MetadataDict(),
        )

    # ------------------------------------------------------------------ generation

    def _source_root(self, dl_manager) -> epath.Path:
        config = self.builder_config
        if not config.synthetic:
            return epath.Path(dl_manager.manual_dir)
        from bioscan_jax.data import synthetic  # pylint: disable=g-import-not-at-top

        num_records = config.num_records if config.num_records is not None else synthetic.DEFAULT_NUM_RECORDS
        package = config.image_package or schema.DEFAULT_IMAGE_PACKAGE
        images = config.image_package is not None
        root = epath.Path(dl_manager.download_dir) / "bioscan5m_synthetic" / f"n{num_records}_s{config.seed}_{package if images else 'noimages'}"
        done = root / ".complete"
        if not done.exists():
            logging.info("Generating %d synthetic records in %s", num_records, root)
            if root.exists():
                root.rmtree()
            root.mkdir(parents=True)
            synthetic.generate(root, num_records=num_records, seed=config.seed, image_package=package, images=images)
            done.write_text("ok\n")
        return root

    def _split_generators(self, dl_manager):
        config = self.builder_config
        root = self._source_root(dl_manager)
        meta_file = sources.find_metadata(root)
        policy = records.BadRecords(self._on_bad_record, meta_file.name)
        started = time.time()
        verified = []
        meta = records.read(meta_file, policy, check_md5=lambda md5: verified.append(self._check_md5(meta_file, md5)))
        md5_verified = verified[0]
        logging.info("Read %d metadata rows from %s in %.1fs", meta.num_rows_read, meta_file.name, time.time() - started)

        images = sources.open_images(root, config.image_package) if config.image_package else None
        split_codes = pd.Categorical(meta.frame["split"], categories=schema.SPLITS).codes
        rows_of = {s: np.flatnonzero(split_codes == i) for i, s in enumerate(schema.SPLITS)}
        present = [s for s in schema.SPLITS if len(rows_of[s])]
        missing = [s for s in schema.SPLITS if s not in present]
        if missing:
            logging.warning("Splits without records (not in this dataset): %s", missing)

        self.info.metadata.update(
            {
                "label_names": meta.label_names,
                "metadata_file": meta_file.name.rsplit("/", 1)[-1],
                "metadata_md5": meta.md5,
                "metadata_md5_verified": md5_verified,
                "metadata_rows": meta.num_rows_read,
                "image_package": config.image_package,
                "image_source": images.describe() if images else None,
                # how each image was checked before it was written
                "image_check": (("decoded" if self._verify_images else "structure") if images else None),
                "synthetic": bool(config.synthetic),
                "missing_splits": missing,
            }
        )
        self._policy = policy
        self._record_policy()
        return {
            split: self._generate_examples(meta=meta, rows=rows_of[split], images=images, split=split)
            for split in present
        }

    def _check_md5(self, meta_file: sources.MetadataFile, md5: str) -> bool:
        if md5 == schema.METADATA_MD5:
            return True
        if self.builder_config.synthetic or not meta_file.is_official_name:
            logging.info("Metadata %s is not the official release file (md5 %s): not verified.", meta_file.name, md5)
            return False
        if not self._verify_md5:
            logging.warning("Metadata %s md5 %s != official %s (verify_md5=False: continuing).", meta_file.name, md5, schema.METADATA_MD5)
            return False
        raise records.BadRecordError(
            f"{meta_file.name}: md5 {md5} does not match the official BIOSCAN-5M metadata ({schema.METADATA_MD5}). "
            "The download may be incomplete or modified; pass verify_md5=False to the builder to use it anyway."
        )

    def _record_policy(self) -> None:
        """Writes the current skip counts into the dataset metadata (saved after generation)."""
        self.info.metadata.update(self._policy.summary())

    def _checked_images(self, examples, images: sources.ImageStore):
        """``(example, jpeg bytes, problem)`` in order; ``(example, None, FileNotFoundError)`` for
        a missing image.

        The bytes are read here, in order (one zip handle). With ``verify_images`` the decodes
        (:func:`jpeg_check.verify_jpeg`) run in checking processes
        (:class:`jpeg_check.CheckerProcesses`, one per spare core), :data:`CHECK_CHUNK` records
        at a time, while this process serialises and writes the previous chunk.
        """

        def read(example):
            try:
                return example, images.read(example["split"], example["chunk"], example["processid"]), None
            except FileNotFoundError as e:
                return example, None, e

        chunks = (list(map(read, chunk)) for chunk in _chunks(examples, CHECK_CHUNK))
        if not self._verify_images:  # the structural check is too cheap to hand off
            for items in chunks:
                for example, data, missing in items:
                    yield example, data, missing if data is None else jpeg_check.jpeg_problem(data)
            return

        sent: collections.deque = collections.deque()  # the chunks in the checkers, oldest first

        def labelled(chunks):  # the key names a chunk in a checker's error: its first and last record
            for items in chunks:
                sent.append(items)
                label = f"{items[0][0]['processid']!r}..{items[-1][0]['processid']!r}"
                yield label, [data for _, data, _ in items if data is not None]

        if self._checkers is None:  # started once, for every split; ended with the build
            self._checkers = jpeg_check.CheckerProcesses(self._check_workers)
        for _, answers in self._checkers.map(labelled(chunks)):  # answers come in the order sent
            items = sent.popleft()
            answers = iter(answers)
            for example, data, missing in items:
                yield example, data, missing if data is None else next(answers)

    def _download_and_prepare(self, dl_manager, download_config):
        try:
            return super()._download_and_prepare(dl_manager, download_config)
        finally:
            if self._checkers is not None:
                self._checkers.close()
                self._checkers = None

    def _generate_examples(self, meta: records.Metadata, rows: np.ndarray, images: sources.ImageStore | None, split: str):
        policy = self._policy
        before = sum(policy.counts.values())
        written = 0
        examples = records.iter_examples(meta, rows)
        checked = (self._checked_images(examples, images) if images is not None
                   else ((example, None, None) for example in examples))
        try:
            for example, data, problem in checked:
                pid = example["processid"]
                if isinstance(problem, FileNotFoundError):
                    policy.report("missing_image", repr(pid), str(problem))
                    continue
                if problem:
                    policy.report("bad_image", repr(pid), f"{problem} ({images.package}/{example['split']}/{example['chunk']}/{pid}.jpg)")
                    continue
                if data is not None:
                    example[fields.IMAGE] = data
                written += 1
                yield pid, example
        finally:
            skipped = sum(policy.counts.values()) - before
            logging.info("Split %s: %d records written, %d skipped (%s).", split, written, skipped, dict(policy.counts))
            self._record_policy()

    # ------------------------------------------------------------------ reading

    def _as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
        """``tf.data`` over the prepared files; array_record is read via a Python reader."""
        file_format = (read_config.file_format if read_config else None) or self.info.file_format
        if tfds.core.FileFormat.from_value(file_format) != tfds.core.FileFormat.ARRAY_RECORD:
            return super()._as_dataset(split=split, decoders=decoders, read_config=read_config, shuffle_files=shuffle_files)
        from tfds_builder.bioscan5m import tf_reader  # pylint: disable=g-import-not-at-top

        return tf_reader.as_dataset(
            self.info, split=split, decoders=decoders, read_config=read_config, shuffle_files=shuffle_files
        )
