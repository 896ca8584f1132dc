"""Data sets the tests build: real photographs (scikit-image ships them, no download), as a
captioned folder and as Hugging Face `datasets` sets on disk and in parquet files."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import datasets
import numpy as np
from PIL import Image

# name → caption; sizes from 451×300 to 1000×872, aspect ratios 1, 1.15 and 1.5, one grayscale.
PHOTOS = {
    "astronaut": "an astronaut in a white space suit",
    "coffee": "a cup of coffee on a saucer",
    "chelsea": "a tabby cat",
    "rocket": "a rocket on its launch pad",
    "camera": "a man with a camera on a tripod",
    "hubble_deep_field": "galaxies in deep space",
}
FEATURES = datasets.Features(image=datasets.Image(), conditioning_image=datasets.Image(), text=datasets.Value("string"))


def real_photos() -> dict[str, np.ndarray]:
    """name → uint8 RGB photograph (H×W for the grayscale one, as it ships)."""
    import skimage.data

    return {name: getattr(skimage.data, name)() for name in PHOTOS}


def write_photo_folder(root: Path) -> Path:
    """The photos as JPEGs with a caption file each (the `txt` folder layout)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, photo in real_photos().items():
        bgr = photo if photo.ndim == 2 else photo[..., ::-1]
        assert cv2.imwrite(str(root / f"{name}.jpg"), np.ascontiguousarray(bgr))
        (root / f"{name}.txt").write_text(PHOTOS[name] + "\n")
    return root


def png_cell(image: np.ndarray) -> dict:
    """An image as `datasets.Image` stores it: PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def photo_dataset(scale: float = 0.25) -> datasets.Dataset:
    """The photos, scaled down, with their Canny edges as conditioning images and their captions."""
    images, controls = [], []
    for photo in real_photos().values():
        photo = cv2.resize(photo, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        images.append(png_cell(photo))
        controls.append(png_cell(cv2.Canny(photo, 100, 200)))
    data = {"image": images, "conditioning_image": controls, "text": list(PHOTOS.values())}
    return datasets.Dataset.from_dict(data, features=FEATURES)


def write_parquet_set(root: Path) -> Path:
    """Parquet files named for their splits, as `datasets` finds them: 4 photos to train on, 2 to validate."""
    root.mkdir(parents=True, exist_ok=True)
    photos = photo_dataset()
    photos.select(range(4)).to_parquet(root / "train.parquet")
    photos.select(range(4, len(photos))).to_parquet(root / "validation.parquet")
    return root


def write_saved_set(root: Path) -> Path:
    photo_dataset().save_to_disk(root)
    return root
