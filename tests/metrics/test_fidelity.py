import math

import cv2
import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import binary_f1_score

from conftrl.metrics import (
    UNKNOWN,
    binary_f1,
    canny_edges,
    depth_from_labels,
    depth_order_accuracy,
    depth_rmse,
    edge_f1,
    edge_misses,
    iou_per_class,
    labels_from_palette,
    mean_iou,
)

PALETTE = np.array([[0, 0, 0], [220, 40, 40], [40, 200, 60], [50, 60, 230]], np.uint8)


def shapes_image(shift: int = 0, size: int = 64) -> np.ndarray:
    """Background, a red rectangle and a green disc (antialiased), like ShapesWorld."""
    image = np.zeros((size, size, 3), np.uint8)
    cv2.rectangle(image, (10 + shift, 12), (30 + shift, 40), PALETTE[1].tolist(), -1)
    cv2.circle(image, (44 + shift, 44), 12, PALETTE[2].tolist(), -1, lineType=cv2.LINE_AA)
    return image


def test_canny_edges_is_bool_and_sees_isoluminant_colour_edges():
    image = shapes_image()
    edges = canny_edges(image)
    assert edges.dtype == bool and edges.shape == image.shape[:2] and edges.any()
    # red | blue of (almost) equal luminance: invisible in grayscale, an edge in the image
    split = np.zeros((32, 32, 3), np.uint8)
    split[:, :16] = (150, 0, 0)
    split[:, 16:] = (0, 0, 255)
    gray = cv2.cvtColor(split, cv2.COLOR_RGB2GRAY)
    assert not (cv2.Canny(gray, 100, 200) > 0).any()
    assert canny_edges(split)[:, 15:17].any()
    with pytest.raises(TypeError):
        canny_edges(image.astype(np.float32))


def test_edge_f1_identical_and_shifted():
    image = shapes_image()
    reference = canny_edges(image)
    assert edge_f1(image, reference) == 1.0
    shifted = shapes_image(shift=1)
    strict, tolerant = edge_f1(shifted, reference), edge_f1(shifted, reference, tolerance_px=1)
    assert strict < 0.6 and tolerant > 0.95


def test_edge_misses_tells_offset_jitter_and_wrong_content_apart():
    true = canny_edges(shapes_image())
    assert edge_misses(true, true) == {
        "strict_f1": 1.0, "best_shift_f1": 1.0, "exact": 1.0, "within_1px": 0.0, "farther": 0.0
    }
    # A whole-image offset of 1 px: every pixel a near miss, and undoing the shift recovers F1 = 1.
    offset = edge_misses(canny_edges(shapes_image(shift=1)), true)
    assert offset["exact"] < 0.5 and offset["exact"] + offset["within_1px"] == pytest.approx(1.0)
    assert offset["farther"] == 0.0 and offset["best_shift_f1"] == 1.0
    assert offset["strict_f1"] == binary_f1(canny_edges(shapes_image(shift=1)), true)
    # An extra edge far from any true one: counted as farther, in proportion to its pixels.
    extra = true.copy()
    extra[2, 50:60] = True  # the shapes' edges lie below row 11
    misses = edge_misses(extra, true)
    assert misses["farther"] == pytest.approx(10 / extra.sum())
    assert misses["exact"] == pytest.approx(1 - 10 / extra.sum())
    assert edge_misses(np.zeros_like(true), true) == {
        "strict_f1": 0.0, "best_shift_f1": 0.0, "exact": 0.0, "within_1px": 0.0, "farther": 0.0
    }


def test_binary_f1_hand_computed_and_tolerance_definition():
    true = np.zeros((5, 5), bool)
    true[2, 1:4] = True  # 3 pixels
    pred = np.zeros((5, 5), bool)
    pred[2, 1] = pred[3, 4] = True  # one hit, one diagonal neighbour of true[2, 3]
    # strict: P = 1/2, R = 1/3 → F1 = 2/5
    assert binary_f1(pred, true) == pytest.approx(0.4)
    # 1 px (Chebyshev): both pred pixels are near true → P = 1; true[2,1], true[2,2]
    # (distance 1 from pred[2,1]) and true[2,3] (diagonal of pred[3,4]) are covered → R = 1
    assert binary_f1(pred, true, tolerance_px=1) == 1.0


def test_binary_f1_empty_maps():
    empty, one = np.zeros((4, 4), bool), np.eye(4, dtype=bool)
    assert binary_f1(empty, empty) == 1.0
    assert binary_f1(one, empty) == 0.0 and binary_f1(empty, one) == 0.0
    assert binary_f1(one, np.fliplr(one) & ~one) == 0.0  # disjoint, both non-empty
    flat = np.full((16, 16, 3), 128, np.uint8)  # no edges in the image nor in the control
    assert edge_f1(flat, np.zeros((16, 16), bool)) == 1.0


def test_iou_and_mean_iou_hand_computed():
    true = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 1, UNKNOWN], [2, 2, 0, 2]])
    # class 0: hits 3, true 4, pred 4 → 3/5; class 1: hits 3, true 4, pred 4 → 3/5;
    # class 2: hits 3, true 4, pred 3 → 3/4; class 3 absent from both → NaN, not in the mean
    iou = iou_per_class(pred, true, num_classes=4)
    np.testing.assert_allclose(iou[:3], [3 / 5, 3 / 5, 3 / 4])
    assert math.isnan(iou[3])
    assert mean_iou(pred, true, num_classes=4) == pytest.approx((3 / 5 + 3 / 5 + 3 / 4) / 3)
    assert mean_iou(true, true, num_classes=4) == 1.0


def test_mean_iou_ignore_index_and_pooling():
    true = np.array([[0, 255], [1, 1]], np.uint8)
    pred = np.array([[0, 1], [1, 0]])
    # the ignored pixel would otherwise be an error; class 0: 1/2, class 1: 1/2
    assert mean_iou(pred, true, num_classes=2, ignore_index=255) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        mean_iou(pred, true, num_classes=2)
    # a stack pools pixels (dataset-level), which differs from averaging per image
    a_true, a_pred = np.zeros((2, 2), int), np.zeros((2, 2), int)
    b_true, b_pred = np.ones((2, 2), int), np.array([[1, 0], [0, 0]])
    pooled = mean_iou(np.stack([a_pred, b_pred]), np.stack([a_true, b_true]), num_classes=2)
    assert pooled == pytest.approx((4 / 7 + 1 / 4) / 2)


def test_labels_from_palette_reads_antialiased_render():
    image = shapes_image()
    truth = np.zeros(image.shape[:2], np.uint8)
    cv2.rectangle(truth, (10, 12), (30, 40), 1, -1)
    cv2.circle(truth, (44, 44), 12, 2, -1)  # hard-edged: the disc's ideal label map
    nearest = labels_from_palette(image, PALETTE)
    assert nearest.shape == truth.shape and set(np.unique(nearest)) <= {0, 1, 2, 3}
    border = cv2.Canny(truth * 80, 1, 1) > 0
    border = cv2.dilate(border.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    np.testing.assert_array_equal(nearest[~border], truth[~border])  # interiors exact
    strict = labels_from_palette(image, PALETTE, max_distance=20)
    unknown = strict == UNKNOWN
    assert unknown.any() and not (unknown & ~border).any()  # only antialiased blends
    np.testing.assert_array_equal(strict[~unknown], nearest[~unknown])
    blends = image[unknown].astype(float)
    assert (np.linalg.norm(blends[:, None] - PALETTE[None], axis=-1).min(axis=1) > 20).all()


def test_depth_from_labels_and_rmse():
    labels = np.array([[0, 1], [2, UNKNOWN]])
    depth_per_label = np.array([10.0, 100.0, 200.0])
    depth = depth_from_labels(labels, depth_per_label)
    np.testing.assert_array_equal(depth[0], [10, 100])
    assert depth[1, 0] == 200 and math.isnan(depth[1, 1])
    assert depth_from_labels(labels, depth_per_label, unknown=0.0)[1, 1] == 0.0
    pred = np.array([[0, 10], [250, 255]], np.uint8)
    true = np.array([[3, 14], [255, 255]], np.uint8)  # uint8 must not wrap: errors 3, 4, 5, 0
    assert depth_rmse(pred, true) == pytest.approx(math.sqrt((9 + 16 + 25 + 0) / 4))
    assert math.isnan(depth_rmse(depth, depth))


def test_depth_order_accuracy():
    true = np.random.default_rng(1).uniform(0, 255, (32, 32))
    assert depth_order_accuracy(np.sqrt(true), true) == 1.0  # any increasing map
    assert depth_order_accuracy(-true, true) == 0.0
    noisy = true + np.random.default_rng(2).normal(0, 30, true.shape)
    assert 0.6 < depth_order_accuracy(noisy, true) < 1.0
    assert math.isnan(depth_order_accuracy(true, np.ones_like(true)))


def reference_iou(pred: np.ndarray, true: np.ndarray, num_classes: int) -> np.ndarray:
    """The definition in float64, from a confusion matrix with an extra column for labels
    outside [0, num_classes) (the implementation before torchmetrics computed it)."""
    pred = np.where((pred >= 0) & (pred < num_classes), pred, num_classes).ravel()
    confusion = np.bincount(true.ravel() * (num_classes + 1) + pred, minlength=num_classes * (num_classes + 1))
    confusion = confusion.reshape(num_classes, num_classes + 1)
    hits = np.diag(confusion[:, :num_classes])
    union = confusion.sum(axis=1) + confusion[:, :num_classes].sum(axis=0) - hits
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, hits / union, np.nan)


@pytest.mark.parametrize("seed", range(20))
def test_iou_and_rmse_match_their_definitions_on_random_maps(seed):
    rng = np.random.default_rng(seed)
    num_classes, shape = int(rng.integers(1, 160)), tuple(rng.integers(1, 64, size=rng.integers(1, 4)))
    true, pred = rng.integers(0, num_classes, shape), rng.integers(UNKNOWN, num_classes + 3, shape)
    iou, expected = iou_per_class(pred, true, num_classes), reference_iou(pred, true, num_classes)
    assert iou.dtype == np.float64 and iou.shape == (num_classes,)
    np.testing.assert_array_equal(np.isnan(iou), np.isnan(expected))  # absent classes stay NaN
    np.testing.assert_allclose(iou, expected, rtol=0, atol=1e-7)  # torchmetrics divides in float32
    ignored = np.where(rng.random(shape) < 0.2, 255, true)
    keep = ignored != 255
    np.testing.assert_allclose(iou_per_class(pred, ignored, num_classes, 255),
                               reference_iou(pred[keep], true[keep], num_classes), rtol=0, atol=1e-7)
    depth_pred, depth_true = rng.uniform(0, 255, shape), rng.integers(0, 256, shape).astype(np.uint8)
    assert depth_rmse(depth_pred, depth_true) == pytest.approx(
        math.sqrt(np.mean((depth_pred - depth_true.astype(np.float64)) ** 2)), rel=1e-12
    )


@pytest.mark.parametrize("seed", range(10))
def test_strict_binary_f1_is_torchmetrics_f1(seed):
    """Tolerance 0 is the plain pixel F1, which torchmetrics computes (both maps empty: 1, as
    its zero_division=1 gives); the tolerant F1 has no library counterpart."""
    rng = np.random.default_rng(seed)
    pred, true = rng.random((48, 48)) < rng.uniform(0, 0.3), rng.random((48, 48)) < rng.uniform(0, 0.3)
    for p, t in [(pred, true), (pred, np.zeros_like(true)), (np.zeros_like(pred), np.zeros_like(true))]:
        expected = binary_f1_score(torch.from_numpy(p).int(), torch.from_numpy(t).int(), zero_division=1)
        assert binary_f1(p, t) == pytest.approx(float(expected), abs=1e-6)
