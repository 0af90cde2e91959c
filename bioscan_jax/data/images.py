"""Image decoding and augmentation for the input pipelines (PIL + numpy, no TensorFlow).

Training (CLIBD / BIOSCAN-5M recipe, torchvision semantics): Resize 256 (shorter side)
-> RandomResizedCrop 224 (scale 0.08..1, ratio 3/4..4/3) -> horizontal flip (p=0.5) ->
vertical flip (p=0.5) -> rotation by U(-45°, 45°) (nearest neighbour, black fill, same
size). Evaluation: Resize 256 -> CenterCrop 224.

Output: ``float32`` HWC in ``[0, 1]``, or normalised with :data:`schema.RGB_MEAN` /
:data:`schema.RGB_STD` when ``normalize=True``.

Two shortcuts keep it fast without changing what the recipe means:

* JPEGs much larger than needed are decoded at a reduced DCT scale (PIL ``draft``),
  still at least ``resize`` px on the shorter side (``fast_decode=False`` turns it off);
* Resize + RandomResizedCrop run as one resampling of the crop box mapped back to the
  decoded image (one interpolation instead of two).
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from bioscan_jax.data import schema

RESIZE = 256
CROP = 224
#: Images are RGB: every view is float32 [H, W, CHANNELS].
CHANNELS = 3
ROTATION_DEGREES = 45.0
SCALE = (0.08, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)


def decode(data: bytes, *, min_side: int | None = None) -> Image.Image:
    """Decodes JPEG (or any PIL format) bytes to an RGB image.

    With ``min_side``, a large JPEG is decoded at a reduced scale whose shorter side is
    still at least ``min_side``. Raises ``ValueError`` for undecodable bytes.
    """
    try:
        img = Image.open(io.BytesIO(data))
        if min_side is not None and img.format == "JPEG":
            w, h = img.size
            scale = min(w, h) / min_side
            if scale >= 2:
                img.draft("RGB", (math.ceil(w / scale), math.ceil(h / scale)))
        return img.convert("RGB")
    except Exception as e:  # PIL raises several types
        raise ValueError(f"cannot decode image ({len(data)} bytes): {e}") from e


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision ``Resize(size)``: the shorter side becomes ``size``, aspect kept."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def random_resized_crop_box(
    width: int, height: int, rng: np.random.Generator, scale=SCALE, ratio=RATIO
) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params``: ``(left, top, w, h)`` of the crop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    # Fallback: central crop at the nearest allowed ratio.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def to_float(img: Image.Image | np.ndarray, *, normalize: bool = False) -> np.ndarray:
    """``float32`` HWC in ``[0, 1]``; with ``normalize``, ``(x - RGB_MEAN) / RGB_STD``."""
    x = np.asarray(img, dtype=np.float32) * np.float32(1.0 / 255.0)
    if normalize:
        x = (x - np.asarray(schema.RGB_MEAN, np.float32)) / np.asarray(schema.RGB_STD, np.float32)
    return x


def train_image(
    data: bytes,
    rng: np.random.Generator,
    *,
    resize: int = RESIZE,
    crop: int = CROP,
    rotation: float = ROTATION_DEGREES,
    hflip: bool = True,
    vflip: bool = True,
    normalize: bool = False,
    fast_decode: bool = True,
) -> np.ndarray:
    """Training view of one JPEG: ``float32 [crop, crop, 3]`` (recipe in the module docstring)."""
    img = decode(data, min_side=resize if fast_decode else None)
    width, height = img.size
    rw, rh = resized_size(width, height, resize)
    left, top, w, h = random_resized_crop_box(rw, rh, rng)
    sx, sy = width / rw, height / rh
    box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
    img = img.resize((crop, crop), Image.Resampling.BILINEAR, box=box)
    if hflip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if vflip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    if rotation:
        angle = float(rng.uniform(-rotation, rotation))
        img = img.rotate(angle, resample=Image.Resampling.NEAREST, fillcolor=(0, 0, 0))
    return to_float(img, normalize=normalize)


def eval_image(
    data: bytes,
    *,
    resize: int = RESIZE,
    crop: int = CROP,
    normalize: bool = False,
    fast_decode: bool = True,
) -> np.ndarray:
    """Evaluation view of one JPEG: Resize ``resize`` -> CenterCrop ``crop``, ``float32``."""
    img = decode(data, min_side=resize if fast_decode else None)
    rw, rh = resized_size(*img.size, resize)
    if (rw, rh) != img.size:
        img = img.resize((rw, rh), Image.Resampling.BILINEAR)
    top = int(round((rh - crop) / 2.0))
    left = int(round((rw - crop) / 2.0))
    img = img.crop((left, top, left + crop, top + crop))
    return to_float(img, normalize=normalize)
