"""benchmarks/edge_errors.py scores samples against their controls the way the callback does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftrl.metrics import canny_edges
from datamodules.shapesworld import ShapesWorld


@pytest.fixture(scope="module")
def scenes() -> tuple[np.ndarray, dict]:
    """Four ShapesWorld images and a batch whose control is their Canny edge map."""
    world = ShapesWorld("val", length=4, resolution=64, seed=3)
    images = np.stack([world[i]["image"] for i in range(4)])
    edges = torch.from_numpy(np.stack([canny_edges(image) for image in images])).float()
    return images, {"control": edges[:, None].repeat(1, 3, 1, 1)}


def test_the_real_images_are_exact_and_a_shifted_copy_only_near(edge_errors, scenes):
    images, batch = scenes
    exact = edge_errors.edge_error_scores(images, batch)
    assert exact == {"strict_f1": 1.0, "best_shift_f1": 1.0, "exact": 1.0, "within_1px": 0.0, "farther": 0.0}
    shifted = edge_errors.edge_error_scores(np.roll(images, 1, axis=2), batch)
    assert shifted["strict_f1"] < 0.7 and shifted["best_shift_f1"] > 0.95
    assert shifted["farther"] < 0.05  # the wrapped-around column is the only far edge
