"""The denoising objective, read off the noise scheduler's config like diffusers' scripts do."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

TIMESTEP_SAMPLINGS = ("uniform", "cubic")


def stream_seed(*stream: int) -> int:
    """A well-mixed 32-bit seed for one stream of randomness, e.g. (seed, stage, step): a
    resumed run draws what the uninterrupted run would, with no generator state saved."""
    return int(np.random.SeedSequence([int(s) for s in stream]).generate_state(1)[0])


def sample_timesteps(
    scheduler: DDPMScheduler, n: int, generator: torch.Generator, device: torch.device | str = "cpu",
    sampling: str = "uniform",
) -> torch.Tensor:
    """Training timesteps: uniform as in SD training, or "cubic", t = (1 - u³)·T, which
    T2I-Adapter (Mou et al. 2023) uses because layout and edges are decided at high noise;
    at low noise the noisy latent already shows the edges and a control has little to add."""
    steps = scheduler.config.num_train_timesteps
    if sampling == "uniform":
        return torch.randint(0, steps, (n,), generator=generator, device=device)
    if sampling == "cubic":
        u = torch.rand(n, generator=generator, device=device)
        return ((1 - u**3) * steps).long().clamp(max=steps - 1)
    raise ValueError(f"unknown timestep sampling {sampling!r}; choose one of {', '.join(TIMESTEP_SAMPLINGS)}")


def training_target(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet must predict: the noise (epsilon) or the velocity (v-prediction)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r} (epsilon or v_prediction)")


def denoising_loss(
    prediction: torch.Tensor, target: torch.Tensor, scheduler: DDPMScheduler, timesteps: torch.Tensor,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """MSE to the target, with Min-SNR-γ weighting (Hang et al. 2023) when `snr_gamma` is set.

    Min-SNR down-weights the many nearly noise-free timesteps whose epsilon loss is large but
    says little about layout, colour or where edges go: what pretraining must learn first, and
    what a control must change.
    """
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=tuple(range(1, target.ndim)))
    if not snr_gamma:
        return per_sample.mean()
    snr = compute_snr(scheduler, timesteps)
    epsilon = scheduler.config.prediction_type == "epsilon"
    weights = snr.clamp(max=snr_gamma) / (snr if epsilon else snr + 1)
    return (per_sample * weights.to(per_sample.device)).mean()


def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """Token embeddings the UNet cross-attends to (padded to the tokenizer's max length)."""
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    ).input_ids
    return text_encoder(ids.to(text_encoder.device))[0]
