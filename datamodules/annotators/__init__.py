"""Annotators turn a sample into its control image; see `base` for the contract.

==========================  ==========================================  ============
class                       control                                     reads
==========================  ==========================================  ============
`CannyAnnotator`            Canny edges, white on black                 image
`DepthAnnotator`            depth, near = bright, gray                  ``depth``
`SegmentationAnnotator`     class map in ADE20K palette colours         ``labels``
`PrecomputedControl`        the dataset's own control image             ``control``
==========================  ==========================================  ============

Depth and segmentation take an optional estimator (`DnnDepthEstimator`,
`TransformersDepthEstimator`, `TransformersSegmentationEstimator`) for samples whose dataset
supplies no map, and cache its outputs on disk.
"""

from datamodules.annotators.ade20k import ADE20K_PALETTE
from datamodules.annotators.base import Annotator, MapAnnotator
from datamodules.annotators.canny import CannyAnnotator
from datamodules.annotators.depth import DepthAnnotator
from datamodules.annotators.estimators import (
    DnnDepthEstimator,
    TransformersDepthEstimator,
    TransformersSegmentationEstimator,
)
from datamodules.annotators.precomputed import PrecomputedControl
from datamodules.annotators.segmentation import SegmentationAnnotator

__all__ = [
    "ADE20K_PALETTE",
    "Annotator",
    "CannyAnnotator",
    "DepthAnnotator",
    "DnnDepthEstimator",
    "MapAnnotator",
    "PrecomputedControl",
    "SegmentationAnnotator",
    "TransformersDepthEstimator",
    "TransformersSegmentationEstimator",
]
