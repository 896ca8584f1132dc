"""Test helpers: photograph-like images made without downloaded data, and an edge check."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def make_photo(height: int = 96, width: int = 128, seed: int = 0) -> np.ndarray:
    """A natural-looking uint8 RGB image: lit gradient, blurred objects, sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    sky = np.stack([90 + 60 * y / height, 130 + 50 * y / height, 200 - 40 * x / width], axis=-1)
    image = sky.astype(np.float32)
    for _ in range(6):
        color = rng.uniform(20, 235, 3).tolist()
        center = (int(rng.integers(width)), int(rng.integers(height)))
        axes = (int(rng.integers(2, max(3, width // 3))), int(rng.integers(2, max(3, height // 3))))
        cv2.ellipse(image, center, axes, float(rng.uniform(0, 180)), 0, 360, color, cv2.FILLED, cv2.LINE_AA)
    image = cv2.GaussianBlur(image, (3, 3), 0.8) + rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_rgb(path: Path, image: np.ndarray) -> Path:
    """Write an RGB (or single-channel) array; the format follows the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.ascontiguousarray(image[..., ::-1]) if image.ndim == 3 else image)
    return path


def edge_alignment(edges: np.ndarray, labels: np.ndarray, tolerance: float = 2.0) -> tuple[float, float]:
    """(precision, recall) of edge pixels against class-map boundaries, within `tolerance` px."""
    boundary = cv2.morphologyEx(labels.astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
    to_boundary = cv2.distanceTransform((~boundary).astype(np.uint8), cv2.DIST_L2, 3)
    to_edge = cv2.distanceTransform((edges == 0).astype(np.uint8), cv2.DIST_L2, 3)
    precision = (to_boundary[edges > 0] <= tolerance).mean()
    recall = (to_edge[boundary] <= tolerance).mean()
    return float(precision), float(recall)

