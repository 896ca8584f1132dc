"""ShapesWorld as an endless stream of batches, each a pure function of (seed, stage, step).

Batch ``k`` holds scenes ``k·B … k·B+B-1`` of the train split, so no scene repeats and a
resumed run sees exactly the batches (and caption dropout, noise, timesteps) an uninterrupted
run would, without saving any random-number-generator state.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from conftrl.diffusion.objective import stream_seed
from datamodules.shapesworld import ShapesWorld, WorldSpec


def step_generator(*stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(*stream))


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 N×H×W×3 → float32 N×3×H×W in [-1, 1] (what the VAE takes)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


class WorldBatches:
    """Images and captions of the train split, batch by batch."""

    def __init__(self, spec: WorldSpec, resolution: int, batch_size: int, seed: int):
        self.world = ShapesWorld("train", sys.maxsize, resolution, seed, spec)
        self.batch_size = batch_size

    def __call__(self, step: int) -> tuple[np.ndarray, list[str]]:
        samples = [self.world[step * self.batch_size + i] for i in range(self.batch_size)]
        return np.stack([s["image"] for s in samples]), [s["caption"] for s in samples]


def drop_captions(captions: list[str], probability: float, seed: int) -> list[str]:
    """Replace each caption by "" with `probability`: the unconditional branch of
    classifier-free guidance is learned from these."""
    keep = np.random.default_rng(seed).random(len(captions)) >= probability
    return [caption if k else "" for caption, k in zip(captions, keep)]


def held_out(spec: WorldSpec, resolution: int, count: int, seed: int, split: str) -> list[dict]:
    """The first `count` samples of a held-out split (val for the VAE, test for captions)."""
    world = ShapesWorld(split, count, resolution, seed, spec)
    return [world[i] for i in range(count)]
