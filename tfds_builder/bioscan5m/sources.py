"""Where the builder reads BIOSCAN-5M from: an extracted tree or the official zips.

A *source root* (the builder's ``manual_dir``, or the folder the synthetic generator
wrote) holds any mix of:

* the extracted tree: ``bioscan5m/metadata/csv/BIOSCAN_5M_Insect_Dataset_metadata.csv``
  and ``bioscan5m/images/<package>/<split>/<chunk>/<processid>.jpg``;
* the official zip files, read in place: the metadata zip
  ``BIOSCAN_5M_Insect_Dataset_metadata_MultiTypes.zip`` and the image zips of one
  package, e.g. ``BIOSCAN_5M_cropped_256.zip`` or its parts
  ``BIOSCAN_5M_cropped_256_{pretrain,train,eval}[.NN].zip``, or
  ``BIOSCAN_5M_original_full.01.zip`` ... ``.05.zip``.

Image zips are indexed once (their central directories are read with ``zipfile`` and
kept as compact arrays, not as millions of ``ZipInfo`` objects); the JPEG bytes are
then streamed member by member, never extracted. Each image is checked before it is
written (:mod:`tfds_builder.bioscan5m.jpeg_check`).
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import hashlib
import re
import zipfile
from collections.abc import Iterator
from typing import BinaryIO

from absl import logging
from etils import epath

from bioscan_jax.data import schema

#: The official metadata zip (holds the CSV among other formats).
METADATA_ZIP = "BIOSCAN_5M_Insect_Dataset_metadata_MultiTypes.zip"
METADATA_CSV_NAME = schema.METADATA_RELPATH.rsplit("/", 1)[-1]
_ZIP_PART = r"(_(pretrain|train|eval))?(\.\d+)?\.zip"


def image_zip_pattern(package: str) -> re.Pattern[str]:
    """File names of the official zips of one image package."""
    return re.compile(rf"BIOSCAN_5M_{re.escape(package)}{_ZIP_PART}")


def image_zip_names(package: str) -> str:
    """Human description of the zips of a package (for error messages and docs)."""
    return f"BIOSCAN_5M_{package}.zip or BIOSCAN_5M_{package}_{{pretrain,train,eval}}[.NN].zip or BIOSCAN_5M_{package}.NN.zip"


# ----------------------------------------------------------------------------- metadata


@dataclasses.dataclass(frozen=True)
class MetadataFile:
    """The metadata CSV: a plain file, or a member of the official metadata zip."""

    path: epath.Path
    member: str | None = None

    @property
    def name(self) -> str:
        """A name for messages: the path, plus the zip member if any."""
        return f"{self.path}!{self.member}" if self.member else str(self.path)

    @property
    def is_official_name(self) -> bool:
        """Whether the file is named like the official release's CSV."""
        base = (self.member or self.path.name).rsplit("/", 1)[-1]
        return base == METADATA_CSV_NAME

    @contextlib.contextmanager
    def open(self) -> Iterator[BinaryIO]:
        """Opens the CSV bytes (streams the zip member without extracting it)."""
        if self.member is None:
            with self.path.open("rb") as f:
                yield f
        else:
            with self.path.open("rb") as raw, zipfile.ZipFile(raw) as zf, zf.open(self.member) as f:
                yield f

    def md5(self) -> str:
        """md5 hex digest of the CSV bytes."""
        digest = hashlib.md5()
        with self.open() as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        return digest.hexdigest()


def find_metadata(root: epath.Path) -> MetadataFile:
    """Finds the metadata CSV under ``root``: the extracted tree, the CSV itself, or the zip."""
    for candidate in (root / schema.METADATA_RELPATH, root / METADATA_CSV_NAME):
        if candidate.exists():
            return MetadataFile(candidate)
    metadata_zip = root / METADATA_ZIP
    if metadata_zip.exists():
        with metadata_zip.open("rb") as raw, zipfile.ZipFile(raw) as zf:
            members = [n for n in zf.namelist() if n.rsplit("/", 1)[-1] == METADATA_CSV_NAME]
        if not members:
            raise FileNotFoundError(f"{metadata_zip}: no member named {METADATA_CSV_NAME}")
        # Prefer the member at the official relative path.
        members.sort(key=lambda n: (not n.endswith(schema.METADATA_RELPATH), n))
        return MetadataFile(metadata_zip, members[0])
    raise FileNotFoundError(
        f"No BIOSCAN-5M metadata under {root}: expected {schema.METADATA_RELPATH}, "
        f"{METADATA_CSV_NAME} or {METADATA_ZIP}."
    )


# ----------------------------------------------------------------------------- images


class ImageStore:
    """Maps (split, chunk, processid) of one image package to the JPEG bytes."""

    package: str

    def read(self, split: str, chunk: str | None, processid: str) -> bytes:
        """The stored bytes; raises ``FileNotFoundError`` naming the image when absent."""
        raise NotImplementedError

    def describe(self) -> dict:
        """A JSON-able description of the store (recorded in the dataset metadata)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def _tail(split: str, chunk: str | None, processid: str, package: str) -> str:
    """Path of an image below ``images/<package>/``: ``<split>/[<chunk>/]<processid>.jpg``."""
    rel = schema.image_relpath(package, split, chunk, processid)
    return rel[len(f"{schema.IMAGES_RELDIR}/{package}/") :]


class DirectoryImages(ImageStore):
    """Images of the extracted tree ``<root>/bioscan5m/images/<package>/...``."""

    def __init__(self, root: epath.Path, package: str):
        self.root = root
        self.package = package

    def read(self, split, chunk, processid):
        path = self.root / schema.image_relpath(self.package, split, chunk, processid)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"image {path} not found") from None

    def describe(self):
        return {"kind": "directory", "path": str(self.root / schema.IMAGES_RELDIR / self.package)}


class ZipImages(ImageStore):
    """Images read in place from the official zips of one package.

    The central directories are read once; per member only the few numbers needed
    to rebuild its ``ZipInfo`` are kept (a 4.6M-member zip costs ~100 bytes a member,
    not the ~400 of ``zipfile``'s own objects). Members are keyed by the path below
    ``<package>/``, so the folder above it inside the zip does not matter.
    """

    def __init__(self, zip_paths: list[epath.Path], package: str):
        self.package = package
        self.paths = list(zip_paths)
        self._files: list[zipfile.ZipFile] = []
        self._prefixes: list[str] = []
        self._index: dict[str, int] = {}
        # Per member: zip, prefix, local header offset, sizes, CRC, method, flags.
        self._zip = array.array("B")
        self._prefix = array.array("H")
        self._offset = array.array("Q")
        self._csize = array.array("Q")
        self._size = array.array("Q")
        self._crc = array.array("L")
        self._method = array.array("B")
        self._flags = array.array("H")
        self.duplicates = 0
        for path in self.paths:
            self._add_zip(path)
        logging.info(
            "Indexed %d %s images in %d zip(s) (%d duplicate members ignored, first kept): %s",
            len(self._index), package, len(self.paths), self.duplicates, [p.name for p in self.paths],
        )

    def _add_zip(self, path: epath.Path) -> None:
        zf = zipfile.ZipFile(path.open("rb"))
        zip_id = len(self._files)
        marker = f"{self.package}/"
        prefix_ids: dict[str, int] = {}
        for info in zf.infolist():
            name = info.filename
            if info.is_dir() or not name.endswith(".jpg"):
                continue
            at = name.find("/" + marker)
            if at >= 0:
                cut = at + 1 + len(marker)
            elif name.startswith(marker):
                cut = len(marker)
            else:
                continue
            tail = name[cut:]
            if tail in self._index:
                self.duplicates += 1
                continue
            prefix = name[:cut]
            if prefix not in prefix_ids:
                prefix_ids[prefix] = len(self._prefixes)
                self._prefixes.append(prefix)
            self._index[tail] = len(self._offset)
            self._zip.append(zip_id)
            self._prefix.append(prefix_ids[prefix])
            self._offset.append(info.header_offset)
            self._csize.append(info.compress_size)
            self._size.append(info.file_size)
            self._crc.append(info.CRC)
            self._method.append(info.compress_type)
            self._flags.append(info.flag_bits)
        # Drop zipfile's own per-member objects; the open handle is all we keep.
        zf.filelist = []
        zf.NameToInfo = {}
        self._files.append(zf)

    def __len__(self) -> int:
        return len(self._index)

    def read(self, split, chunk, processid):
        tail = _tail(split, chunk, processid, self.package)
        row = self._index.get(tail)
        if row is None:
            raise FileNotFoundError(
                f"image {self.package}/{tail} not found in {[p.name for p in self.paths]}"
            )
        info = zipfile.ZipInfo(self._prefixes[self._prefix[row]] + tail)
        info.header_offset = self._offset[row]
        info.compress_size = self._csize[row]
        info.file_size = self._size[row]
        info.CRC = self._crc[row]
        info.compress_type = self._method[row]
        info.flag_bits = self._flags[row]
        zf = self._files[self._zip[row]]
        with zf.open(info) as f:  # checks the local header name and the CRC
            return f.read()

    def describe(self):
        return {"kind": "zip", "files": [p.name for p in self.paths], "members": len(self._index)}

    def close(self):
        for zf in self._files:
            fp = zf.fp
            zf.close()
            if fp is not None:
                fp.close()
        self._files = []


def find_image_zips(root: epath.Path, package: str) -> list[epath.Path]:
    """The official zips of ``package`` directly under ``root``, sorted by name."""
    pattern = image_zip_pattern(package)
    return sorted((p for p in root.glob(f"BIOSCAN_5M_{package}*.zip") if pattern.fullmatch(p.name)), key=lambda p: p.name)


def open_images(root: epath.Path, package: str) -> ImageStore:
    """The image store of ``package`` under ``root``: the extracted tree if present, else the zips."""
    if package not in schema.IMAGE_PACKAGES:
        raise ValueError(f"Unknown image package {package!r}; valid: {', '.join(schema.IMAGE_PACKAGES)}")
    tree = root / schema.IMAGES_RELDIR / package
    if tree.exists():
        return DirectoryImages(root, package)
    zips = find_image_zips(root, package)
    if zips:
        return ZipImages(zips, package)
    raise FileNotFoundError(
        f"No {package} images under {root}: expected the folder {schema.IMAGES_RELDIR}/{package}/ "
        f"or the official zip(s) {image_zip_names(package)}."
    )
