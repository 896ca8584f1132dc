"""Control fidelity per control type: how closely generated images follow their control.

Each scorer takes the generated images (uint8 B×H×W×3) and the batch they were generated
from, and returns mean scores. The metrics themselves live in `conftrl.metrics`.

Segmentation and depth are read off the generated image exactly on ShapesWorld, with no
estimator network: every object of a scene has its own flat colour, so the nearest of the
scene's colours tells which object (hence which class, which depth) a pixel shows. The score
therefore rewards the right object in the right place, in the colour the caption names.

Other data (no `scene` in the batch) is scored by the run's estimator (its annotator's): the
estimator reads a class or depth map off each generated image, which is compared with the map
the control was drawn from. `fidelity_scorer` picks the scorer for the items at hand.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from conftrl.metrics import depth_from_labels, depth_order_accuracy, depth_rmse, edge_f1, labels_from_palette, mean_iou
from datamodules.annotators import ADE20K_PALETTE
from datamodules.shapesworld import CLASS_NAMES, COLORS


def control_edges(batch: dict) -> np.ndarray:
    """The batch's canny controls as bool edge maps B×H×W (every channel holds the same map)."""
    return batch["control"][:, 0].cpu().numpy() > 0.5


def edge_fidelity(generated: np.ndarray, batch: dict) -> dict[str, float]:
    """Canny (100/200) edges of each image against the control's edge map: F1 strict and
    within 1 px (the OFT paper reports strict)."""
    edges = control_edges(batch)
    return {
        "edge_f1": float(np.mean([edge_f1(g, e) for g, e in zip(generated, edges)])),
        "edge_f1_tol1": float(np.mean([edge_f1(g, e, tolerance_px=1) for g, e in zip(generated, edges)])),
    }


def _scene_objects(batch: dict) -> list[list[dict]]:
    # Object 0 is the background: class 0, depth 0 (ShapesWorld's conventions).
    return [
        [{"color": scene["background"], "shape": "background", "depth": 0.0}, *scene["shapes"]]
        for scene in batch["scene"]
    ]


def _object_maps(generated: np.ndarray, batch: dict):
    for image, objects in zip(generated, _scene_objects(batch)):
        palette = np.array([COLORS[o["color"]] for o in objects])
        yield labels_from_palette(image, palette), objects


def segmentation_fidelity(generated: np.ndarray, batch: dict) -> dict[str, float]:
    """mIoU over ShapesWorld's classes between the image's object map and the control's."""
    scores = []
    for (objects_map, objects), true in zip(_object_maps(generated, batch), batch["labels"].cpu().numpy()):
        classes = np.array([CLASS_NAMES.index(o["shape"]) for o in objects])
        scores.append(mean_iou(classes[objects_map], true, num_classes=len(CLASS_NAMES)))
    return {"seg_miou": float(np.mean(scores))}


def _depth_scores(depths, batch: dict) -> dict[str, float]:
    """RMSE on the 0–255 scale, and the pairwise order accuracy, which no rescaling of the
    read depth changes: the score that stays fair when an estimator's scale is not the
    control's."""
    rmse, order = [], []
    for depth, true in zip(depths, batch["depth"][:, 0].cpu().numpy()):
        rmse.append(depth_rmse(depth * 255, true * 255))
        order.append(depth_order_accuracy(depth, true))
    return {"depth_rmse": float(np.mean(rmse)), "depth_order": float(np.nanmean(order))}


def depth_fidelity(generated: np.ndarray, batch: dict) -> dict[str, float]:
    """The depth each image shows (read off its objects' colours) against the control's."""
    return _depth_scores(
        (depth_from_labels(objects_map, np.array([o["depth"] for o in objects]))
         for objects_map, objects in _object_maps(generated, batch)),
        batch,
    )  # fmt: skip


def estimated_segmentation_fidelity(generated: np.ndarray, batch: dict, estimator) -> dict[str, float]:
    """mIoU between the estimator's class map of each image and the control's class map.
    The control draws classes 0..149 in ADE20K colours; pixels of other classes were drawn
    black, carry no class, and are left out."""
    scores = []
    for image, true in zip(generated, batch["labels"].cpu().numpy()):
        true = np.where((true >= 0) & (true < len(ADE20K_PALETTE)), true, -1)
        scores.append(mean_iou(estimator(image), true, num_classes=len(ADE20K_PALETTE), ignore_index=-1))
    return {"seg_miou": float(np.nanmean(scores))}


def estimated_depth_fidelity(generated: np.ndarray, batch: dict, estimator) -> dict[str, float]:
    """The estimator's depth of each image (in [0, 1], near = 1, as controls are drawn from)
    against the control's."""
    return _depth_scores((estimator(image) for image in generated), batch)


FIDELITY_SCORERS = {"edge_f1": edge_fidelity, "segmentation": segmentation_fidelity, "depth": depth_fidelity}
ESTIMATED_SCORERS = {"segmentation": estimated_segmentation_fidelity, "depth": estimated_depth_fidelity}

# Whether a larger score is better; only those scores can be read as a percentage of a ceiling.
HIGHER_IS_BETTER = {"edge_f1": True, "edge_f1_tol1": True, "seg_miou": True, "depth_rmse": False, "depth_order": True}


class UnknownMetricError(ValueError):
    """A fidelity metric name that is not one of `FIDELITY_SCORERS`."""


class FidelityUnavailable(ValueError):
    """Segmentation or depth fidelity asked of data without ShapesWorld scenes, with no
    estimator to read the generated images: the metric cannot be computed and is skipped."""


def check_metric(metric: str) -> str:
    """`metric`, if it names one of `FIDELITY_SCORERS`; otherwise `UnknownMetricError`."""
    if metric not in FIDELITY_SCORERS:
        raise UnknownMetricError(f"unknown fidelity metric {metric!r}; choose one of {', '.join(FIDELITY_SCORERS)}")
    return metric


def fidelity_scorer(metric: str, items: dict, estimator=None):
    """The scorer of `metric` for `items` (the batch dict to be scored): ShapesWorld's exact
    scorer where the items carry scenes, otherwise one that runs `estimator` on the images.
    `FidelityUnavailable` where neither is possible."""
    if check_metric(metric) == "edge_f1" or "scene" in items:
        return FIDELITY_SCORERS[metric]
    if estimator is None:
        raise FidelityUnavailable(
            f"{metric} fidelity is skipped: this data has no ShapesWorld scenes and the annotator has no estimator "
            f"to read the generated images (pick an annotator with one, e.g. annotator="
            f"{'segmentation_transformers' if metric == 'segmentation' else 'depth_transformers'} "
            "annotator.estimator.path=<local model>)"
        )
    return partial(ESTIMATED_SCORERS[metric], estimator=estimator)


def estimator_of(datamodule):
    """The estimator of a datamodule's annotator, or None (Canny, precomputed, map-only)."""
    return getattr(datamodule.annotator, "estimator", None)
