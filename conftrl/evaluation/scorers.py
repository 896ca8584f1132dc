"""Control fidelity per control type: how closely generated images follow their control.

Each scorer takes the generated images (uint8 B×H×W×3) and the batch they were generated
from, and returns mean scores. The metrics themselves live in `conftrl.metrics`.

Segmentation and depth are read off the generated image exactly on ShapesWorld, with no
estimator network: every object of a scene has its own flat colour, so the nearest of the
scene's colours tells which object (hence which class, which depth) a pixel shows. The score
therefore rewards the right object in the right place, in the colour the caption names.
Other datasets (no `scene` in the batch) need an estimator; these scorers refuse them.
"""

from __future__ import annotations

import numpy as np

from conftrl.metrics import depth_from_labels, depth_order_accuracy, depth_rmse, edge_f1, labels_from_palette, mean_iou
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
    if "scene" not in batch:
        raise ValueError("segmentation/depth fidelity needs ShapesWorld scenes in the batch")
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


def depth_fidelity(generated: np.ndarray, batch: dict) -> dict[str, float]:
    """RMSE (0–255 scale) and pairwise order accuracy of the image's depth against the control's."""
    rmse, order = [], []
    for (objects_map, objects), true in zip(_object_maps(generated, batch), batch["depth"][:, 0].cpu().numpy()):
        depth = depth_from_labels(objects_map, np.array([o["depth"] for o in objects]))
        rmse.append(depth_rmse(depth * 255, true * 255))
        order.append(depth_order_accuracy(depth, true))
    return {"depth_rmse": float(np.mean(rmse)), "depth_order": float(np.nanmean(order))}


FIDELITY_SCORERS = {"edge_f1": edge_fidelity, "segmentation": segmentation_fidelity, "depth": depth_fidelity}

# Whether a larger score is better; only those scores can be read as a percentage of a ceiling.
HIGHER_IS_BETTER = {"edge_f1": True, "edge_f1_tol1": True, "seg_miou": True, "depth_rmse": False, "depth_order": True}


class UnknownMetricError(ValueError):
    """A fidelity metric name that is not one of `FIDELITY_SCORERS`."""


def fidelity_scorer(metric: str):
    """The scorer of the fidelity metric named `metric`."""
    if metric not in FIDELITY_SCORERS:
        raise UnknownMetricError(f"unknown fidelity metric {metric!r}; choose one of {', '.join(FIDELITY_SCORERS)}")
    return FIDELITY_SCORERS[metric]
