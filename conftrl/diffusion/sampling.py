"""Sampling with diffusers pipelines and seeded, per-image generators: controlled
(`sample_images`) and plain text-to-image (`seeded_images`, which both use)."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDIMScheduler, UniPCMultistepScheduler

SAMPLERS = {"ddim": DDIMScheduler, "unipc": UniPCMultistepScheduler}
# The settings of `sample_images` a run records (its `sampling`) and the CLIs can override.
SAMPLING_OPTIONS = ("sampler", "steps", "cfg_scale", "control_scale", "guide_control")


@torch.no_grad()
def sample_images(
    base,
    control_path,
    prompts: list[str],
    control: torch.Tensor,
    seeds: list[int],
    steps: int = 20,
    cfg_scale: float = 4.0,
    sampler: str = "ddim",
    control_scale: float = 1.0,
    guide_control: bool = False,
    progress: bool = False,
) -> np.ndarray:
    """One image per (prompt, control image, seed): uint8 array B×H×W×3.

    `control_scale` multiplies the control's features (or ControlNet residuals). Control
    enters both classifier-free-guidance branches, as in diffusers' ControlNet pipeline, or
    with `guide_control` only the conditional one, so that `cfg_scale` amplifies it like the
    text. `guide_control` defaults to False here (conf/train.yaml sets it for new runs) so
    that adapters whose run recorded no such key sample as their run validated them. CPU
    generators keep the images identical across devices for the same seeds.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if not len(prompts) == len(control) == len(seeds):
        raise ValueError("prompts, control images and seeds must have the same length")
    pipe = control_path.pipeline(base, SAMPLERS[sampler].from_config(base.noise_scheduler.config))
    pipe.set_progress_bar_config(disable=not progress, leave=False)
    control = control.to(base.unet.device, base.unet.dtype)
    guided = guide_control and cfg_scale > 1  # diffusers runs the [uncond; cond] batch only then
    with control_path.applied(control, control_scale, guided):
        return seeded_images(
            pipe, prompts, seeds, steps, cfg_scale, control.shape[-2:], **control_path.pipeline_kwargs(control)
        )


def seeded_images(
    pipe, prompts: list[str], seeds: list[int], steps: int, cfg_scale: float, size: tuple[int, int], **pipeline_kwargs
) -> np.ndarray:
    """uint8 B×H×W×3 from a diffusers text-to-image pipeline, one image per (prompt, seed),
    each from its own seeded CPU generator: the same seed draws the same noise whatever the
    batch or the device."""
    images = pipe(
        prompt=list(prompts),
        height=size[0],
        width=size[1],
        num_inference_steps=steps,
        guidance_scale=cfg_scale,
        generator=[torch.Generator().manual_seed(int(seed)) for seed in seeds],
        output_type="np",
        **pipeline_kwargs,
    ).images
    return (images * 255).round().astype(np.uint8)
