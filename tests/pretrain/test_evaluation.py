"""The base's evaluation: PSNR as defined, and text-to-image sampling through the project's one
seeded sampler, giving what diffusers' DDIM pipeline gives on the same seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from conftrl.config import ASSETS
from conftrl.diffusion import load_base
from conftrl.pretraining import evaluation

CAPTIONS = ["a red circle on a gray background", "a blue square left of a green triangle", "a yellow circle"]


def test_psnr_is_its_definition(monkeypatch):
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3)).astype(np.uint8)
    noisy = np.clip(images.astype(int) + np.random.default_rng(1).integers(-9, 10, images.shape), 0, 255).astype(np.uint8)
    monkeypatch.setattr(evaluation, "round_trip", lambda vae, batch: noisy)
    mse = np.mean((images.astype(np.float64) - noisy) ** 2)
    quality = evaluation.vae_quality(None, images)
    # torchmetrics takes log(255) in float32: equal to ~1e-7 relative
    assert quality["psnr_db"] == pytest.approx(10 * math.log10(255**2 / mse), rel=1e-7)


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionPipeline:
    return load_base(ASSETS / "tiny-sd").pipeline()


def test_generate_is_diffusers_ddim_on_the_same_seeds(pipe):
    seeds, steps, cfg_scale = [0, 5, 9], 3, 4.0
    images = evaluation.generate(pipe, CAPTIONS, seeds, steps, cfg_scale, batch_size=2)
    ddim = StableDiffusionPipeline(
        **{**pipe.components, "scheduler": DDIMScheduler.from_config(pipe.scheduler.config)}, requires_safety_checker=False
    )
    expected = np.concatenate([  # in the same batches: batch size changes float rounding
        ddim(
            prompt=CAPTIONS[i : i + 2], num_inference_steps=steps, guidance_scale=cfg_scale, output_type="np",
            generator=[torch.Generator().manual_seed(s) for s in seeds[i : i + 2]],
        ).images
        for i in (0, 2)
    ])
    assert images.dtype == np.uint8 and images.shape == (3, 64, 64, 3)
    np.testing.assert_array_equal(images, (expected * 255).round().astype(np.uint8))
    # one generator per image: a caption and seed give the same picture in any batch (up to
    # float rounding), another seed another picture
    alone = evaluation.generate(pipe, CAPTIONS[1:2], [5], steps, cfg_scale).astype(int)
    assert np.abs(alone - images[1:2]).max() <= 1
    assert np.abs(evaluation.generate(pipe, CAPTIONS[1:2], [6], steps, cfg_scale).astype(int) - alone).mean() > 5
