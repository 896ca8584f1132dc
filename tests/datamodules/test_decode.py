"""Image modes are converted as `datamodules.decode` documents; broken files name themselves."""

import cv2
import numpy as np
import pytest
from PIL import Image

from datamodules.decode import normalize_depth, read_depth, read_labels, read_rgb
from datamodules.errors import BadSampleError


def test_grayscale_becomes_rgb(tmp_path):
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    rgb = read_rgb(tmp_path / "g.png")
    assert rgb.shape == (6, 8, 3) and rgb.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], gray)


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200  # red everywhere
    rgba[:2, :, 3] = 255  # opaque top half
    rgba[2:, :, 3] = 0  # transparent bottom half
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    rgb = read_rgb(tmp_path / "a.png")
    assert (rgb[:2] == (200, 0, 0)).all() and (rgb[2:] == 255).all()


def test_sixteen_bit_images_are_scaled(tmp_path):
    gray16 = np.array([[0, 257, 65535, 32896]], np.uint16)
    cv2.imwrite(str(tmp_path / "g16.png"), gray16)
    np.testing.assert_array_equal(read_rgb(tmp_path / "g16.png")[0, :, 0], [0, 1, 255, 128])
    rgb16 = np.zeros((2, 2, 3), np.uint16)
    rgb16[..., 2] = 65535  # red, in OpenCV's BGR order
    cv2.imwrite(str(tmp_path / "c16.png"), rgb16)
    assert (read_rgb(tmp_path / "c16.png") == (255, 0, 0)).all()


def test_palette_images_give_their_colours(tmp_path):
    image = Image.fromarray(np.array([[0, 1], [1, 2]], np.uint8), "P")
    image.putpalette([10, 20, 30, 200, 100, 0, 0, 0, 255] + [0] * 759)
    image.save(tmp_path / "p.png")
    rgb = read_rgb(tmp_path / "p.png")
    assert tuple(rgb[0, 0]) == (10, 20, 30) and tuple(rgb[0, 1]) == (200, 100, 0) and tuple(rgb[1, 1]) == (0, 0, 255)
    # As a label map, the same file gives its indices.
    np.testing.assert_array_equal(read_labels(tmp_path / "p.png"), [[0, 1], [1, 2]])


def test_exif_orientation_is_applied(tmp_path, photo):
    image = Image.fromarray(photo(20, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    image.save(tmp_path / "r.jpg", exif=exif)
    assert read_rgb(tmp_path / "r.jpg").shape == (40, 20, 3)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "missing"])
def test_broken_files_raise_naming_the_file(tmp_path, photo, damage):
    path = tmp_path / "broken.jpg"
    cv2.imwrite(str(path), photo(64, 64))
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00not an image" * 20)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()
    with pytest.raises(BadSampleError, match="broken.jpg"):
        read_rgb(path)


def test_float_images_are_refused(tmp_path):
    Image.fromarray(np.zeros((2, 2), np.float32), "F").save(tmp_path / "f.tiff")
    with pytest.raises(BadSampleError, match="float"):
        read_rgb(tmp_path / "f.tiff")


def test_depth_files_are_normalised_near_bright(tmp_path):
    cv2.imwrite(str(tmp_path / "d.png"), np.array([[1000, 3000, 5000]], np.uint16))
    np.testing.assert_allclose(read_depth(tmp_path / "d.png"), [[0, 0.5, 1]])
    np.save(tmp_path / "d.npy", np.array([[2.0, 4.0]], np.float32))
    np.testing.assert_allclose(read_depth(tmp_path / "d.npy"), [[0, 1]])
    np.testing.assert_allclose(normalize_depth(np.array([2.0, 4.0]), near_is_larger=False), [1, 0])
    assert (normalize_depth(np.full((2, 2), 7.0)) == 0).all()


@pytest.mark.parametrize(
    "name, array, problem",
    [
        ("rgb.labels.npy", np.zeros((2, 2, 3), np.int64), "single-channel"),
        ("float.labels.npy", np.zeros((2, 2), np.float32), "integers"),
        ("nan.depth.npy", np.array([[np.nan, 1.0]]), "NaN"),
    ],
)
def test_bad_maps_raise(tmp_path, name, array, problem):
    np.save(tmp_path / name, array)
    reader = read_labels if "labels" in name else read_depth
    with pytest.raises(BadSampleError, match=problem):
        reader(tmp_path / name)


def test_pickled_npy_maps_are_refused(tmp_path):
    np.save(tmp_path / "obj.labels.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(BadSampleError, match="obj.labels.npy"):
        read_labels(tmp_path / "obj.labels.npy")
