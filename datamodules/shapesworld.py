"""ShapesWorld: a procedural world of flat coloured shapes, made for a tiny model to learn.

A scene is a background colour and a few shapes (circle, square, triangle, star) in
distinct colours, each a flat cut-out at its own depth, nearer shapes occluding farther
ones. Everything is rendered with OpenCV at any resolution, with no files: sample ``i`` of
split ``s`` is a pure function of ``(seed, s, i)``.

The vocabulary is deliberately small (17 words) and the caption grammar regular; shapes
are named front to back, joined by "on" where the nearer one overlaps the next and by
"and" where they do not:

    a red circle on a blue square on a gray background
    a yellow star and a green triangle on a black background

Each sample carries the exact ground truth for scorers:
  * ``depth``  float32 H×W in [0, 1], near = 1 (ControlNet's convention), background 0;
  * ``labels`` int64 H×W class map, index into `CLASS_NAMES` (background 0);
  * ``scene``  `Scene.to_json()`: background colour and the shapes front to back, each with
    ``shape``, ``color``, ``center`` (x, y as fractions of width/height), ``size`` (its
    bounding-box side as a fraction of the image side) and ``depth`` (its value in ``depth``).

`COLORS` gives the RGB of every colour name, so a scorer can read colours back from
generated images.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "gray": (128, 128, 128),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPE_COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow")
BACKGROUND_COLORS: tuple[str, ...] = ("gray", "white", "black")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
CLASS_NAMES: tuple[str, ...] = ("background", *SHAPES)
SPLITS: tuple[str, ...] = ("train", "val", "test")
VOCABULARY: tuple[str, ...] = (
    "a", "on", "and", "background", *SHAPES, *SHAPE_COLORS, *BACKGROUND_COLORS
)

# Shapes are placed by checking visibility on a small class map, so a scene does not
# depend on the resolution it is later rendered at.
_LAYOUT_RESOLUTION = 64
_MAX_LAYOUT_ATTEMPTS = 100
_DEPTH_LEVELS = np.round(np.linspace(1.0, 0.3, 8), 2)
_SUBPIXEL_BITS = 4  # cv2 drawing `shift`: coordinates in 1/16 pixel


@dataclass(frozen=True)
class WorldSpec:
    """What scenes may contain: the difficulty knobs of ShapesWorld."""

    shapes: tuple[str, ...] = SHAPES
    shape_colors: tuple[str, ...] = SHAPE_COLORS
    background_colors: tuple[str, ...] = BACKGROUND_COLORS
    min_shapes: int = 1
    max_shapes: int = 2
    min_size: float = 0.25
    max_size: float = 0.5
    min_visible: float = 0.5  # fraction of each shape's area left visible after occlusion

    def __post_init__(self):
        object.__setattr__(self, "shapes", tuple(self.shapes))
        object.__setattr__(self, "shape_colors", tuple(self.shape_colors))
        object.__setattr__(self, "background_colors", tuple(self.background_colors))
        if unknown := set(self.shapes) - set(SHAPES):
            raise ValueError(f"unknown shapes {sorted(unknown)}; known: {SHAPES}")
        if unknown := set(self.shape_colors + self.background_colors) - set(COLORS):
            raise ValueError(f"unknown colours {sorted(unknown)}; known: {tuple(COLORS)}")
        if set(self.shape_colors) & set(self.background_colors):
            raise ValueError("shape and background colours must differ, or shapes vanish")
        if not 1 <= self.min_shapes <= self.max_shapes <= len(self.shape_colors):
            raise ValueError(
                "need 1 <= min_shapes <= max_shapes <= number of shape colours "
                f"(shapes in a scene have distinct colours), got {self.min_shapes}, "
                f"{self.max_shapes}, {len(self.shape_colors)}"
            )
        if self.max_shapes > len(_DEPTH_LEVELS):
            raise ValueError(f"max_shapes must be <= {len(_DEPTH_LEVELS)}")
        if not 0.05 <= self.min_size <= self.max_size <= 1.0:
            raise ValueError(f"need 0.05 <= min_size <= max_size <= 1, got {self.min_size}, {self.max_size}")
        if not 0.0 <= self.min_visible <= 1.0:
            raise ValueError(f"min_visible must be in [0, 1], got {self.min_visible}")


@dataclass(frozen=True)
class Shape:
    shape: str
    color: str
    center: tuple[float, float]  # (x, y), fractions of the image side
    size: float  # side of the bounding box, fraction of the image side
    depth: float  # value in the depth map; larger is nearer


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]  # front to back
    relations: tuple[str, ...]  # "on" | "and" between consecutive shapes

    @property
    def caption(self) -> str:
        phrases = [f"a {s.color} {s.shape}" for s in self.shapes]
        words = [phrases[0]]
        for relation, phrase in zip(self.relations, phrases[1:]):
            words += [relation, phrase]
        return " ".join(words) + f" on a {self.background} background"

    def to_json(self) -> dict:
        return {
            "background": self.background,
            "shapes": [asdict(s) | {"center": list(s.center)} for s in self.shapes],
            "relations": list(self.relations),
        }


def sample_scene(spec: WorldSpec, rng: np.random.Generator) -> Scene:
    """Draw a scene in which every shape keeps at least `spec.min_visible` of its area."""
    background = str(rng.choice(spec.background_colors))
    for _ in range(_MAX_LAYOUT_ATTEMPTS):
        count = int(rng.integers(spec.min_shapes, spec.max_shapes + 1))
        colors = rng.choice(spec.shape_colors, size=count, replace=False)
        depths = np.sort(rng.choice(_DEPTH_LEVELS, size=count, replace=False))[::-1]
        shapes = []
        for color, depth in zip(colors, depths):
            size = float(rng.uniform(spec.min_size, spec.max_size))
            center = tuple(float(c) for c in rng.uniform(size / 2, 1 - size / 2, size=2))
            shapes.append(Shape(str(rng.choice(spec.shapes)), str(color), center, size, float(depth)))
        masks = [_mask(s, _LAYOUT_RESOLUTION) for s in shapes]
        if _all_visible(masks, spec.min_visible):
            relations = tuple("on" if (a & b).any() else "and" for a, b in zip(masks, masks[1:]))
            return Scene(background, tuple(shapes), relations)
    raise RuntimeError(f"no layout after {_MAX_LAYOUT_ATTEMPTS} attempts; lower max_size or min_visible")


def render(scene: Scene, resolution: int) -> dict[str, np.ndarray]:
    """RGB image (uint8, antialiased), exact depth (float32) and class map (int64)."""
    image = np.empty((resolution, resolution, 3), np.uint8)
    image[:] = COLORS[scene.background]
    depth = np.zeros((resolution, resolution), np.float32)
    labels = np.zeros((resolution, resolution), np.int64)
    for shape in reversed(scene.shapes):  # back to front: nearer shapes paint over
        _draw(image, shape, COLORS[shape.color], cv2.LINE_AA)
        mask = _mask(shape, resolution)
        depth[mask] = shape.depth
        labels[mask] = CLASS_NAMES.index(shape.shape)
    return {"image": image, "depth": depth, "labels": labels}


class ShapesWorld:
    """A fixed-length split of ShapesWorld as a sequence of samples (dicts of arrays)."""

    provides = frozenset({"depth", "labels"})

    def __init__(self, split: str, length: int, resolution: int, seed: int = 0, spec: WorldSpec | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.split, self.length, self.resolution, self.seed = split, int(length), int(resolution), int(seed)
        self.spec = spec or WorldSpec()

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> Scene:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        return sample_scene(self.spec, np.random.default_rng([self.seed, SPLITS.index(self.split), index]))

    def __getitem__(self, index: int) -> dict:
        scene = self.scene(index)
        return render(scene, self.resolution) | {
            "caption": scene.caption,
            "scene": scene.to_json(),
            "key": f"shapesworld/{self.split}/{index}",
        }


def _mask(shape: Shape, resolution: int) -> np.ndarray:
    canvas = np.zeros((resolution, resolution), np.uint8)
    _draw(canvas, shape, 1, cv2.LINE_8)
    return canvas.astype(bool)


def _draw(canvas: np.ndarray, shape: Shape, color, line_type: int) -> None:
    scale = canvas.shape[0] * (1 << _SUBPIXEL_BITS)
    # Pixel centres sit at integer coordinates, so the image spans [-0.5, side - 0.5].
    cx, cy = (np.asarray(shape.center) * canvas.shape[0] - 0.5) * (1 << _SUBPIXEL_BITS)
    if shape.shape == "circle":
        radius = round(shape.size * scale / 2)
        cv2.circle(canvas, (round(cx), round(cy)), radius, color, cv2.FILLED, line_type, _SUBPIXEL_BITS)
        return
    points = np.round(_outline(shape.shape) * shape.size * scale / 2 + (cx, cy)).astype(np.int32)
    cv2.fillPoly(canvas, [points], color, line_type, _SUBPIXEL_BITS)


def _outline(kind: str) -> np.ndarray:
    """Polygon vertices in a unit box [-1, 1]², y pointing down."""
    if kind == "square":
        return np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], float)
    if kind == "triangle":
        return np.array([(0, -1), (1, 1), (-1, 1)], float)
    if kind == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.4)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    raise ValueError(f"unknown shape {kind!r}")


def _all_visible(masks: list[np.ndarray], min_visible: float) -> bool:
    """`masks` front to back; each must keep `min_visible` of its area uncovered."""
    covered = np.zeros_like(masks[0])
    for mask in masks:
        area = mask.sum()
        if area == 0 or (mask & ~covered).sum() < min_visible * area:
            return False
        covered |= mask
    return True
