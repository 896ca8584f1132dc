"""Geometric transforms applied identically to an image and every map aligned with it.

A sample is a dict; its pixel arrays are ``image`` (uint8 H×W×3), and optionally
``control`` (uint8 H×W×3), ``depth`` (float32 H×W) and ``labels`` (int64 H×W). The
transform resizes the shorter side to the training resolution (upscaling images smaller
than the crop), crops a square (centre or random) and optionally flips horizontally. Class
maps are resampled nearest-neighbour so no invented class appears at a boundary. It also
reports what it did: ``original_size`` (height, width before resizing) and ``crop_top_left``
(top, left of the crop in the resized image).
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np

from datamodules.errors import BadSampleError

PIXEL_KEYS = ("image", "control", "depth", "labels")
CROPS = ("center", "random")


class PairedTransform:
    """Resize → square crop → optional horizontal flip, the same geometry for every map.

    Randomness comes only from the `rng` passed per call, so the dataset decides how a
    sample's augmentation is seeded.
    """

    def __init__(self, resolution: int, crop: Literal[CROPS] = "center", flip_probability: float = 0.0):
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")
        if not 0.0 <= flip_probability <= 1.0:
            raise ValueError(f"flip_probability must be in [0, 1], got {flip_probability}")
        self.resolution, self.crop, self.flip_probability = int(resolution), crop, float(flip_probability)

    def __call__(self, sample: dict, rng: np.random.Generator | None = None) -> dict:
        height, width = sample["image"].shape[:2]
        scale = self.resolution / min(height, width)
        size = (max(self.resolution, round(width * scale)), max(self.resolution, round(height * scale)))
        top, left = self._crop_origin(size[1], size[0], rng)
        flip = rng is not None and rng.random() < self.flip_probability
        out = dict(sample)
        for key in PIXEL_KEYS:
            if key in sample:
                array = _resize(sample[key], size, nearest=key == "labels")
                array = array[top : top + self.resolution, left : left + self.resolution]
                out[key] = np.ascontiguousarray(array[:, ::-1] if flip else array)
        # What was done, in the image's own frame: flipped, the crop's left edge is that of the
        # mirrored resized image. SDXL is conditioned on these.
        out["original_size"] = (height, width)
        out["crop_top_left"] = (top, size[0] - self.resolution - left if flip else left)
        return out

    def _crop_origin(self, height: int, width: int, rng: np.random.Generator | None) -> tuple[int, int]:
        spare_y, spare_x = height - self.resolution, width - self.resolution
        if self.crop == "random" and rng is not None:
            return int(rng.integers(spare_y + 1)), int(rng.integers(spare_x + 1))
        return spare_y // 2, spare_x // 2


def _resize(array: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    if array.shape[1::-1] == size:
        return array
    if nearest:
        # cv2 cannot resize int64; class indices fit in int32.
        return cv2.resize(array.astype(np.int32), size, interpolation=cv2.INTER_NEAREST).astype(array.dtype)
    shrinking = size[0] < array.shape[1]
    return cv2.resize(array, size, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def fit_to_image(array: np.ndarray, image_shape: tuple[int, ...], nearest: bool, where: object) -> np.ndarray:
    """Resize a map whose size differs from its image's, if only the scale differs.

    A map with another aspect ratio (more than 1 % off) does not correspond pixel for pixel
    to its image, so it raises `BadSampleError` instead of being stretched.
    """
    height, width = image_shape[:2]
    if array.shape[:2] == (height, width):
        return array
    map_height, map_width = array.shape[:2]
    if abs(map_width / map_height - width / height) > 0.01 * (width / height):
        raise BadSampleError(where, f"map of size {map_width}×{map_height} does not match image {width}×{height}")
    return _resize(array, (width, height), nearest)
