import re

import cv2
import numpy as np
import pytest

from datamodules.shapesworld import (
    CLASS_NAMES,
    COLORS,
    SHAPES,
    VOCABULARY,
    ShapesWorld,
    WorldSpec,
    render,
)


def test_sample_is_a_pure_function_of_seed_split_and_index():
    a, b = ShapesWorld("train", 50, 64, seed=3), ShapesWorld("train", 50, 64, seed=3)
    for index in (0, 7, 49):
        x, y = a[index], b[index]
        assert x["caption"] == y["caption"] and x["scene"] == y["scene"]
        np.testing.assert_array_equal(x["image"], y["image"])
    captions = lambda world: [world.scene(i).caption for i in range(20)]  # noqa: E731
    assert captions(a) != captions(ShapesWorld("train", 50, 64, seed=4))
    assert captions(a) != captions(ShapesWorld("val", 50, 64, seed=3))


def test_scene_does_not_depend_on_resolution():
    assert ShapesWorld("test", 5, 32).scene(2) == ShapesWorld("test", 5, 512).scene(2)


def test_arrays_have_documented_types_and_ranges():
    sample = ShapesWorld("train", 4, 48)[1]
    assert sample["image"].dtype == np.uint8 and sample["image"].shape == (48, 48, 3)
    assert sample["depth"].dtype == np.float32 and sample["depth"].shape == (48, 48)
    assert sample["labels"].dtype == np.int64 and sample["labels"].shape == (48, 48)
    assert 0.0 <= sample["depth"].min() and sample["depth"].max() <= 1.0
    assert set(np.unique(sample["labels"])) <= set(range(len(CLASS_NAMES)))


def test_captions_use_the_small_grammar_and_vocabulary():
    world = ShapesWorld("train", 200, 32, spec=WorldSpec(max_shapes=3))
    phrase = rf"a ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
    grammar = re.compile(rf"{phrase}( (on|and) {phrase})* on a (gray|white|black) background")
    for index in range(200):
        caption = world.scene(index).caption
        assert grammar.fullmatch(caption), caption
        assert set(caption.split()) <= set(VOCABULARY)


def _interior(mask: np.ndarray) -> np.ndarray:
    """Pixels two away from the mask's edge, clear of antialiased rims."""
    return cv2.erode(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)


def test_ground_truth_matches_the_scene_and_colours_read_back():
    world = ShapesWorld("val", 30, 128, seed=1)
    for index in range(30):
        sample, scene = world[index], world.scene(index)
        labels, depth, image = sample["labels"], sample["depth"], sample["image"]
        assert (image[_interior(labels == 0)] == COLORS[scene.background]).all()
        assert depth[labels == 0].max() == 0.0
        for shape in scene.shapes:
            region = depth == np.float32(shape.depth)  # depths are distinct, so this is the shape
            assert set(np.unique(labels[region])) == {CLASS_NAMES.index(shape.shape)}
            inside = _interior(region)
            assert inside.any() and (image[inside] == COLORS[shape.color]).all()
        depths = [s.depth for s in scene.shapes]  # front to back: strictly decreasing
        assert depths == sorted(depths, reverse=True) and len(set(depths)) == len(depths)


def test_every_shape_stays_mostly_visible():
    world = ShapesWorld("train", 40, 64, spec=WorldSpec(max_shapes=4, max_size=0.6, min_visible=0.5))
    for index in range(40):
        scene = world.scene(index)
        for shape in scene.shapes:
            alone = render(type(scene)(scene.background, (shape,), ()), 64)["labels"] > 0
            visible = world[index]["depth"] == np.float32(shape.depth)
            assert visible.sum() >= 0.45 * alone.sum()  # 0.5 at layout resolution, ±rim pixels


def test_relation_says_whether_consecutive_shapes_overlap():
    world = ShapesWorld("train", 100, 64, seed=0)
    for index in range(100):
        scene = world.scene(index)
        for relation, front, back in zip(scene.relations, scene.shapes, scene.shapes[1:]):
            masks = [render(type(scene)(scene.background, (s,), ()), 64)["labels"] > 0 for s in (front, back)]
            assert (relation == "on") == bool((masks[0] & masks[1]).any())


@pytest.mark.parametrize(
    "spec",
    [
        dict(shapes=("hexagon",)),
        dict(shape_colors=("red", "gray")),
        dict(max_shapes=5),
        dict(min_shapes=3, max_shapes=2),
        dict(min_size=0.6, max_size=0.5),
    ],
)
def test_invalid_world_specs_are_refused(spec):
    with pytest.raises(ValueError):
        WorldSpec(**spec)


def test_scene_json_round_trips():
    import json

    scene = ShapesWorld("train", 3, 32).scene(0).to_json()
    assert json.loads(json.dumps(scene)) == scene
    assert {"background", "shapes", "relations"} == set(scene)
    assert {"shape", "color", "center", "size", "depth"} == set(scene["shapes"][0])
