"""How good the base is: VAE reconstruction (and the edge-F1 ceiling it sets for control) and
text adherence of generated scenes on held-out captions."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from torchmetrics.functional.image import peak_signal_noise_ratio

from conftrl.diffusion.sampling import SAMPLERS, seeded_images
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
    psnr = peak_signal_noise_ratio(*(torch.from_numpy(x).double() for x in (reconstructed, images)), data_range=255.0)
    edges = [(canny_edges(r), canny_edges(o)) for r, o in zip(reconstructed, images)]
    return {
        "psnr_db": float(psnr),
        "edge_f1_ceiling_strict": float(np.mean([binary_f1(r, o) for r, o in edges])),
        "edge_f1_ceiling_1px": float(np.mean([binary_f1(r, o, tolerance_px=1) for r, o in edges])),
    }


def generate(
    pipe: StableDiffusionPipeline, captions: list[str], seeds: list[int], steps: int, cfg_scale: float, batch_size: int = 64
) -> np.ndarray:
    """uint8 images from DDIM with classifier-free guidance, one seeded CPU generator per image."""
    ddim = SAMPLERS["ddim"].from_config(pipe.scheduler.config)
    sampler = StableDiffusionPipeline(**{**pipe.components, "scheduler": ddim}, requires_safety_checker=False)
    sampler.set_progress_bar_config(disable=True)
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    batches = range(0, len(captions), batch_size)
    return np.concatenate([
        seeded_images(sampler, captions[i : i + batch_size], seeds[i : i + batch_size], steps, cfg_scale, (side, side))
        for i in batches
    ])


def scene_quality(
    pipe: StableDiffusionPipeline, samples: list[dict], scorer: SceneScorer, steps: int, cfg_scale: float
) -> dict[str, float]:
    """Text adherence of images generated for the captions of held-out `samples` (seeds 0…n-1)."""
    images = generate(pipe, [s["caption"] for s in samples], list(range(len(samples))), steps, cfg_scale)
    return scorer.score(images, [s["scene"] for s in samples]).as_dict()
