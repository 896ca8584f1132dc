"""Images in and out: tensor ↔ uint8 arrays, grids, PNG files."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch


def to_uint8(images: torch.Tensor, value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Float B×3×H×W in `value_range` to uint8 B×H×W×3: (0, 1) for controls, (-1, 1) for the
    images the VAE takes and gives."""
    low, high = value_range
    unit = (images.detach().float() - low) / (high - low)
    return (unit.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 B×H×W×3 to float B×3×H×W in [0, 1] (the inverse of `to_uint8`)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255


def image_grid(rows: list[list[np.ndarray]], pad: int = 2) -> np.ndarray:
    """Tile equally sized H×W×3 uint8 images row by row with white gaps."""
    h, w, _ = rows[0][0].shape
    cols = max(len(r) for r in rows)
    grid = np.full((len(rows) * (h + pad) - pad, cols * (w + pad) - pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            grid[i * (h + pad) : i * (h + pad) + h, j * (w + pad) : j * (w + pad) + w] = image
    return grid


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write an RGB uint8 image, creating the folder; fails loudly instead of returning False."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")
    return path
