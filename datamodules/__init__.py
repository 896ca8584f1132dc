"""Datamodules that turn images and captions into conftrl training batches.

Public API (stable names):

* `ShapesWorldDataModule`, `FolderDataModule`, `HFDataModule` (Hugging Face `datasets`) —
  LightningDataModules; each subclasses
  `ControlDataModule` and takes an ``annotator`` plus ``resolution``, ``batch_size``,
  ``num_workers``, ``seed``, ``proportion_empty_prompts`` and ``on_bad_sample``.
* `datamodules.annotators` — Canny, depth, segmentation and precomputed controls.
* `datamodules.shapesworld` — the synthetic world and its vocabulary (`COLORS`,
  `SHAPE_COLORS`, `BACKGROUND_COLORS`, `SHAPES`, `CLASS_NAMES`, `VOCABULARY`).
* `BadSampleError` — the one error bad input raises.

A batch is a dict:

=============  ==========================  =====================================================
key            type                        meaning
=============  ==========================  =====================================================
image          float32 B×3×H×W in [-1, 1]  the RGB training image
control        float32 B×3×H×W in [0, 1]   the control image (RGB)
caption        list[str]                   caption, "" when dropped for classifier-free guidance
key            list[str]                   sample identity: path relative to the data folder,
                                           or ``shapesworld/<split>/<index>``
original_size  int64 B×2                   (height, width) of the image before resizing
crop_top_left  int64 B×2                   (top, left) of the crop in the resized image (of the
                                           mirrored one when flipped); SDXL is conditioned on both
depth          float32 B×1×H×W in [0, 1]   near = 1; ShapesWorld always, folders when the
                                           control is depth
labels         int64 B×H×W                 class map; ShapesWorld always (`CLASS_NAMES`),
                                           folders when the control is segmentation
scene          list[dict]                  ShapesWorld only: JSON-able scene description
                                           (`datamodules.shapesworld.Scene.to_json`)
=============  ==========================  =====================================================
"""

from datamodules.datamodule import ControlDataModule, FolderDataModule, HFDataModule, ShapesWorldDataModule
from datamodules.errors import BadSampleError, EmptySplitError

__all__ = [
    "BadSampleError", "ControlDataModule", "EmptySplitError", "FolderDataModule", "HFDataModule", "ShapesWorldDataModule",
]
