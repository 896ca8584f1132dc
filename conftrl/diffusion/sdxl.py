"""Stable Diffusion XL as a base: two text encoders and size conditioning.

SDXL's UNet cross-attends to the penultimate hidden states of both text encoders side by side,
and adds (its `text_time` embedding) the second encoder's pooled projection and six size ids:
each training image's original size, the top-left corner of its crop, and the size trained at.
Everything else (VAE scaling, noise schedule, prediction type) is read from the folder's
configs as for SD.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline
from transformers import CLIPTextModelWithProjection, PreTrainedTokenizerBase

from conftrl.diffusion.base import DiffusionBase
from conftrl.diffusion.conditioning import CROP_TOP_LEFT, ORIGINAL_SIZE, Conditioning, SizeConditions

# The UNet config value that marks SDXL's added conditioning (pooled text + size ids).
ADDITION_EMBED_TYPE = "text_time"
SIZE_IDS = 6  # original height, width; crop top, left; target height, width
SDXL_VAE_SCALING = 0.13025  # SDXL's VAE config; SD's VAE has 0.18215
# What an SDXL diffusers folder holds besides an SD folder's: subfolder -> any one of these files.
EXTRA_REQUIRED_FILES = {
    "text_encoder_2": ("config.json",),
    "tokenizer_2": ("tokenizer.json", "vocab.json", "tokenizer_config.json"),
}


class SizeConditioningError(ValueError):
    """A batch for an SDXL base lacks each image's original size and crop."""


def is_sdxl_folder(path: Path) -> bool:
    """Whether the diffusers folder at `path` holds an SDXL UNet (read from its config alone;
    a config that does not parse is reported by the UNet's loader)."""
    try:
        config = json.loads((path / "unet" / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("addition_embed_type") == ADDITION_EMBED_TYPE


def empty_prompt_is_zeros(path: Path) -> bool:
    """The folder's `force_zeros_for_empty_prompt` (true for the SDXL base model): its pipeline
    guides with zero embeddings instead of the empty prompt's."""
    return bool(json.loads((path / "model_index.json").read_text()).get("force_zeros_for_empty_prompt", True))


@dataclass(kw_only=True)
class SDXLBase(DiffusionBase):
    """An SDXL base: `text_encoder` (CLIP ViT-L) and `text_encoder_2` (OpenCLIP bigG, with projection)."""

    text_encoder_2: CLIPTextModelWithProjection
    tokenizer_2: PreTrainedTokenizerBase
    force_zeros_for_empty_prompt: bool = True

    @property
    def text_encoders(self) -> dict:
        return {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}

    def condition(self, prompts: list[str], sizes: SizeConditions | None = None) -> Conditioning:
        """Both encoders' embeddings and the pooled projection, as SDXL's pipeline encodes a
        prompt, and the size ids of `sizes`, which training must report for every image."""
        if sizes is None:
            raise SizeConditioningError(
                f"an SDXL base is conditioned on each image's size and crop, but the batch has no "
                f"{ORIGINAL_SIZE!r} and {CROP_TOP_LEFT!r}: use a datamodule that reports them (as ControlDataset does)"
            )
        text, _, pooled, _ = self.pipeline().encode_prompt(
            list(prompts), device=self.text_encoder_2.device, do_classifier_free_guidance=False
        )
        time_ids = sizes.time_ids().to(text.device, text.dtype)
        return Conditioning(text, {"text_embeds": pooled, "time_ids": time_ids})

    def pipeline(self, scheduler=None, controlnet: ControlNetModel | None = None) -> StableDiffusionXLPipeline:
        parts = dict(
            vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer, tokenizer_2=self.tokenizer_2, unet=self.unet,
            scheduler=scheduler or self.noise_scheduler,
            force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt, add_watermarker=False,
        )
        if controlnet is None:
            return StableDiffusionXLPipeline(**parts)
        return StableDiffusionXLControlNetPipeline(**parts, controlnet=controlnet)
