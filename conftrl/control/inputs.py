"""A user's control image for `conftrl.generate`: used as given, or annotated first.

Which one is decided by the annotator recorded with the adapter (`annotate=auto`):

* an annotator that draws from the photo itself (Canny), or that estimates its map from the
  photo (depth/segmentation with an `estimator`), annotates the image, unless the image already
  is such a control: for Canny, an image holding only black and white pixels is an edge map;
* an annotator that draws from a map the dataset supplied (depth or segmentation without an
  estimator, precomputed controls) cannot make that map from a photo, so the image is taken
  as the control itself (a depth map, near = bright; a class map in the ADE20K palette).

`annotate=true` / `false` overrides the choice. Either way the image is resized and centre
cropped to the training resolution, as validation images are.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from conftrl.utils.images import to_tensor
from datamodules.annotators import Annotator, CannyAnnotator
from datamodules.decode import read_rgb
from datamodules.transforms import PairedTransform

ANNOTATE_CHOICES = ("auto", True, False)


def is_edge_map(image: np.ndarray) -> bool:
    """Gray pixels that are all black or white: a Canny control already, not a photo."""
    gray = (image == image[..., :1]).all()
    return bool(gray and np.isin(image[..., 0], (0, 255)).all())


def should_annotate(annotator: Annotator, image: np.ndarray) -> bool:
    """The `auto` rule of the module docstring."""
    if annotator.source_map is None:
        return not (isinstance(annotator, CannyAnnotator) and is_edge_map(image))
    return annotator.estimates


def control_from_file(path: str | Path, annotator: Annotator, resolution: int, annotate="auto") -> torch.Tensor:
    """The control tensor 1×3×R×R in [0, 1] for the image at `path`.

    Raises `datamodules.BadSampleError` naming the file when it is missing or unreadable, or
    when the annotator cannot annotate it."""
    return control_from_image(read_rgb(Path(path).expanduser()), str(path), annotator, resolution, annotate)


def control_from_image(
    image: np.ndarray, name: str, annotator: Annotator, resolution: int, annotate="auto"
) -> torch.Tensor:
    """The same for an RGB uint8 image H×W×3 already in memory; `name` identifies it in errors."""
    if annotate not in ANNOTATE_CHOICES:
        raise ValueError(f"annotate must be auto, true or false, got {annotate!r}")
    sample = {"image": image, "key": name}
    transform = PairedTransform(resolution, "center")
    if should_annotate(annotator, image) if annotate == "auto" else annotate:
        sample = transform(annotator.prepare(sample))
        control = annotator(sample["image"], sample)
    else:
        control = transform(sample)["image"]
    return to_tensor(control[None])
