"""Real photographs of mixed sizes and aspect ratios: resizing, cropping and flipping keep the
image and its control in register, for a given control and for a computed one."""

from __future__ import annotations

import json

import numpy as np
import pytest
from datamodules_support import write_rgb
from support.data_sets import PHOTOS, real_photos, write_photo_folder

from datamodules import FolderDataModule
from datamodules.annotators import CannyAnnotator, PrecomputedControl
from datamodules.transforms import PairedTransform

def marked(photo: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The photo (as RGB) with a pure green square near a random corner, and a control image
    that is black but for a white square at the same place."""
    photo = np.repeat(photo[..., None], 3, axis=2) if photo.ndim == 2 else photo.copy()
    height, width = photo.shape[:2]
    side = min(height, width) // 10  # 6 px or more once the shorter side is 64
    rng = np.random.default_rng(seed)
    # Off centre, but where every square crop keeps it.
    top = height // 2 + int(rng.integers(-2 * side, side))
    left = width // 2 + int(rng.choice([-2 * side, side]))
    photo[top : top + side, left : left + side] = (0, 255, 0)
    control = np.zeros_like(photo)
    control[top : top + side, left : left + side] = 255
    return photo, control


def centroid(mask: np.ndarray) -> np.ndarray:
    assert mask.any(), "the marker left the crop"
    return np.argwhere(mask).mean(axis=0)


@pytest.fixture
def marked_photos(tmp_path):
    """The photos with markers, in the imagefolder layout with their control images."""
    lines = []
    for i, (name, photo) in enumerate(real_photos().items()):
        image, control = marked(photo, seed=i)
        write_rgb(tmp_path / "images" / f"{name}.png", image)
        write_rgb(tmp_path / "controls" / f"{name}.png", control)
        lines.append({"file_name": f"images/{name}.png", "text": PHOTOS[name], "conditioning_image": f"controls/{name}.png"})
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return tmp_path


def test_photos_are_of_mixed_sizes_and_aspect_ratios():
    shapes = {photo.shape[:2] for photo in real_photos().values()}
    assert len({round(w / h, 2) for h, w in shapes}) >= 3


def test_a_given_control_stays_in_register_through_resize_crop_and_flip(marked_photos):
    module = FolderDataModule(
        PrecomputedControl(), root=marked_photos, resolution=64, batch_size=len(PHOTOS), val_fraction=0.0,
        crop="random", flip_probability=0.5,
    )
    module.setup("fit")
    loader = module.train_dataloader()
    flips = set()
    for _ in range(4):  # epochs: other crops and flips
        batch = next(iter(loader))
        for image, control in zip(batch["image"], batch["control"]):
            rgb = (image.permute(1, 2, 0).numpy() + 1) * 127.5
            green = (rgb[..., 1] > 200) & (rgb[..., 0] < 80) & (rgb[..., 2] < 80)
            white = control[0].numpy() > 0.5
            assert np.abs(centroid(green) - centroid(white)).max() <= 0.75
            flips.add(bool(centroid(white)[1] > 32))
    assert len(flips) == 2  # markers landed left and right of centre: flips happened


@pytest.mark.parametrize("name", list(PHOTOS))
def test_canny_of_the_crop_is_the_crop_of_canny_away_from_the_border(name):
    """The control is computed after the crop; at native scale (no resize) this equals the
    crop of the full photo's edges, but for Canny's 3 px reach at the crop border and the few
    weak edges that hysteresis keeps only when they connect to a strong one outside the crop."""
    photo = real_photos()[name]
    photo = np.repeat(photo[..., None], 3, axis=2) if photo.ndim == 2 else photo
    side = min(photo.shape[:2])
    sample = PairedTransform(side, "random")({"image": photo}, np.random.default_rng(0))
    crop = sample["image"]
    origin = next(
        (y, x) for y in range(photo.shape[0] - side + 1) for x in range(photo.shape[1] - side + 1)
        if np.array_equal(photo[y : y + side, x : x + side], crop)
    )
    canny = CannyAnnotator()
    of_crop = canny(crop, sample)[..., 0]
    of_photo = canny(photo, {"image": photo})[..., 0][origin[0] : origin[0] + side, origin[1] : origin[1] + side]
    inner = (slice(3, -3), slice(3, -3))
    differ = np.count_nonzero(of_crop[inner] != of_photo[inner])
    assert differ <= 0.005 * np.count_nonzero(of_photo[inner])


def test_a_folder_of_photos_gives_canny_batches(tmp_path):
    module = FolderDataModule(CannyAnnotator(), root=write_photo_folder(tmp_path), resolution=64, batch_size=4)
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert batch["image"].shape == batch["control"].shape == (4, 3, 64, 64)
    assert {caption for caption in batch["caption"]} <= set(PHOTOS.values())
    edges = (batch["control"][:, 0] > 0.5).float().mean(dim=(1, 2))
    assert (edges > 0.01).all()  # photographs have edges at 64 px
