"""Control fidelity: does a generated image obey its control (edges, segmentation, depth)?

All functions take numpy arrays — images are ``H×W×3`` RGB ``uint8`` — and score one image.
Label maps are integer arrays; :data:`UNKNOWN` marks pixels whose class could not be read.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torchmetrics.functional import mean_squared_error
from torchmetrics.functional.classification import multiclass_jaccard_index

UNKNOWN = -1


def canny_edges(image: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """Canny edge map (``H×W`` bool) of an RGB ``uint8`` image, thresholds 100/200 by default.

    Canny runs on the 3-channel image itself, as ControlNet's annotator does (OpenCV then takes,
    per pixel, the channel with the strongest gradient). Converting to grayscale first is *not*
    equivalent: edges between colours of similar luminance vanish. Controls and evaluation must
    use this same function for the F1 to mean anything.
    """
    if image.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {image.dtype}")
    return cv2.Canny(np.ascontiguousarray(image), low, high) > 0


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels within Chebyshev distance ``radius`` of a True pixel (square window)."""
    if radius == 0:
        return mask
    kernel = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
    return cv2.dilate(mask.astype(np.uint8), kernel) > 0


def binary_f1(pred: np.ndarray, true: np.ndarray, tolerance_px: int = 0) -> float:
    """F1 between two bool maps, a predicted pixel counting as correct within ``tolerance_px``.

    precision = fraction of ``pred`` pixels with a ``true`` pixel within ``tolerance_px``
    (Chebyshev distance: the ``(2k+1)²`` square, so 1 px includes diagonal neighbours);
    recall = fraction of ``true`` pixels with a ``pred`` pixel within ``tolerance_px``;
    F1 = 2PR / (P + R). With ``tolerance_px=0`` this is the plain pixel-wise F1
    ``2|pred ∧ true| / (|pred| + |true|)``. Both maps empty → 1.0 (nothing to draw, nothing
    drawn); exactly one empty → 0.0. Written here rather than taken from torchmetrics, whose
    F1 is this one's ``tolerance_px=0`` case: no metrics library has the tolerance.
    """
    pred, true = pred.astype(bool), true.astype(bool)
    n_pred, n_true = pred.sum(), true.sum()
    if n_pred == 0 or n_true == 0:
        return float(n_pred == n_true)
    precision = (pred & _dilate(true, tolerance_px)).sum() / n_pred
    recall = (true & _dilate(pred, tolerance_px)).sum() / n_true
    if precision + recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))


def edge_f1(
    generated: np.ndarray,
    reference_edges: np.ndarray,
    tolerance_px: int = 0,
    low: int = 100,
    high: int = 200,
) -> float:
    """Edge fidelity of one generated RGB image to its control's edge map (bool ``H×W``):
    :func:`binary_f1` of :func:`canny_edges` of the image against ``reference_edges``. The
    project reports ``tolerance_px=0`` (strict, the OFT/ControlNet++ protocol) and 1."""
    return binary_f1(canny_edges(generated, low, high), reference_edges, tolerance_px)


def edge_misses(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Where the predicted edge pixels lie relative to the true edges, and how shifting the
    whole map would change the strict F1: tells jitter, offset and wrong content apart.

    ``exact``, ``within_1px`` and ``farther`` are fractions of the predicted pixels at
    Chebyshev distance 0, 1 and more from a true pixel (they sum to 1; all 0 without
    predicted pixels). ``strict_f1`` is :func:`binary_f1` of the maps as they are;
    ``best_shift_f1`` that of ``pred`` rolled by the one shift in ``[-2, 2]²`` that maximises
    it: far above ``strict_f1``, the prediction is offset; equal to it, the misses are not a
    shift.
    """
    pred, true = pred.astype(bool), true.astype(bool)
    count = pred.sum()
    exact, near = (pred & true).sum(), (pred & _dilate(true, 1)).sum()
    shifted = {
        (dy, dx): binary_f1(np.roll(pred, (dy, dx), axis=(0, 1)), true) for dy in range(-2, 3) for dx in range(-2, 3)
    }
    f1 = {"strict_f1": shifted[(0, 0)], "best_shift_f1": max(shifted.values())}
    if count == 0:
        return {**f1, "exact": 0.0, "within_1px": 0.0, "farther": 0.0}
    return {
        **f1,
        "exact": float(exact / count),
        "within_1px": float((near - exact) / count),
        "farther": float((count - near) / count),
    }


def iou_per_class(
    pred: np.ndarray, true: np.ndarray, num_classes: int, ignore_index: int | None = None
) -> np.ndarray:
    """IoU of each class ``0..num_classes-1``, NaN for classes absent from both maps.

    Pixels whose true label is ``ignore_index`` are left out. Predicted labels outside
    ``[0, num_classes)`` (e.g. :data:`UNKNOWN`) are wrong for the true class and count towards
    no class. Maps of any shape; passing a stack of images pools pixels over it (the
    dataset-level mIoU of ADE20K-style benchmarks), passing one image gives a per-image score.
    torchmetrics' Jaccard index counts, with one extra class for the labels outside the range.
    """
    pred, true = np.ravel(pred).astype(np.int64), np.ravel(true).astype(np.int64)
    if ignore_index is not None:
        keep = true != ignore_index
        pred, true = pred[keep], true[keep]
    if true.size and (true.min() < 0 or true.max() >= num_classes):
        raise ValueError(f"true labels must lie in [0, {num_classes}) or be ignore_index")
    pred = np.where((pred >= 0) & (pred < num_classes), pred, num_classes)  # extra 'no class'
    iou = multiclass_jaccard_index(
        torch.from_numpy(pred), torch.from_numpy(true), num_classes + 1, average="none",
        validate_args=False, zero_division=float("nan"),
    )
    return iou[:num_classes].double().numpy()


def mean_iou(
    pred: np.ndarray, true: np.ndarray, num_classes: int, ignore_index: int | None = None
) -> float:
    """Mean of :func:`iou_per_class` over the classes present in ``pred`` or ``true``; a class
    absent from both says nothing about fidelity and would otherwise count as 0 or 1."""
    return float(np.nanmean(iou_per_class(pred, true, num_classes, ignore_index)))


def labels_from_palette(
    image: np.ndarray, palette: np.ndarray, max_distance: float | None = None
) -> np.ndarray:
    """Read a label map back from an image painted in a known palette.

    Each pixel gets the index of the nearest palette colour (Euclidean in RGB), or
    :data:`UNKNOWN` when that colour is farther than ``max_distance``. Antialiased borders are
    blends of two colours: a ``max_distance`` below half the smallest distance between palette
    colours marks them unknown instead of guessing. Which colour means which class is the
    caller's business (the palette order defines the labels).
    """
    palette = np.asarray(palette, dtype=np.float32)
    pixels = image.reshape(-1, 1, 3).astype(np.float32)
    dist = np.linalg.norm(pixels - palette[None], axis=-1)  # (H·W, K)
    labels = dist.argmin(axis=1)
    if max_distance is not None:
        labels = np.where(dist.min(axis=1) <= max_distance, labels, UNKNOWN)
    return labels.reshape(image.shape[:-1])


def depth_from_labels(
    labels: np.ndarray, depth_per_label: np.ndarray, unknown: float = np.nan
) -> np.ndarray:
    """Depth map from a label map and each label's known depth.

    On the synthetic world every object has a known depth, so the depth a generated image shows
    is read off its colours (:func:`labels_from_palette`) rather than estimated by a network.
    Labels outside ``depth_per_label`` (:data:`UNKNOWN`) get ``unknown``: NaN (default) makes
    :func:`depth_rmse` NaN, so pass a real depth (e.g. the background's) to penalise them.
    """
    depth_per_label = np.asarray(depth_per_label, dtype=np.float64)
    labels = np.asarray(labels)
    valid = (labels >= 0) & (labels < len(depth_per_label))
    return np.where(valid, depth_per_label[np.where(valid, labels, 0)], unknown)


def depth_rmse(pred: np.ndarray, true: np.ndarray) -> float:
    """Root-mean-square error between two depth maps on the 0–255 scale (ControlNet++
    protocol), computed in float64 so ``uint8`` inputs do not wrap around."""
    pred, true = (torch.as_tensor(np.asarray(x, dtype=np.float64)) for x in (pred, true))
    return float(mean_squared_error(pred, true, squared=False))


def depth_order_accuracy(
    pred: np.ndarray, true: np.ndarray, num_pairs: int = 10_000, seed: int = 0
) -> float:
    """Fraction of random pixel pairs whose depth order in ``pred`` matches ``true``.

    Invariant to any increasing rescaling of ``pred``, so it still means something when the
    depth reader's scale is not calibrated to the control's (where RMSE does not). Pairs with
    equal true depth are not sampled as evidence; ties in ``pred`` count as wrong. The pairs
    are drawn from a seeded generator so scores are reproducible.
    """
    pred, true = np.ravel(pred).astype(np.float64), np.ravel(true).astype(np.float64)
    i, j = np.random.default_rng(seed).integers(0, true.size, size=(2, num_pairs))
    order = np.sign(true[i] - true[j])
    informative = order != 0
    if not informative.any():
        return float("nan")
    return float(np.mean(np.sign(pred[i] - pred[j])[informative] == order[informative]))
