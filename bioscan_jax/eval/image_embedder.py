"""Specimen-image embeddings with a CLIBD image tower, for ``bioscan-jax embed --images``.

Input (:func:`read_images`): a folder of images (``.jpg``/``.jpeg``/``.png``/``.tif``/``.bmp``,
searched recursively; the id is the path below the folder without its suffix) or a CSV/TSV with a
``path`` (or ``image_path``/``file``) column, relative paths taken from the file's folder, and an
optional ``id`` column. Each image gets CLIBD's evaluation view (``Resize`` of the shorter side,
``CenterCrop``, ``[0, 1]`` pixels, optionally normalised: :func:`bioscan_jax.data.images.eval_image`)
and the image tower's feature. Every record gets a ``status``: ``ok``, or why it has no
embedding (``no such file``, ``cannot decode image``), its row then NaN. Nothing is dropped.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from flax import nnx

from bioscan_jax.data import images as images_lib
from bioscan_jax.eval.embedded import Embedded

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
PATH_COLUMNS = ("path", "image_path", "file")
NO_FILE, UNDECODABLE = "no such file", "cannot decode image"


def read_images(path: str | os.PathLike) -> pd.DataFrame:
    """``id`` and ``path`` of every image a folder or a CSV/TSV names (module docstring).
    Duplicate ids and an empty input are errors naming the input."""
    path = pathlib.Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        frame = pd.DataFrame({"id": [str(p.relative_to(path).with_suffix("")) for p in files],
                              "path": [str(p) for p in files]})
    elif path.is_file():
        frame = pd.read_csv(path, sep=None, engine="python", dtype=str)
        column = next((c for c in PATH_COLUMNS if c in frame.columns), None)
        if column is None:
            raise ValueError(f"{path}: no image path column; expected one of {PATH_COLUMNS}, found {list(frame.columns)}")
        paths = [p if os.path.isabs(p) else str(path.parent / p) for p in frame[column].fillna("").astype(str)]
        ids = frame["id"].astype(str).tolist() if "id" in frame.columns else [pathlib.Path(p).stem for p in paths]
        frame = pd.DataFrame({"id": ids, "path": paths})
    else:
        raise FileNotFoundError(f"no image folder or list at {path}")
    if frame.empty:
        raise ValueError(f"{path}: no images found (suffixes {', '.join(IMAGE_SUFFIXES)})")
    duplicated = frame["id"][frame["id"].duplicated()]
    if len(duplicated):
        raise ValueError(f"{path}: duplicate image id {duplicated.iloc[0]!r}")
    return frame


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
        try:
            data = pathlib.Path(path).read_bytes()
        except OSError:
            return None, NO_FILE
        try:
            return images_lib.eval_image(data, resize=self.resize, crop=self.crop, normalize=self.normalize), "ok"
        except ValueError:
            return None, UNDECODABLE

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
