"""Canny edges as control, as ControlNet's canny model was trained on."""

from __future__ import annotations

import cv2
import numpy as np

from datamodules.annotators.base import Annotator


class CannyAnnotator(Annotator):
    """`cv2.Canny` of the RGB image (OpenCV takes the strongest channel gradient), white on black.

    With `random_thresholds`, training samples draw both thresholds from `threshold_range`
    (seeded per sample by the dataset), so the model sees sparse and dense edge maps alike;
    evaluation samples always use `low_threshold`/`high_threshold` (ControlNet's 100/200).
    """

    def __init__(
        self,
        low_threshold: int = 100,
        high_threshold: int = 200,
        random_thresholds: bool = False,
        threshold_range: tuple[int, int] = (50, 250),
    ):
        if not 0 <= low_threshold <= high_threshold:
            raise ValueError(f"need 0 <= low_threshold <= high_threshold, got {low_threshold}, {high_threshold}")
        if not 0 <= threshold_range[0] < threshold_range[1]:
            raise ValueError(f"threshold_range must be increasing, got {threshold_range}")
        self.low_threshold, self.high_threshold = low_threshold, high_threshold
        self.random_thresholds = random_thresholds
        self.threshold_range = tuple(threshold_range)

    def thresholds(self, rng: np.random.Generator | None) -> tuple[int, int]:
        if not (self.random_thresholds and rng is not None):
            return self.low_threshold, self.high_threshold
        low, high = sorted(int(t) for t in rng.integers(self.threshold_range[0], self.threshold_range[1] + 1, 2))
        return low, max(high, low + 1)

    def __call__(self, image: np.ndarray, sample: dict, rng: np.random.Generator | None = None) -> np.ndarray:
        edges = cv2.Canny(image, *self.thresholds(rng))
        return cv2.cvtColor(edges, cv2.COLOR_GRAY2RGB)
