"""The text-adherence scorer: right on the world's own images, chance on noise and on images
paired with other scenes' captions."""

from __future__ import annotations

import numpy as np
import pytest

from conftrl.metrics.scene import SceneScorer
from datamodules.shapesworld import COLORS, ShapesWorld, WorldSpec

SPEC = WorldSpec()


@pytest.fixture(scope="module")
def world():
    samples = [ShapesWorld("test", 200, 64, seed=0)[i] for i in range(200)]
    return np.stack([s["image"] for s in samples]), [s["scene"] for s in samples]


def chance(scenes) -> tuple[float, float]:
    """What guessing scores: a random background; a named colour present as often as a
    random scene contains it (shapes per scene / number of shape colours)."""
    shapes_per_scene = np.mean([len(s["shapes"]) for s in scenes])
    return 1 / len(SPEC.background_colors), shapes_per_scene / len(SPEC.shape_colors)


def test_ground_truth_scores_near_perfect(world):
    images, scenes = world
    scores = SceneScorer(COLORS, SPEC.shape_colors).score(images, scenes)
    assert scores.num_images == 200
    assert scores.background_correct == 1.0
    assert scores.colors_present >= 0.98
    assert scores.colors_absent >= 0.98


def test_shuffled_captions_score_about_chance(world):
    images, scenes = world
    shuffled = [scenes[i] for i in np.random.default_rng(0).permutation(len(scenes))]
    scores = SceneScorer(COLORS).score(images, shuffled)
    background_chance, color_chance = chance(scenes)
    assert scores.background_correct == pytest.approx(background_chance, abs=0.1)
    assert scores.colors_present == pytest.approx(color_chance, abs=0.1)


def test_noise_scores_nothing(world):
    _, scenes = world
    noise = np.random.default_rng(0).integers(0, 256, (len(scenes), 64, 64, 3), dtype=np.uint8)
    scores = SceneScorer(COLORS).score(noise, scenes)
    assert scores.background_correct == 0.0  # the border's commonest "colour" is unreadable
    assert scores.colors_present < 0.05  # near-palette pixels are scattered, never a region


def test_a_colour_counts_only_as_one_region_of_sufficient_area():
    scorer = SceneScorer(COLORS, min_area=0.01)
    image = np.full((64, 64, 3), COLORS["gray"], np.uint8)
    scene = {"background": "gray", "shapes": [{"color": "red"}]}
    image[::8, ::8] = COLORS["red"]  # 64 isolated red pixels: 1.6 % of the image, no region
    assert scorer.score_image(image, scene)[:2] == (True, [False])
    image[10:17, 10:17] = COLORS["red"]  # one 7x7 square: 1.2 %
    assert scorer.score_image(image, scene)[:2] == (True, [True])


def test_painting_every_colour_is_not_adherence():
    scorer = SceneScorer(COLORS, SPEC.shape_colors)
    image = np.full((64, 64, 3), COLORS["gray"], np.uint8)
    for i, color in enumerate(SPEC.shape_colors):
        image[8 + 12 * i : 18 + 12 * i, 8:40] = COLORS[color]
    scene = {"background": "gray", "shapes": [{"color": "red"}]}
    background, present, absent = scorer.score_image(image, scene)
    assert background and present == [True]
    assert absent == [False] * (len(SPEC.shape_colors) - 1)  # every unnamed colour is there too
    only_red = np.full((64, 64, 3), COLORS["gray"], np.uint8)
    only_red[8:18, 8:40] = COLORS["red"]
    assert scorer.score_image(only_red, scene) == (True, [True], [True] * (len(SPEC.shape_colors) - 1))


def test_background_is_read_from_the_border_not_the_centre():
    scorer = SceneScorer(COLORS)
    image = np.full((64, 64, 3), COLORS["white"], np.uint8)
    image[4:60, 4:60] = COLORS["blue"]  # a shape filling most of the image
    scene = {"background": "white", "shapes": [{"color": "blue"}]}
    assert scorer.score_image(image, scene)[:2] == (True, [True])
