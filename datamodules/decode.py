"""Read image files into the arrays the pipeline uses, converting what can be converted.

Pillow decodes (it raises on truncated files, where OpenCV's JPEG reader pads the missing
part with gray and returns it as if nothing happened). Every failure becomes a
`BadSampleError` naming the file.

Conversions applied to images (`read_rgb`, result uint8 H×W×3 RGB):
  * EXIF orientation is applied;
  * grayscale (``1``, ``L``), CMYK, YCbCr and palette images become RGB;
  * images with alpha (``LA``, ``RGBA``, palette with transparency) are composited on white;
  * 16-bit images are scaled to 8 bits (65535 → 255);
  * float images (``F``) are refused: their range is unknown.

Maps (`read_depth`, `read_labels`) are single-channel PNG/TIFF (8 or 16 bit) or ``.npy``
arrays (read with ``allow_pickle=False``).
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from datamodules.errors import BadSampleError

_DECODE_ERRORS = (OSError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError, ValueError)
_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


def probe_image(path: Path) -> tuple[int, int]:
    """(width, height) from the file header only; cheap enough to run over a dataset at setup."""
    try:
        with Image.open(path) as image:
            return image.size
    except _DECODE_ERRORS as err:
        raise BadSampleError(path, f"not a readable image ({err})") from err


def read_rgb(path: Path | BinaryIO, where: object = None) -> np.ndarray:
    """The image at `path` (a file name or an open binary file, such as a dataset row's bytes)
    as uint8 H×W×3 RGB, converted as the module docstring lists. Errors name `where`, by
    default the path."""
    where = path if where is None else where
    image = _load(path, where)
    image = ImageOps.exif_transpose(image)
    if image.mode == "F":
        raise BadSampleError(where, "float-valued images are not supported (unknown range)")
    if image.mode in _SIXTEEN_BIT_MODES:
        gray = _to_uint8(np.asarray(image), where)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in {"LA", "PA", "RGBA", "La", "RGBa"}:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return np.array(image.convert("RGB"))  # a writable copy, as torch.from_numpy expects


def read_depth(path: Path) -> np.ndarray:
    """A depth map file as float32 H×W in [0, 1], near = 1 (see `normalize_depth`)."""
    return normalize_depth(_read_map(path).astype(np.float32))


def read_labels(path: Path) -> np.ndarray:
    """A class-index map file as int64 H×W; palette PNGs give their indices, not colours."""
    labels = _read_map(path)
    if not np.issubdtype(labels.dtype, np.integer):
        raise BadSampleError(path, f"label map must hold integers, found {labels.dtype}")
    return labels.astype(np.int64)


def normalize_depth(depth: np.ndarray, near_is_larger: bool = True) -> np.ndarray:
    """Min-max normalise a relative depth map per image to [0, 1] with near = 1.

    This is ControlNet's depth-hint convention (MiDaS inverse depth, scaled per image).
    `near_is_larger=False` is for metric depth, where larger means farther. A constant map
    carries no depth information and becomes all zeros.
    """
    depth = np.asarray(depth, dtype=np.float32)
    if not np.isfinite(depth).all():
        raise ValueError("depth map contains NaN or infinite values")
    low, high = float(depth.min()), float(depth.max())
    if high <= low:
        return np.zeros_like(depth)
    scaled = (depth - low) / (high - low)
    return scaled if near_is_larger else 1.0 - scaled


def _load(path: Path | BinaryIO, where: object = None) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()  # decode now, so truncation is reported here and names the file
    except _DECODE_ERRORS as err:
        raise BadSampleError(path if where is None else where, f"cannot decode image ({err})") from err
    return image


def _read_map(path: Path) -> np.ndarray:
    path = Path(path)
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise BadSampleError(path, f"cannot read .npy map ({err})") from err
    else:
        array = np.asarray(_load(path))
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise BadSampleError(path, f"map must be single-channel H×W, found shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise BadSampleError(path, "map contains NaN or infinite values")
    return array


def _to_uint8(sixteen_bit: np.ndarray, path: Path) -> np.ndarray:
    if sixteen_bit.min() < 0 or sixteen_bit.max() > 65535:
        raise BadSampleError(path, "32-bit integer image outside the 16-bit range")
    return np.round(sixteen_bit.astype(np.float32) / 257.0).astype(np.uint8)
