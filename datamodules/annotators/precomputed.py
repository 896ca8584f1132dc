"""Control images that come with the dataset (Fill50K's ``source``, imagefolder's ``conditioning_image``)."""

from __future__ import annotations

import numpy as np

from datamodules.annotators.base import MapAnnotator


class PrecomputedControl(MapAnnotator):
    """Uses the sample's own ``control`` image, resized and cropped together with the image."""

    source_map = "control"

    def __init__(self):
        super().__init__(estimator=None)

    def __call__(self, image: np.ndarray, sample: dict, rng: np.random.Generator | None = None) -> np.ndarray:
        return sample["control"]
