"""Depth as control: near = bright, three identical channels (ControlNet's depth hints)."""

from __future__ import annotations

import cv2
import numpy as np

from datamodules.annotators.base import MapAnnotator


class DepthAnnotator(MapAnnotator):
    """Control from the sample's ``depth`` map (float [0, 1], near = 1).

    The map comes from the dataset (ShapesWorld's exact depth, depth files beside folder
    images) or, where a sample has none, from `estimator` — any callable image → depth in
    [0, 1] with a `cache_params` dict, e.g. `DnnDepthEstimator` or `TransformersDepthEstimator`.
    """

    source_map = "depth"

    def __call__(self, image: np.ndarray, sample: dict, rng: np.random.Generator | None = None) -> np.ndarray:
        depth = np.clip(sample["depth"], 0.0, 1.0)
        return cv2.cvtColor(np.round(depth * 255).astype(np.uint8), cv2.COLOR_GRAY2RGB)
