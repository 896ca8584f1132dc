"""Monocular estimators loaded from a local path (never downloaded).

Each estimator is a callable ``image (uint8 H×W×3 RGB) -> map (H×W)`` with a
`cache_params` dict that identifies its model file(s) and settings for `AnnotationCache`.
Depth estimators return float32 in [0, 1] with near = 1; the segmentation estimator returns
int64 class indices in the model's label order.

Models load on first use, and a pickled estimator leaves its model behind, so each
dataloader worker loads its own copy instead of receiving a large (or, for `cv2.dnn`,
unpicklable) object.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from datamodules.decode import normalize_depth


class _LocalModel:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"estimator model not found at {self.path} (models are never downloaded)")
        self._model = None

    @property
    def model(self):
        if self._model is None:
            self._model = self._load()
        return self._model

    def _load(self):
        raise NotImplementedError

    def _settings(self) -> dict:
        return {}

    @property
    def cache_params(self) -> dict:
        files = sorted(self.path.rglob("*")) if self.path.is_dir() else [self.path]
        model = [
            [str(f.relative_to(self.path.parent)), f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()
        ]
        return {"estimator": type(self).__name__, "model": model, **self._settings()}

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_model": None}


class DnnDepthEstimator(_LocalModel):
    """A depth network in any format `cv2.dnn.readNet` reads (ONNX, TFLite, ...).

    The input is the RGB image resized to `input_size` (width, height), scaled to [0, 1] and
    normalised per channel with `mean` and `std` (as transformers image processors do); the
    output's last two axes are the depth map, resized back to the image. `near_is_larger` is
    True for MiDaS-style inverse depth, False for metric depth.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        input_size: tuple[int, int] = (384, 384),
        mean: tuple[float, float, float] = (0.0, 0.0, 0.0),
        std: tuple[float, float, float] = (1.0, 1.0, 1.0),
        near_is_larger: bool = True,
    ):
        super().__init__(path)
        self.input_size = tuple(int(s) for s in input_size)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.near_is_larger = near_is_larger

    def _load(self):
        return cv2.dnn.readNet(str(self.path))

    def _settings(self) -> dict:
        return {
            "input_size": self.input_size,
            "mean": self.mean,
            "std": self.std,
            "near_is_larger": self.near_is_larger,
        }

    def __call__(self, image: np.ndarray) -> np.ndarray:
        params = cv2.dnn.Image2BlobParams()
        params.size = self.input_size
        params.mean = (*(255 * m for m in self.mean), 0)
        params.scalefactor = (*(1 / (255 * s) for s in self.std), 0)
        blob = cv2.dnn.blobFromImageWithParams(image, params)
        self.model.setInput(blob)
        output = self.model.forward()
        depth = output.reshape(output.shape[-2:]).astype(np.float32)
        depth = cv2.resize(depth, image.shape[1::-1], interpolation=cv2.INTER_CUBIC)
        return normalize_depth(depth, self.near_is_larger)


class _TransformersModel(_LocalModel):
    """A transformers model folder and its image processor, run without gradients."""

    auto_class = ""  # name of the transformers Auto* model class

    def __init__(self, path: str | os.PathLike, device: str = "cpu"):
        super().__init__(path)
        self.device = device

    def _load(self):
        import transformers

        processor = transformers.AutoImageProcessor.from_pretrained(self.path, local_files_only=True)
        model = getattr(transformers, self.auto_class).from_pretrained(self.path, local_files_only=True)
        return processor, model.eval().to(self.device)

    def _predict(self, image: np.ndarray):
        import torch

        processor, model = self.model
        inputs = processor(images=image, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            return processor, model(**inputs)


class TransformersDepthEstimator(_TransformersModel):
    """`AutoModelForDepthEstimation` (DPT, Depth Anything, ...) from a local folder."""

    auto_class = "AutoModelForDepthEstimation"

    def __init__(self, path: str | os.PathLike, device: str = "cpu", near_is_larger: bool = True):
        super().__init__(path, device)
        self.near_is_larger = near_is_larger

    def _settings(self) -> dict:
        return {"near_is_larger": self.near_is_larger}

    def __call__(self, image: np.ndarray) -> np.ndarray:
        processor, outputs = self._predict(image)
        depth = processor.post_process_depth_estimation(outputs, target_sizes=[image.shape[:2]])[0]["predicted_depth"]
        return normalize_depth(depth.float().cpu().numpy(), self.near_is_larger)


class TransformersSegmentationEstimator(_TransformersModel):
    """`AutoModelForSemanticSegmentation` (SegFormer, UperNet, ...) from a local folder."""

    auto_class = "AutoModelForSemanticSegmentation"

    def __call__(self, image: np.ndarray) -> np.ndarray:
        processor, outputs = self._predict(image)
        labels = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.shape[:2]])[0]
        return labels.cpu().numpy().astype(np.int64)
