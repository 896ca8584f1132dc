import pickle

import cv2
import numpy as np
import pytest
from support.estimators import save_brightness_onnx, save_transformers_estimators

from datamodules.annotators import (
    ADE20K_PALETTE,
    CannyAnnotator,
    DepthAnnotator,
    DnnDepthEstimator,
    PrecomputedControl,
    SegmentationAnnotator,
    TransformersDepthEstimator,
    TransformersSegmentationEstimator,
)
from datamodules.errors import BadSampleError


def test_canny_matches_opencv_with_controlnet_thresholds(photo):
    image = photo(96, 128)
    control = CannyAnnotator()(image, {})
    assert control.dtype == np.uint8 and control.shape == image.shape
    assert set(np.unique(control)) == {0, 255}
    np.testing.assert_array_equal(control[..., 0], cv2.Canny(image, 100, 200))
    assert (control == control[..., :1]).all()


def test_random_canny_thresholds_are_seeded_and_only_for_training(photo):
    image, canny = photo(96, 128), CannyAnnotator(random_thresholds=True, threshold_range=(20, 400))
    draws = [canny(image, {}, np.random.default_rng(seed)) for seed in range(6)]
    np.testing.assert_array_equal(draws[0], canny(image, {}, np.random.default_rng(0)))
    assert len({int(d.sum()) for d in draws}) > 3  # different thresholds, different edge density
    np.testing.assert_array_equal(canny(image, {}), CannyAnnotator()(image, {}))
    for seed in range(50):
        low, high = canny.thresholds(np.random.default_rng(seed))
        assert 20 <= low < high <= 401


def test_depth_control_is_near_bright_gray():
    depth = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    control = DepthAnnotator()(np.zeros((8, 8, 3), np.uint8), {"depth": depth})
    assert control.dtype == np.uint8 and control.shape == (8, 8, 3)
    assert control[0, 0, 0] == 0 and control[-1, -1, 0] == 255
    np.testing.assert_array_equal(control[..., 0], control[..., 2])


def test_segmentation_control_uses_the_ade20k_palette():
    assert len(ADE20K_PALETTE) == 150
    assert ADE20K_PALETTE[:3] == ((120, 120, 120), (180, 120, 120), (6, 230, 230))  # wall, building, sky
    assert ADE20K_PALETTE[-1] == (92, 0, 255)
    labels = np.array([[0, 1, 2, 149, 150, 255, -1]], np.int64)
    control = SegmentationAnnotator()(np.zeros((1, 7, 3), np.uint8), {"labels": labels})
    np.testing.assert_array_equal(control[0, :4], np.array(ADE20K_PALETTE)[[0, 1, 2, 149]])
    assert (control[0, 4:] == 0).all()


def test_map_annotators_need_a_map_or_an_estimator():
    sample = {"image": np.zeros((4, 4, 3), np.uint8), "key": "a.jpg", "caption": "x"}
    for annotator in (DepthAnnotator(), SegmentationAnnotator(), PrecomputedControl()):
        with pytest.raises(BadSampleError, match=f"a.jpg: no {annotator.source_map}"):
            annotator.prepare(dict(sample))
    supplied = DepthAnnotator(estimator=lambda image: 1 / 0).prepare(sample | {"depth": np.ones((4, 4))})
    assert (supplied["depth"] == 1).all()  # the dataset's map wins; the estimator is not called


@pytest.fixture(scope="module")
def brightness_onnx(tmp_path_factory):
    pytest.importorskip("onnx")
    return save_brightness_onnx(tmp_path_factory.mktemp("onnx") / "depth.onnx")


def test_dnn_depth_estimator_runs_an_onnx_model(brightness_onnx, photo):
    image = photo(72, 100)
    depth = DnnDepthEstimator(brightness_onnx, input_size=(32, 32))(image)
    assert depth.dtype == np.float32 and depth.shape == (72, 100)
    assert depth.min() == 0.0 and depth.max() == pytest.approx(1.0)
    brightness = cv2.resize(image.mean(axis=2).astype(np.float32), (32, 32), interpolation=cv2.INTER_AREA)
    brightness = cv2.resize(brightness, (100, 72), interpolation=cv2.INTER_CUBIC)
    assert np.corrcoef(depth.ravel(), brightness.ravel())[0, 1] > 0.95
    inverted = DnnDepthEstimator(brightness_onnx, input_size=(32, 32), near_is_larger=False)(image)
    np.testing.assert_allclose(inverted, 1 - depth, atol=1e-6)


def test_dnn_mean_and_std_normalise_the_input(brightness_onnx):
    image = np.repeat(np.array([0, 64, 192, 255], np.uint8), 4)[None, :, None].repeat(4, 0).repeat(3, 2)
    plain = DnnDepthEstimator(brightness_onnx, input_size=(16, 4))(image)
    centred = DnnDepthEstimator(brightness_onnx, input_size=(16, 4), mean=(0.5,) * 3, std=(0.25,) * 3)(image)
    np.testing.assert_allclose(plain[0, ::4], [0, 64 / 255, 192 / 255, 1], atol=1e-3)
    # (x - 0.5) / 0.25 is negative below mid-gray, and the net's ReLU zeroes it.
    np.testing.assert_allclose(centred[0, ::4], [0, 0, (192 / 255 - 0.5) / (1 - 0.5), 1], atol=1e-3)


def test_estimators_pickle_without_their_model(brightness_onnx, photo):
    estimator = DnnDepthEstimator(brightness_onnx, input_size=(32, 32))
    estimator(photo(16, 16))  # loads the (unpicklable) cv2.dnn.Net
    clone = pickle.loads(pickle.dumps(estimator))
    np.testing.assert_array_equal(clone(photo(16, 16)), estimator(photo(16, 16)))


def test_missing_model_path_fails_at_construction(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        DnnDepthEstimator(tmp_path / "absent.onnx")


@pytest.fixture(scope="module")
def tiny_transformers_models(tmp_path_factory):
    return save_transformers_estimators(tmp_path_factory.mktemp("transformers"))


def test_transformers_depth_estimator_from_a_local_folder(tiny_transformers_models, photo):
    depth = TransformersDepthEstimator(tiny_transformers_models / "dpt")(photo(50, 70))
    assert depth.dtype == np.float32 and depth.shape == (50, 70)
    assert depth.min() == 0.0 and depth.max() == pytest.approx(1.0)


def test_transformers_segmentation_estimator_from_a_local_folder(tiny_transformers_models, photo):
    image = photo(50, 70)
    estimator = TransformersSegmentationEstimator(tiny_transformers_models / "segformer")
    annotator = SegmentationAnnotator(estimator=estimator)
    sample = annotator.prepare({"image": image, "key": "photo"})
    assert sample["labels"].dtype == np.int64 and sample["labels"].shape == (50, 70)
    assert 0 <= sample["labels"].min() and sample["labels"].max() < 5
    control = annotator(image, sample)
    palette = {tuple(c) for c in ADE20K_PALETTE[:5]}
    assert {tuple(c) for c in control.reshape(-1, 3)} <= palette
