"""Fixtures for the datamodules tests: photograph-like images and folders written in tmp_path."""

from __future__ import annotations

import json

import cv2
import pytest
from datamodules_support import make_photo, write_rgb


@pytest.fixture
def photo():
    return make_photo


@pytest.fixture
def txt_folder(tmp_path):
    """Six JPEG photos of mixed sizes with .txt captions."""
    for i in range(6):
        write_rgb(tmp_path / f"img_{i}.jpg", make_photo(80 + 8 * i, 120, seed=i))
        (tmp_path / f"img_{i}.txt").write_text(f"photo number {i}\n")
    return tmp_path


@pytest.fixture
def imagefolder(tmp_path):
    """HF imagefolder layout with conditioning images (Canny of the photo)."""
    lines = []
    for i in range(4):
        image = make_photo(64, 96, seed=10 + i)
        write_rgb(tmp_path / "images" / f"{i}.png", image)
        write_rgb(tmp_path / "conditioning" / f"{i}.png", cv2.cvtColor(cv2.Canny(image, 100, 200), cv2.COLOR_GRAY2RGB))
        line = {"file_name": f"images/{i}.png", "text": f"scene {i}", "conditioning_image": f"conditioning/{i}.png"}
        lines.append(line)
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return tmp_path
