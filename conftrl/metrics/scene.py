"""Text adherence of a generated scene: are the colours its caption names where they should be?

On a flat-colour world every colour in a caption has a known RGB, so adherence is read off the
pixels with :func:`~conftrl.metrics.fidelity.labels_from_palette` instead of a learned judge:

* **background correct** — the most common colour along the image border (``UNKNOWN``
  included, so a noisy or muddy border counts as wrong) is the caption's background colour;
* **colour present** — for each shape the caption names, one connected region of that colour
  covers at least ``min_area`` of the image. Requiring a *connected* region keeps scattered
  pixels that happen to lie near a palette colour (noise, dithering) from counting;
* **colour absent** — for each shape colour the caption does *not* name, no such region exists.
  Without it, a model that paints every colour everywhere would score "present" perfectly.

Scenes are given as ``{"background": name, "shapes": [{"color": name, ...}, ...]}`` (the
ShapesWorld ``scene`` JSON). Pixels farther than ``max_distance`` from every palette colour
are ``UNKNOWN``; by default that is half the smallest distance between two palette colours, so
antialiased blends never count as either colour.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

import cv2
import numpy as np

from conftrl.metrics.fidelity import UNKNOWN, labels_from_palette


@dataclass(frozen=True)
class SceneScores:
    """Means over a set of images; ``colors_present`` is over every named shape,
    ``colors_absent`` over every shape colour an image's caption does not name."""

    background_correct: float
    colors_present: float
    colors_absent: float
    num_images: int

    def as_dict(self) -> dict[str, float | int]:
        return {
            "background_correct": self.background_correct,
            "colors_present": self.colors_present,
            "colors_absent": self.colors_absent,
            "num_images": self.num_images,
        }


class SceneScorer:
    """Scores RGB ``uint8`` ``H×W×3`` images against scene descriptions in a named palette."""

    def __init__(
        self,
        colors: Mapping[str, Sequence[int]],
        shape_colors: Sequence[str] | None = None,
        min_area: float = 0.005,
        border_px: int = 2,
        max_distance: float | None = None,
    ):
        self.names = list(colors)
        self.shape_colors = list(shape_colors or self.names)  # the colours "absent" is checked for
        self.palette = np.array([colors[name] for name in self.names], dtype=np.float32)
        if max_distance is None:
            max_distance = 0.5 * min(np.linalg.norm(a - b) for a, b in combinations(self.palette, 2))
        self.min_area, self.border_px, self.max_distance = min_area, border_px, max_distance

    def labels(self, image: np.ndarray) -> np.ndarray:
        return labels_from_palette(image, self.palette, self.max_distance)

    def border_color(self, labels: np.ndarray) -> str | None:
        """The most common palette colour in the border frame; None when unreadable pixels win."""
        inner = np.zeros(labels.shape, bool)
        inner[self.border_px : -self.border_px, self.border_px : -self.border_px] = True
        values, counts = np.unique(labels[~inner], return_counts=True)
        winner = values[counts.argmax()]
        return None if winner == UNKNOWN else self.names[winner]

    def color_present(self, labels: np.ndarray, color: str) -> bool:
        """Whether one connected region of `color` covers at least `min_area` of the image."""
        mask = (labels == self.names.index(color)).astype(np.uint8)
        _, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
        largest = stats[1:, cv2.CC_STAT_AREA].max(initial=0)  # label 0 is the rest of the image
        return largest >= self.min_area * labels.size

    def score_image(self, image: np.ndarray, scene: Mapping) -> tuple[bool, list[bool], list[bool]]:
        """(background correct, one "present" per named shape, one "absent" per unnamed shape colour)."""
        labels = self.labels(image)
        background = self.border_color(labels) == scene["background"]
        named = [shape["color"] for shape in scene["shapes"]]
        unnamed = [c for c in self.shape_colors if c not in named and c != scene["background"]]
        present = [self.color_present(labels, color) for color in named]
        return background, present, [not self.color_present(labels, color) for color in unnamed]

    def score(self, images: Iterable[np.ndarray], scenes: Iterable[Mapping]) -> SceneScores:
        backgrounds, present, absent = [], [], []
        for image, scene in zip(images, scenes, strict=True):
            background, named, unnamed = self.score_image(image, scene)
            backgrounds.append(background)
            present.extend(named)
            absent.extend(unnamed)
        return SceneScores(
            float(np.mean(backgrounds)), float(np.mean(present)), float(np.mean(absent)) if absent else 1.0, len(backgrounds)
        )
