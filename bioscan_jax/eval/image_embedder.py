"""Specimen-image embeddings with a CLIBD image tower, for ``bioscan-jax embed --images``.

Input (:func:`read_images`): a folder of images (``.jpg``/``.jpeg``/``.png``/``.tif``/``.bmp``,
searched recursively; the id is the path below the folder without its suffix) or a CSV/TSV with a
``path`` (or ``image_path``/``file``) column, relative paths taken from the file's folder, and an
optional ``id`` column. Each image gets CLIBD's evaluation view (``Resize`` of the shorter side,
``CenterCrop``, ``[0, 1]`` pixels, optionally normalised: :func:`bioscan_jax.data.images.eval_image`)
and the image tower's feature. Every record gets a ``status``: ``ok``, or why it has no
embedding (``no such file``, ``cannot decode image``, ...), its row then NaN. Nothing is dropped.

Decoding (:func:`load_view`) never blows up memory on a huge file: a JPEG is decoded at a reduced
DCT scale (PIL ``draft``) still at least ``resize`` px on its shorter side, so a 10,000 x 10,000
photo costs about 5 MB; a format that cannot be decoded at reduced scale (PNG, TIFF, ...) larger
than PIL's ``Image.MAX_IMAGE_PIXELS`` (and any image above twice that, which PIL refuses to
open) gets the status ``image too large`` instead of being decoded. Documented normalisations
keep the row and say so in its status: transparency is flattened onto white (``ok (transparency
flattened onto white)``), CMYK is converted to RGB by PIL (``ok (CMYK converted to RGB)``). Other
statuses: ``no path`` (an empty path in a CSV), ``empty file``.

:class:`ClibdDnaEmbedder` is the same model's DNA tower with the tokenizer of the CLIBD evaluation,
for a labelled DNA reference that image queries are matched against.
"""

from __future__ import annotations

import io
import os
import pathlib
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from flax import nnx
from PIL import Image

from bioscan_jax.data import images as images_lib
from bioscan_jax.eval.embedded import Embedded, is_ok

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
PATH_COLUMNS = ("path", "image_path", "file")
NO_FILE, UNDECODABLE = "no such file", "cannot decode image"
NO_PATH, EMPTY_FILE, TOO_LARGE = "no path", "empty file", "image too large"
FLATTENED, CMYK = "ok (transparency flattened onto white)", "ok (CMYK converted to RGB)"


def read_images(path: str | os.PathLike) -> pd.DataFrame:
    """``id`` and ``path`` of every image a folder or a CSV/TSV names (module docstring), plus the
    CSV's other columns (e.g. labels). Duplicate ids and an empty input are errors naming the input."""
    path = pathlib.Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        frame = pd.DataFrame({"id": [str(p.relative_to(path).with_suffix("")) for p in files],
                              "path": [str(p) for p in files]})
    elif path.is_file():
        with open(path, encoding="utf-8", errors="replace") as f:
            header = f.readline()
        # the header line's tab or comma (a sniffer takes a letter of a one-column 'path' header)
        frame = pd.read_csv(path, sep="\t" if "\t" in header else ",", dtype=str, keep_default_na=False)
        column = next((c for c in PATH_COLUMNS if c in frame.columns), None)
        if column is None:
            raise ValueError(f"{path}: no image path column; expected one of {PATH_COLUMNS}, found {list(frame.columns)}")
        given = frame[column].astype(str).str.strip()
        paths = [p if not p or os.path.isabs(p) else str(path.parent / p) for p in given]
        ids = (frame["id"].astype(str).tolist() if "id" in frame.columns
               else [pathlib.Path(p).stem or f"row_{i + 1}" for i, p in enumerate(given)])
        extra = frame.drop(columns=[c for c in ("id", column) if c in frame.columns])
        frame = pd.concat([pd.DataFrame({"id": ids, "path": paths}), extra.reset_index(drop=True)], axis=1)
    else:
        raise FileNotFoundError(f"no image folder or list at {path}")
    if frame.empty:
        raise ValueError(f"{path}: no images found (suffixes {', '.join(IMAGE_SUFFIXES)})")
    duplicated = frame["id"][frame["id"].duplicated()]
    if len(duplicated):
        raise ValueError(f"{path}: duplicate image id {duplicated.iloc[0]!r}")
    return frame


def open_checked(data: bytes) -> tuple[Image.Image | None, str]:
    """The lazily opened image (pixels not decoded yet) and ``ok``, or ``None`` and the status
    saying why it must not be decoded (module docstring: ``image too large``, ``cannot decode image``)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # judged below, by format
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        return None, f"{TOO_LARGE} (over twice PIL's limit of {Image.MAX_IMAGE_PIXELS:,} px)"
    except Exception:  # noqa: BLE001 - PIL raises several types for what is not an image
        return None, UNDECODABLE
    width, height = img.size
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit and img.format != "JPEG":  # only a JPEG decodes at reduced scale
        return None, f"{TOO_LARGE} ({width}x{height} px {img.format} over PIL's limit of {limit:,} px)"
    return img, "ok"


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)


def _flattened_png(img: Image.Image) -> bytes:
    """The image composited onto white, as PNG bytes (lossless) for the evaluation view."""
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    buf = io.BytesIO()
    Image.alpha_composite(white, rgba).convert("RGB").save(buf, "PNG")
    return buf.getvalue()


def load_view(path: str, *, resize: int, crop: int, normalize: bool = False) -> tuple[np.ndarray | None, str]:
    """CLIBD's evaluation view of one image file (:func:`bioscan_jax.data.images.eval_image`) and
    its status, or ``None`` and why there is none (module docstring)."""
    if not path:
        return None, NO_PATH
    try:
        data = pathlib.Path(path).read_bytes()
    except OSError:
        return None, NO_FILE
    if not data:
        return None, EMPTY_FILE
    img, status = open_checked(data)
    if img is None:
        return None, status
    if _has_alpha(img):
        try:
            data, status = _flattened_png(img), FLATTENED
        except Exception:  # noqa: BLE001 - truncated or corrupt pixel data
            return None, UNDECODABLE
    elif img.mode == "CMYK":
        status = CMYK
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # a JPEG: decoded at reduced scale
            return images_lib.eval_image(data, resize=resize, crop=crop, normalize=normalize), status
    except ValueError:
        return None, UNDECODABLE


class ImageEmbedder:
    """A CLIBD model's image tower with its evaluation preprocessing."""

    def __init__(self, model: nnx.Module, name: str, *, resize: int | None = None, normalize: bool = False):
        if "image" not in model.modalities:
            raise ValueError(f"{name}: the model has no image tower (towers: {list(model.modalities)})")
        self.model, self.name = model, name
        self.crop = int(model.config.image.image_size)  # the tower's input size
        # CLIBD's evaluation view: Resize 256 -> CenterCrop 224, kept in proportion for other sizes.
        self.resize = int(resize) if resize else round(self.crop * images_lib.RESIZE / images_lib.CROP)
        self.normalize = bool(normalize)
        self.describe = {"spec": name, "kind": "clibd_image", "resize": self.resize, "crop": self.crop,
                         "normalize": self.normalize}

        @nnx.jit
        def forward(m, images):
            features, _ = m.embed("image", {"image": images}, deterministic=True)
            return features.astype(jnp.float32)

        self._forward = forward

    def _load(self, path: str) -> tuple[np.ndarray | None, str]:
        return load_view(path, resize=self.resize, crop=self.crop, normalize=self.normalize)

    def embed(self, ids: Sequence[str], paths: Sequence[str], *, batch_size: int = 64, progress: bool = False
              ) -> Embedded:
        n = len(paths)
        batch_size = max(1, min(batch_size, n))
        out: np.ndarray | None = None
        status: list[str] = []
        blank = np.zeros((self.crop, self.crop, 3), np.float32)
        for start in range(0, n, batch_size):
            loaded = [self._load(p) for p in paths[start:start + batch_size]]
            status.extend(s for _, s in loaded)
            batch = np.stack([x if x is not None else blank for x, _ in loaded]
                             + [blank] * (batch_size - len(loaded)))  # one compiled shape
            features = np.asarray(jax.device_get(self._forward(self.model, jnp.asarray(batch))))[:len(loaded)]
            if out is None:
                out = np.full((n, features.shape[1]), np.nan, np.float32)
            ok = np.asarray([x is not None for x, _ in loaded])
            out[start:start + len(loaded)][ok] = features[ok]
            if progress:
                print(f"\r{min(start + batch_size, n)}/{n} images", end="", flush=True)
        if progress:
            print(flush=True)
        return Embedded(out if out is not None else np.zeros((0, 0), np.float32), status)


class ClibdDnaEmbedder:
    """A CLIBD model's DNA tower with the DNA tokenizer of its CLIBD evaluation (the run's
    ``model.dna.tokenization`` and ``data.max_nucleotides``, as ``tasks/clibd/training.prepare`` builds it;
    v1 for a released ``best.pth``), through the evaluation's own forward
    (:func:`bioscan_jax.models.towers.aligned_features`). Statuses are those of
    :mod:`bioscan_jax.eval.dna_embedder` (``no barcode``, ``no valid bases``, ``no complete k-mer``)."""

    def __init__(self, model: nnx.Module, name: str, tokenizer):
        if "dna" not in model.modalities:
            raise ValueError(f"{name}: the model has no DNA tower (towers: {list(model.modalities)})")
        if tokenizer.k != model.config.dna.k:
            raise ValueError(f"{name}: a {tokenizer.k}-mer tokenizer for a {model.config.dna.k}-mer DNA tower")
        self.model, self.name, self.tokenizer = model, name, tokenizer
        self.dim = int(model.config.embed_dim)
        self.describe = {"spec": name, "kind": "clibd_dna", "k": tokenizer.k,
                         "max_nucleotides": tokenizer.max_nucleotides,
                         "strip_trailing_n": tokenizer.strip_trailing_n, "tower_mode": model.config.tower_mode}

    def embed(self, ids: Sequence[str], seqs: Sequence[Any], *, batch_size: int = 256, progress: bool = False
              ) -> Embedded:
        from bioscan_jax import sharding as mesh_lib
        from bioscan_jax.data.pipeline import ROW
        from bioscan_jax.eval import dna_embedder
        from bioscan_jax.models import towers
        from bioscan_jax.eval import embed as embed_lib

        names = [str(i) for i in ids]
        tok_ids, mask, report = self.tokenizer.tokenize(list(seqs), names=names, errors="count")
        status = dna_embedder._statuses(names, seqs, report)  # noqa: SLF001 - one status vocabulary
        ok = np.flatnonzero(is_ok(status) & mask.any(axis=1))  # clibd_eval: dna_ok = mask.any(axis=1)
        out = np.full((len(seqs), self.dim), np.nan, np.float32)
        if ok.size:
            mesh = mesh_lib.make_mesh(dict(data=-1, fsdp=1, tensor=1))
            devices = len(jax.devices())  # a batch no larger than the records: padding costs a full forward
            batch_size = -(-min(batch_size, ok.size) // devices) * devices
            batches = ({"dna_ids": tok_ids[ok[i:i + batch_size]], "dna_attention_mask": mask[ok[i:i + batch_size]],
                        ROW: np.arange(i, min(i + batch_size, ok.size))} for i in range(0, ok.size, batch_size))
            if progress:
                from tqdm import tqdm

                batches = tqdm(batches, total=-(-ok.size // batch_size), desc=f"DNA tower of {self.name}", unit="batch")
            result = embed_lib.embed_batches(self.model, batches, towers.aligned_features(("dna",)), mesh=mesh,
                                             batch_size=batch_size)
            out[ok] = result["embedding"]
        return Embedded(out, status)
