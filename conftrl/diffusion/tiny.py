"""Build a tiny Stable-Diffusion-shaped (or SDXL-shaped) pipeline from random weights.

The same architecture as SD 1.5 (AutoencoderKL, CLIP text encoder, UNet2DConditionModel,
DDPM noise schedule), shrunk so a CPU can train it. Tests build one per session; the
pretraining command starts the embedded base from it. Nothing is downloaded: the tokenizer
is trained here on a word list.

    python -m conftrl.diffusion.tiny OUTPUT_DIR [--resolution 64] [--seed 0] [--sdxl]
"""

from __future__ import annotations

import argparse
import string
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from conftrl.diffusion.sdxl import ADDITION_EMBED_TYPE, SDXL_VAE_SCALING, SIZE_IDS

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"

# Words of captions about simple scenes; any other lowercase word still tokenizes into
# sub-words because every character is in the vocabulary.
DEFAULT_WORDS = tuple(
    """a an the one two three four of and with on in at near small large big tiny
    red green blue yellow orange purple pink cyan magenta white black gray grey brown
    circle circles square squares triangle triangles star stars ring rings rectangle
    ellipse shape shapes background left right top bottom center middle above below
    picture photo image scene""".split()
)


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny SD-architecture pipeline; the defaults are the embedded base's."""

    resolution: int = 64
    vae_channels: tuple[int, ...] = (16, 32, 64)  # n blocks -> latents 2**(n-1) times smaller
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    norm_groups: int = 8
    attention_head_dim: int = 8
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 2
    max_tokens: int = 16
    # SD 1.5's block order: cross-attention in every UNet block but the lowest-resolution one.
    # Off by default: at the highest resolution it costs a CPU ~10x the rest of the UNet.
    sd_block_order: bool = False
    words: tuple[str, ...] = field(default=DEFAULT_WORDS)


def learn_merges(words: tuple[str, ...]) -> list[tuple[str, str]]:
    """BPE merges, most frequent pair first, until every word is one token.

    Written here instead of using `tokenizers`' `BpeTrainer`, which breaks ties between equally
    frequent pairs in hash order: each process would learn the merges in another order and give
    the same words other ids. Ties go to the alphabetically first pair, so the merges depend on
    `words` alone."""
    pieces = [[*word[:-1], word[-1] + END_OF_WORD] for word in dict.fromkeys(words)]
    merges = []
    while pairs := Counter(pair for piece in pieces for pair in zip(piece, piece[1:])):
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        pieces = [_merge(piece, best) for piece in pieces]
    return merges


def _merge(piece: list[str], pair: tuple[str, str]) -> list[str]:
    merged, i = [], 0
    while i < len(piece):
        if tuple(piece[i : i + 2]) == pair:
            merged.append(piece[i] + piece[i + 1])
            i += 2
        else:
            merged.append(piece[i])
            i += 1
    return merged


def build_tokenizer(words: tuple[str, ...], max_tokens: int) -> CLIPTokenizer:
    """A small BPE tokenizer with CLIP's special tokens that keeps each of `words` whole; any
    other word splits into sub-words, down to single characters."""
    alphabet = list(string.ascii_lowercase + string.digits + string.punctuation)
    merges = learn_merges(words)
    tokens = [BOS, EOS, *alphabet, *(char + END_OF_WORD for char in alphabet), *(a + b for a, b in merges)]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=EOS, end_of_word_suffix=END_OF_WORD))
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.decoder = decoders.BPEDecoder(suffix=END_OF_WORD)
    bpe.add_special_tokens([BOS, EOS])
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return CLIPTokenizer(tokenizer_object=bpe, model_max_length=max_tokens)


@dataclass(frozen=True)
class TinySDXLSpec(TinySpec):
    """A tiny SDXL-architecture pipeline: two text encoders (each `text_hidden` wide, the second
    with a projection) whose hidden states the UNet attends to side by side, and the
    `text_time` embedding of the second's pooled projection and six size ids. As in SDXL, the
    highest-resolution block has no attention and the lowest has the deepest transformers."""

    size_embed_dim: int = 8  # each size id's sinusoidal embedding (SDXL: 256)
    deepest_transformer_layers: int = 2  # transformer layers of the lowest-resolution blocks (SDXL: 10)
    # The second encoder's width, when it differs from the first's as in SDXL (1280 and 768):
    # diffusers' single-file loader tells the two encoders of a file apart by their widths.
    text_hidden_2: int | None = None


def _text_encoder(spec: TinySpec, tokenizer: CLIPTokenizer, kind=CLIPTextModel):
    return kind(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.text_hidden,
            intermediate_size=spec.text_hidden * 4,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=spec.text_heads,
            max_position_embeddings=spec.max_tokens,
            projection_dim=spec.text_hidden,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def _vae(spec: TinySpec, **sdxl) -> AutoencoderKL:
    n_vae = len(spec.vae_channels)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * n_vae,
        up_block_types=("UpDecoderBlock2D",) * n_vae,
        block_out_channels=spec.vae_channels,
        latent_channels=spec.latent_channels,
        norm_num_groups=spec.norm_groups,
        sample_size=spec.resolution,
        **sdxl,
    )


def _unet(spec: TinySpec, down_blocks: tuple[str, ...], cross_attention_dim: int, **sdxl) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=spec.resolution // 2 ** (len(spec.vae_channels) - 1),
        in_channels=spec.latent_channels,
        out_channels=spec.latent_channels,
        down_block_types=down_blocks,
        up_block_types=tuple(name.replace("Down", "Up") for name in reversed(down_blocks)),
        block_out_channels=spec.unet_channels,
        layers_per_block=spec.layers_per_block,
        norm_num_groups=spec.norm_groups,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=spec.attention_head_dim,
        **sdxl,
    )


# SD's noise schedule (SDXL's too); `steps_offset` because DDIM and friends derived from it need it.
SD_SCHEDULE = dict(
    num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
    steps_offset=1, prediction_type="epsilon",
)


def build_tiny_pipeline(spec: TinySpec = TinySpec(), seed: int = 0) -> StableDiffusionPipeline:
    """Random-weight pipeline; unless `spec.sd_block_order`, cross-attention is kept out of the
    highest-resolution block and put in the lowest-resolution one instead."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(spec.words, spec.max_tokens)
    text_encoder = _text_encoder(spec, tokenizer)
    vae = _vae(spec)
    n_unet = len(spec.unet_channels)
    attention, plain = ("CrossAttnDownBlock2D",) * (n_unet - 1), ("DownBlock2D",)
    unet = _unet(spec, attention + plain if spec.sd_block_order else plain + attention, spec.text_hidden)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDPMScheduler(clip_sample=False, **SD_SCHEDULE),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sdxl_pipeline(spec: TinySDXLSpec = TinySDXLSpec(), seed: int = 0) -> StableDiffusionXLPipeline:
    """Random-weight SDXL pipeline, saved with SDXL's own scheduler class and VAE scaling."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(spec.words, spec.max_tokens)
    text_encoder = _text_encoder(spec, tokenizer)
    second = replace(spec, text_hidden=spec.text_hidden_2 or spec.text_hidden)
    text_encoder_2 = _text_encoder(second, tokenizer, CLIPTextModelWithProjection)
    n_unet = len(spec.unet_channels)
    unet = _unet(
        spec, ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n_unet - 1), spec.text_hidden + second.text_hidden,
        transformer_layers_per_block=(1,) * (n_unet - 1) + (spec.deepest_transformer_layers,),
        use_linear_projection=True,
        addition_embed_type=ADDITION_EMBED_TYPE,
        addition_time_embed_dim=spec.size_embed_dim,
        projection_class_embeddings_input_dim=SIZE_IDS * spec.size_embed_dim + second.text_hidden,
    )
    return StableDiffusionXLPipeline(
        vae=_vae(spec, scaling_factor=SDXL_VAE_SCALING),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(timestep_spacing="leading", **SD_SCHEDULE),
        add_watermarker=False,
    )


def save_tiny_pipeline(directory: str | Path, spec: TinySpec = TinySpec(), seed: int = 0) -> Path:
    """Build a tiny pipeline (SDXL-shaped for a `TinySDXLSpec`) and save it as a diffusers
    folder; returns the folder."""
    directory = Path(directory)
    build = build_tiny_sdxl_pipeline if isinstance(spec, TinySDXLSpec) else build_tiny_pipeline
    build(spec, seed).save_pretrained(directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir")
    parser.add_argument("--resolution", type=int, default=TinySpec.resolution)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sdxl", action="store_true", help="SDXL's architecture (two text encoders, size conditioning)")
    args = parser.parse_args()
    spec = (TinySDXLSpec if args.sdxl else TinySpec)(resolution=args.resolution)
    path = save_tiny_pipeline(args.output_dir, spec, args.seed)
    print(f"saved a random tiny pipeline to {path}")


if __name__ == "__main__":
    main()
