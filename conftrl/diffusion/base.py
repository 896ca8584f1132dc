"""The frozen base model: what a training step and a sampler need from a pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDPMScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, PreTrainedTokenizerBase

from conftrl.diffusion.conditioning import Conditioning, SizeConditions
from conftrl.diffusion.objective import encode_prompts


@dataclass
class DiffusionBase:
    """A Stable-Diffusion-shaped base (SD 1.5 / 2.1): one text encoder, text-only conditioning."""

    path: Path
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: PreTrainedTokenizerBase
    noise_scheduler: DDPMScheduler
    config: Path | None = None  # the config folder a single-file `path` was read with

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def text_encoders(self) -> dict[str, CLIPTextModel]:
        """The text encoders by their pipeline component names (what `method.text_encoder` adapts)."""
        return {"text_encoder": self.text_encoder}

    def condition(self, prompts: list[str], sizes: SizeConditions | None = None) -> Conditioning:
        """What the UNet is conditioned on for `prompts`; SD takes no size conditioning."""
        return Conditioning(encode_prompts(self.tokenizer, self.text_encoder, prompts))

    def pipeline(self, scheduler=None, controlnet: ControlNetModel | None = None) -> StableDiffusionPipeline:
        """A text-to-image pipeline (with `controlnet`, a ControlNet one) over these very modules
        (no copies), sampling with `scheduler` (default: the training noise scheduler)."""
        parts = dict(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=scheduler or self.noise_scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
        if controlnet is None:
            return StableDiffusionPipeline(**parts)
        return StableDiffusionControlNetPipeline(**parts, controlnet=controlnet)

    def freeze(self) -> None:
        for model in (self.unet, self.vae, *self.text_encoders.values()):
            model.requires_grad_(False)
            model.eval()
