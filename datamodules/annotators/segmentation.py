"""Segmentation as control: class maps coloured with the ADE20K palette (ControlNet's seg hints)."""

from __future__ import annotations

import numpy as np

from datamodules.annotators.ade20k import ADE20K_PALETTE
from datamodules.annotators.base import MapAnnotator

# Row i colours class i; the extra last row (black) colours every index outside 0..149.
_LOOKUP = np.array([*ADE20K_PALETTE, (0, 0, 0)], dtype=np.uint8)


class SegmentationAnnotator(MapAnnotator):
    """Control from the sample's ``labels`` class map, class i → ``ADE20K_PALETTE[i]``.

    Class indices follow the 150-class ADE20K order (0 = wall), as an ADE20K segmenter
    outputs them; other datasets' classes simply take the colours of the same indices
    (ShapesWorld: background 0 and shapes 1..4). Indices outside 0..149, such as the
    common ignore value 255, are drawn black. The map comes from the dataset or, where a
    sample has none, from `estimator` (e.g. `TransformersSegmentationEstimator`).
    """

    source_map = "labels"

    def __call__(self, image: np.ndarray, sample: dict, rng: np.random.Generator | None = None) -> np.ndarray:
        labels = sample["labels"]
        in_palette = (labels >= 0) & (labels < len(ADE20K_PALETTE))
        return _LOOKUP[np.where(in_palette, labels, len(ADE20K_PALETTE))]
