"""How good the base is: VAE reconstruction (and the edge-F1 ceiling it sets for control) and
text adherence of generated scenes on held-out captions."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

from conftrl.evaluation.measure import vae_round_trip
from conftrl.metrics.fidelity import binary_f1, canny_edges
from conftrl.metrics.scene import SceneScorer
from conftrl.pretraining.data import to_model_range
from conftrl.utils.images import to_uint8


def round_trip(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Encode (posterior mean) and decode uint8 images, as a control stage sees them."""
    parts = [vae_round_trip(vae, to_model_range(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    return np.concatenate([to_uint8(part, value_range=(-1, 1)) for part in parts])


def vae_quality(vae: AutoencoderKL, images: np.ndarray) -> dict[str, float]:
    """PSNR of the round trip, and the edge-F1 ceiling: Canny(100, 200) of the round trip
    against Canny of the original, strict and within 1 px. No generator that goes through this
    VAE can score higher edge fidelity than this."""
    reconstructed = round_trip(vae, images)
    error = np.mean((images.astype(np.float64) - reconstructed) ** 2)
    edges = [(canny_edges(r), canny_edges(o)) for r, o in zip(reconstructed, images)]
    return {
        "psnr_db": float(10 * np.log10(255**2 / max(error, 1e-10))),
        "edge_f1_ceiling_strict": float(np.mean([binary_f1(r, o) for r, o in edges])),
        "edge_f1_ceiling_1px": float(np.mean([binary_f1(r, o, tolerance_px=1) for r, o in edges])),
    }


def generate(
    pipe: StableDiffusionPipeline, captions: list[str], seeds: list[int], steps: int, cfg_scale: float, batch_size: int = 64
) -> np.ndarray:
    """uint8 images from DDIM with classifier-free guidance, one seeded CPU generator per image."""
    ddim = DDIMScheduler.from_config(pipe.scheduler.config)
    sampler = StableDiffusionPipeline(**{**pipe.components, "scheduler": ddim}, requires_safety_checker=False)
    sampler.set_progress_bar_config(disable=True)
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    images = []
    for start in range(0, len(captions), batch_size):
        images.append(
            sampler(
                prompt=captions[start : start + batch_size],
                height=side,
                width=side,
                num_inference_steps=steps,
                guidance_scale=cfg_scale,
                generator=[torch.Generator().manual_seed(s) for s in seeds[start : start + batch_size]],
                output_type="np",
            ).images
        )
    return (np.concatenate(images) * 255).round().astype(np.uint8)


def scene_quality(
    pipe: StableDiffusionPipeline, samples: list[dict], scorer: SceneScorer, steps: int, cfg_scale: float
) -> dict[str, float]:
    """Text adherence of images generated for the captions of held-out `samples` (seeds 0…n-1)."""
    images = generate(pipe, [s["caption"] for s in samples], list(range(len(samples))), steps, cfg_scale)
    return scorer.score(images, [s["scene"] for s in samples]).as_dict()
