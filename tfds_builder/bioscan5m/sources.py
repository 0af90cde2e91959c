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
written: structurally (:func:`jpeg_problem`) and, unless the builder is told not to, by
decoding it with PIL (:func:`verify_jpeg`).
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import hashlib
import io
import re
import zipfile
from collections.abc import Iterator
from typing import BinaryIO

from absl import logging
from etils import epath
from PIL import Image

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


# ----------------------------------------------------------------------------- JPEG check

_SOI = b"\xff\xd8\xff"
_EOI = b"\xff\xd9"
#: How far from the end of the file the end-of-image marker may lie (trailing bytes).
_EOI_WINDOW = 1024


def jpeg_problem(data: bytes) -> str | None:
    """Why ``data`` is not a complete JPEG (``None`` if it looks like one).

    A cheap structural check (start-of-image marker, end-of-image marker within the
    last bytes): it catches non-JPEG files and truncated downloads without decoding.
    """
    if len(data) < 4:
        return f"only {len(data)} bytes"
    if not data.startswith(_SOI):
        return f"not a JPEG (starts with {data[:4]!r})"
    if data.rfind(_EOI, max(0, len(data) - _EOI_WINDOW)) < 0:
        return "truncated JPEG (no end-of-image marker)"
    return None


#: Bytes fed after the entropy-coded data in place of the end-of-image marker: libjpeg's
#: Huffman decoder reads at most 8 bytes ahead of the bits it uses (its bit buffer holds
#: 64 bits; 32 in 32-bit builds), so a sound image always completes on them, while a
#: corrupt one that needs more bits than the file holds runs out of them and asks for more.
_LOOKAHEAD_FILLER = b"\x00" * 8
#: Start-of-frame markers of sequential Huffman-coded JPEGs (baseline, extended).
_SEQUENTIAL_HUFFMAN = (0xC0, 0xC1)


def _first_scan(data: bytes) -> tuple[int, int, int] | None:
    """(SOF marker, components in the frame, components in the first scan) from the
    marker segments before the first start-of-scan; ``None`` if they do not parse
    (PIL then reports the problem)."""
    at, sof, frame_components = 2, None, None
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # standalone markers
            at += 2
            continue
        length = int.from_bytes(data[at + 2 : at + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if at + 10 > len(data):
                return None
            sof, frame_components = marker, data[at + 9]
        elif marker == 0xDA:
            if sof is None or at + 5 > len(data):
                return None
            return sof, frame_components, data[at + 4]
        at += 2 + length
    return None


def _decode(data: bytes, end: int, *, draft: bool, account: bool) -> tuple[Image.Image | None, str | None]:
    """Decodes ``data`` with PIL's JPEG decoder; returns (image, None) or (None, reason).

    ``end`` is the offset of the end-of-image marker. PIL's decoder is driven directly,
    as ``ImageFile.load`` does, so ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never consulted
    (no end-of-image marker is made up for a short file). With ``account`` (a
    sequential single-scan, single-frame JPEG), the data are fed in two steps that
    expose what libjpeg only *warns* about (PIL discards libjpeg's warnings):

    1. all but the last byte of the entropy-coded data: a sound image cannot be
       complete without that byte (the encoder pads only the last byte, with fewer than
       8 one bits), so an image complete now had bytes left over -- libjpeg's
       "Corrupt JPEG data: N extraneous bytes before marker 0xd9";
    2. the last byte plus :data:`_LOOKAHEAD_FILLER` instead of the end-of-image marker:
       a sound image completes; one that still asks for data needed more bits than the
       file holds -- libjpeg's "Corrupt JPEG data: premature end of data segment"
       (which it otherwise pads with zero bits, silently through PIL).
    """
    try:
        im = Image.open(io.BytesIO(data), formats=("JPEG",))
        if draft:
            im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
        if len(im.tile) != 1:
            return None, f"unexpected JPEG layout ({len(im.tile)} tiles)"
        if getattr(im, "n_frames", 1) != 1:  # MPO: the first frame ends before the file does
            account = False
        im.load_prepare()
        codec, extents, offset, args = im.tile[0]
        decoder = Image._getdecoder(im.mode, codec, args, im.decoderconfig)  # pylint: disable=protected-access
    except Image.UnidentifiedImageError:
        return None, "unreadable JPEG header (PIL cannot identify the image)"
    except Exception as e:  # pylint: disable=broad-except  # PIL raises many kinds on a bad header
        return None, f"unreadable JPEG header ({type(e).__name__}: {e})"
    stop = end
    while stop > offset and data[stop - 1] == 0xFF:  # fill bytes before the marker are not data
        stop -= 1
    try:
        decoder.setimage(im.im, extents)
        if account:
            cut = stop - 2 if data[stop - 2 : stop] == b"\xff\x00" else stop - 1
            consumed, err = decoder.decode(data[offset:cut])
            if consumed < 0:
                if err < 0:
                    return None, "corrupt JPEG data (libjpeg: broken data stream)"
                return None, "corrupt JPEG data (the image is complete before the end of its entropy-coded data)"
            consumed, err = decoder.decode(data[offset + consumed : stop] + _LOOKAHEAD_FILLER)
            if consumed >= 0:
                return None, "corrupt JPEG data (premature end of the entropy-coded data)"
        else:
            consumed, err = decoder.decode(data[offset:])
            if consumed >= 0:
                return None, "truncated JPEG data (the decoder needs more than the file holds)"
        if err < 0:
            return None, "corrupt JPEG data (libjpeg: broken data stream)"
    except Exception as e:  # pylint: disable=broad-except
        return None, f"undecodable JPEG ({type(e).__name__}: {e})"
    finally:
        decoder.cleanup()
    im.tile = []  # decoded: im.im holds the pixels
    return im, None


def _constant_colour(im: Image.Image) -> tuple[int, ...] | None:
    """The colour of every pixel if all are the same, else ``None``."""
    extrema = im.getextrema()
    if len(im.getbands()) == 1:
        extrema = (extrema,)
    if all(lo == hi for lo, hi in extrema):
        return tuple(int(lo) for lo, _ in extrema)
    return None


def verify_jpeg(data: bytes, *, draft: bool = True) -> str | None:
    """Why ``data`` is not a usable JPEG (``None`` if it is): a short reason.

    In order: the structural check (:func:`jpeg_problem`); a real decode with PIL (no
    TensorFlow) at 1/8 scale (``draft``: libjpeg still entropy-decodes every
    coefficient, so what is found in the data is the same as at full size, at a fraction
    of the cost); then the constant-image check (every pixel the same value in every
    channel, e.g. an all-black frame; a draft that looks constant is confirmed at full
    size, since a fine pattern can average to a constant draft).

    What PIL reports: truncated data and data that break libjpeg's decoder ("broken
    data stream") raise; but PIL silences libjpeg's *warnings* -- the usual outcome
    of bytes overwritten inside the entropy-coded data is that libjpeg warns
    ("Corrupt JPEG data: N extraneous bytes before marker 0xd9" or "premature end of
    data segment") and returns an image, no Python exception or warning. These are
    detected by feeding the decoder in two steps (see :func:`_decode`): the image must
    not be complete before the last byte of its entropy-coded data, and must be
    complete with it. Measured against libjpeg itself (warnings counted as errors) on
    ~1,500 damaged copies of the synthetic images (random bytes written over 1 to 256
    bytes, spans zeroed or deleted, truncations with an end marker appended): the same
    verdict on all but one, a "bad Huffman code" warning after which decoding
    re-synchronised; no false alarm on ~3,000 valid JPEGs of all kinds (sizes 1-300 px,
    quality 1-100, grey/RGB/CMYK, subsampling, optimized, progressive, restart markers).

    Not detected: damage after which the Huffman decoding re-synchronises and ends
    exactly at the end of the data -- libjpeg reports nothing either (bar the odd "bad
    Huffman code"); it is the fate of about 60% of 1-byte, 35% of 16-byte and 10% of
    64-byte random overwrites, and leaves a changed block and usually a colour shift
    of the rest of the image. For progressive, multi-scan or multi-frame (MPO) JPEGs
    only decoder errors and truncation are detected, and with restart markers only
    damage in the last restart interval is.
    """
    problem = jpeg_problem(data)
    if problem:
        return problem
    end = data.rfind(_EOI, max(0, len(data) - _EOI_WINDOW))
    scan = _first_scan(data)
    account = scan is not None and scan[0] in _SEQUENTIAL_HUFFMAN and scan[1] == scan[2]
    im, problem = _decode(data, end, draft=draft, account=account)
    if problem:
        return problem
    colour = _constant_colour(im)
    if colour is not None and draft:  # rare: confirm at full size
        im, problem = _decode(data, end, draft=False, account=account)
        if problem:
            return problem
        colour = _constant_colour(im)
    if colour is not None:
        return f"constant image (every pixel is {colour[0] if len(colour) == 1 else colour})"
    return None
