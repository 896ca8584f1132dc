"""Metrics: hyperspherical energy of weights (what OFT preserves) and control fidelity of
generated images (what the control is for)."""

from conftrl.metrics.energy import (
    EnergySummary,
    MergedWeightLayer,
    energy_summary,
    hyperspherical_energy,
    layer_energies,
    layer_groups,
    layer_weights,
    rotation_stats,
)
from conftrl.metrics.fidelity import (
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

__all__ = [
    "UNKNOWN",
    "EnergySummary",
    "MergedWeightLayer",
    "binary_f1",
    "canny_edges",
    "depth_from_labels",
    "depth_order_accuracy",
    "depth_rmse",
    "edge_f1",
    "edge_misses",
    "energy_summary",
    "hyperspherical_energy",
    "layer_energies",
    "iou_per_class",
    "labels_from_palette",
    "layer_groups",
    "layer_weights",
    "mean_iou",
    "rotation_stats",
]
