"""The annotator contract: how a sample becomes its control image.

An annotator runs in two steps around the geometric transform:

``prepare(sample) -> sample``
    On the untransformed sample (full-resolution image, before crop). Annotators that draw
    from a per-pixel map (`source_map`: ``"depth"``, ``"labels"`` or ``"control"``) check
    here that the dataset supplied it, or compute it with their estimator. Expensive work
    belongs here, cached per file.
``__call__(image, sample, rng=None) -> control``
    On the transformed sample: `image` is uint8 H×W×3 RGB at training resolution; the
    result is uint8 H×W×3. `rng` is given for training samples only, for random
    augmentation (e.g. Canny thresholds); without it the result is deterministic.

Both raise `BadSampleError` for a sample they cannot annotate.
"""

from __future__ import annotations

import numpy as np

from datamodules.cache import AnnotationCache
from datamodules.errors import BadSampleError


class Annotator:
    source_map: str | None = None  # per-pixel map a dataset should supply, if any
    estimates = False  # True if the annotator can compute `source_map` itself

    def prepare(self, sample: dict) -> dict:
        return sample

    def __call__(self, image: np.ndarray, sample: dict, rng: np.random.Generator | None = None) -> np.ndarray:
        raise NotImplementedError


class MapAnnotator(Annotator):
    """Draws the control from a map that the dataset supplies or, failing that, an estimator computes.

    Estimator outputs are cached in `cache_dir` (if given) when the sample comes from a file
    (``path``) or from encoded bytes (``encoded``, a dataset row's image).
    """

    def __init__(self, estimator=None, cache_dir: str | None = None):
        self.estimator = estimator
        self.cache = AnnotationCache(cache_dir) if cache_dir is not None and estimator is not None else None

    @property
    def estimates(self) -> bool:
        return self.estimator is not None

    def prepare(self, sample: dict) -> dict:
        if self.source_map in sample:
            return sample
        if self.estimator is None:
            raise BadSampleError(sample["key"], f"no {self.source_map} map supplied and no estimator configured")

        def estimate() -> np.ndarray:
            return self.estimator(sample["image"])

        source = sample.get("path", sample.get("encoded"))  # a file, or a dataset row's image bytes
        if self.cache is not None and source is not None:
            estimated = self.cache.get_or_compute(source, self.estimator.cache_params, estimate)
        else:
            estimated = estimate()
        return sample | {self.source_map: estimated}
