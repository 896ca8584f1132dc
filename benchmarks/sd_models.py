"""Random-weight Stable-Diffusion-shaped (and SDXL-shaped) models that the benchmarks time (nothing is downloaded)."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

SD_TOKENS = 77
SD_TEXT_WIDTH = 768
SD_VAE_CHANNELS = (128, 256, 512, 512)
# A 115 M-parameter UNet with SD's block layout, blocks 192/384/768: SD's costs on a CPU budget.
SD100M_UNET = dict(
    block_out_channels=(192, 384, 768),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    attention_head_dim=8,
)
# SDXL's UNet (diffusers' config of stable-diffusion-xl-base-1.0; `attention_head_dim` holds its
# head counts); layers_per_block 2 is UNet2DConditionModel's default.
SDXL_UNET = dict(
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


def sd_unet(latent_size: int, **arguments) -> UNet2DConditionModel:
    """A UNet reading SD 1.5's text features unless `arguments` say otherwise, seeded; no
    `arguments`: SD 1.5's UNet itself."""
    torch.manual_seed(0)
    return UNet2DConditionModel(**{"sample_size": latent_size, "cross_attention_dim": SD_TEXT_WIDTH, **arguments})


def sd_vae(width_divisor: int, resolution: int, **config) -> AutoencoderKL:
    """SD's VAE (SDXL's too, with its `scaling_factor` in `config`) with its channels divided by `width_divisor`."""
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * len(SD_VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(SD_VAE_CHANNELS),
        block_out_channels=tuple(c // width_divisor for c in SD_VAE_CHANNELS),
        layers_per_block=2,
        latent_channels=4,
        sample_size=resolution,
        **config,
    )


def sd_text_encoder(tokenizer, layers: int = 12) -> CLIPTextModel:
    """SD 1.5's text encoder (CLIP ViT-L/14's text tower; SDXL's first); CLIPTextConfig's defaults give the rest."""
    return CLIPTextModel(
        CLIPTextConfig(
            hidden_size=SD_TEXT_WIDTH, intermediate_size=3072, num_attention_heads=12, projection_dim=768,
            num_hidden_layers=layers,
            max_position_embeddings=SD_TOKENS, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    )


def sdxl_text_encoder_2(tokenizer, layers: int = 32) -> CLIPTextModelWithProjection:
    """SDXL's second text encoder (OpenCLIP ViT-bigG/14's text tower, with its projection)."""
    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=layers, num_attention_heads=20,
            projection_dim=1280, hidden_act="gelu", max_position_embeddings=SD_TOKENS,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    )
