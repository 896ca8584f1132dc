"""Segmentation and depth fidelity on an image folder: read off the samples by the annotator's
estimator in validation and `conftrl.evaluate`; skipped with one warning where there is none."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
import torch
from support.training_runs import FAST, compose_config
from hydra.utils import instantiate
from support.estimators import save_brightness_onnx, save_transformers_estimators

from conftrl.cli.evaluate import evaluate
from conftrl.cli.train import train
from conftrl.evaluation.measure import fidelity_ceiling, first_items
from conftrl.evaluation.scorers import FidelityUnavailable, estimator_of, fidelity_scorer
from conftrl.metrics import labels_from_palette
from conftrl.training.loggers import logged_metrics
from datamodules.annotators import ADE20K_PALETTE

FOLDER_FAST = [o for o in FAST if not o.startswith("data.num_")] + ["data.num_workers=0", "data.val_fraction=0.5"]


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """Eight 32 px photos of discs with captions, each with a class map and a depth file."""
    root = tmp_path_factory.mktemp("photos")
    for i in range(8):
        image = np.full((32, 32, 3), 40 + 20 * i, np.uint8)
        cv2.circle(image, (8 + 2 * i, 16), 6, (250, 250, 250), -1)
        cv2.imwrite(str(root / f"{i}.png"), image)
        cv2.imwrite(str(root / f"{i}.labels.png"), (image[..., 0] > 200).astype(np.uint8))
        cv2.imwrite(str(root / f"{i}.depth.png"), image[..., 0])
        (root / f"{i}.txt").write_text(f"a white disc number {i}")
    return root


@pytest.fixture(scope="module")
def estimators(tmp_path_factory):
    pytest.importorskip("onnx")
    root = save_transformers_estimators(tmp_path_factory.mktemp("transformers"))
    save_brightness_onnx(root / "depth.onnx")
    return root


def _folder_config(tiny_base, photo_folder, output_dir, *overrides):
    folder = [f"model.path={tiny_base}", *FOLDER_FAST, "data=folder", f"data.root={photo_folder}"]
    return compose_config("train", [*folder, *overrides], output_dir)


def _train_and_evaluate(tiny_base, photo_folder, tmp_path, *overrides):
    run = tmp_path / "run"
    train(_folder_config(tiny_base, photo_folder, run, *overrides))
    quick = ["num_images=2", "batch_size=2", "grid_rows=1", "grid_seeds=[0]", "steps=2"]
    report = evaluate(compose_config("cli/evaluate", [f"adapter={run / 'adapter'}", *quick], tmp_path / "eval"))
    return logged_metrics(run), report


def test_segmentation_fidelity_on_a_folder_is_read_by_the_estimator(tiny_base, photo_folder, estimators, tmp_path):
    metrics, report = _train_and_evaluate(
        tiny_base, photo_folder, tmp_path, "experiment=seg_coft", "annotator=segmentation_transformers",
        f"annotator.estimator.path={estimators / 'segformer'}", "annotator.cache_dir=null",
    )
    scores = [row["val/seg_miou"] for row in metrics if "val/seg_miou" in row]
    assert scores and all(0.0 <= score <= 1.0 for score in scores)
    row = report["fidelity"]["seg_miou"]
    assert 0.0 <= row["value"] <= 1.0 and 0.0 <= row["ceiling"] <= 1.0


DEPTH_DNN = ["experiment=depth_coft", "annotator=depth_dnn", "annotator.cache_dir=null"]
DEPTH_DNN += ["annotator.estimator.input_size=[32,32]"]


def test_depth_fidelity_on_a_folder_is_read_by_the_estimator(tiny_base, photo_folder, estimators, tmp_path):
    estimator = f"annotator.estimator.path={estimators / 'depth.onnx'}"
    metrics, report = _train_and_evaluate(tiny_base, photo_folder, tmp_path, *DEPTH_DNN, estimator)
    assert any("val/depth_rmse" in row and "val/depth_order" in row for row in metrics)
    assert set(report["fidelity"]) == {"depth_rmse", "depth_order"}
    assert all(np.isfinite(row["value"]) and np.isfinite(row["ceiling"]) for row in report["fidelity"].values())


def test_the_estimated_depth_of_the_real_images_matches_their_controls(tiny_base, photo_folder, estimators, tmp_path):
    """The estimator reads brightness, and the folder's depth files are the brightness: the real
    images score (near) perfectly, so the scorer compares the right maps the right way round."""
    estimator = f"annotator.estimator.path={estimators / 'depth.onnx'}"
    cfg = _folder_config(tiny_base, photo_folder, tmp_path, *DEPTH_DNN, estimator)
    datamodule = instantiate(cfg.data)
    datamodule.setup("validate")
    items = first_items(datamodule.val_dataloader(), 4)
    scores = fidelity_ceiling(items, fidelity_scorer("depth", items, estimator_of(datamodule)), batch_size=2)
    assert scores["depth_order"] > 0.95 and scores["depth_rmse"] < 10


@pytest.mark.parametrize(("experiment", "annotator"), [("seg_coft", "segmentation"), ("depth_coft", "depth")])
def test_without_an_estimator_the_metric_is_skipped_with_one_warning(
    tiny_base, photo_folder, tmp_path, caplog, experiment, annotator
):
    caplog.set_level(logging.WARNING)
    metrics, report = _train_and_evaluate(
        tiny_base, photo_folder, tmp_path, f"experiment={experiment}", f"annotator={annotator}",
        "trainer.max_steps=4",  # validations at steps 2 and 4, and the final one
    )
    skipped = [r for r in caplog.records if "fidelity is skipped" in r.getMessage()]
    assert len(skipped) == 2  # one from training, one from evaluate
    assert "annotator=" in skipped[0].getMessage()
    assert not any(key.startswith(("val/seg", "val/depth")) for row in metrics for key in row)
    assert report["fidelity"] == {} and "val/loss" in {key for row in metrics for key in row}


def test_estimated_segmentation_scores_the_estimators_map_against_the_controls():
    labels = np.zeros((2, 16, 16), np.int64)
    labels[:, 4:12, 4:12] = 3
    labels[1, :2] = 255  # drawn black in the control: no class, left out
    read_palette = lambda image: labels_from_palette(image, np.array(ADE20K_PALETTE))  # noqa: E731
    score = fidelity_scorer("segmentation", {"labels": torch.from_numpy(labels)}, read_palette)
    drawn = np.array(ADE20K_PALETTE, np.uint8)[np.where(labels == 255, 0, labels)]
    assert score(drawn, {"labels": torch.from_numpy(labels)}) == {"seg_miou": 1.0}
    shifted = np.roll(drawn, 4, axis=2)  # the 8×8 square 4 px right: it overlaps its control in 32 px
    expected = np.mean([32 / 96, 160 / 224])  # the square's IoU, the background's
    assert score(shifted[:1], {"labels": torch.from_numpy(labels[:1])})["seg_miou"] == pytest.approx(expected)


def test_segmentation_and_depth_off_shapesworld_need_an_estimator():
    with pytest.raises(FidelityUnavailable, match="annotator=depth_transformers"):
        fidelity_scorer("depth", {"depth": torch.zeros(1, 1, 4, 4)})
    assert fidelity_scorer("edge_f1", {}) is not None  # edges need no estimator
