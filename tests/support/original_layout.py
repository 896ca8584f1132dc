"""A diffusers Stable-Diffusion folder written as one safetensors file in the original
(CompVis / LDM) key layout, as SD 1.x checkpoints are published, or an SDXL folder in SDXL's
(Stability's generative-models) layout: the inverse of the renaming diffusers' single-file
loader does, written out per block so the test does not borrow the code it checks."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
# SDXL's encoders: CLIP ViT-L in transformers' layout, OpenCLIP bigG in open_clip's.
SDXL_TEXT_PREFIX, SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."

UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",  # SDXL's size and pooled text
}  # fmt: skip
UNET_RESNET = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection",
}  # fmt: skip
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP_TOP = {
    "text_model.embeddings.token_embedding": "token_embedding", "text_model.final_layer_norm": "ln_final",
}  # fmt: skip
OPEN_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
}  # fmt: skip


def _rename(rest: str, table: dict[str, str]) -> str:
    for new, old in table.items():
        if rest == new or rest.startswith(new + "."):
            return old + rest[len(new) :]
    return rest


def _layer_key(blocks: str, index: int, kind: str, rest: str) -> str:
    """A resnet (sub-layer 0) or attention (sub-layer 1) of the original's input or output blocks."""
    return f"{blocks}.{index}.0.{_rename(rest, UNET_RESNET)}" if kind == "resnets" else f"{blocks}.{index}.1.{rest}"


def unet_key(key: str, layers_per_block: int, has_attentions: list[bool]) -> str:
    """The original name of a diffusers UNet2DConditionModel key."""
    per_block = layers_per_block + 1
    if match := re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        down, i, kind, j, rest = match[1] == "down", int(match[2]), match[3], int(match[4]), match[5]
        # Input block 0 is conv_in; each down block then has its layers and a downsampler.
        index = i * per_block + j + (1 if down else 0)
        return _layer_key("input_blocks" if down else "output_blocks", index, kind, rest)
    if match := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(match[1]) + 1) * per_block}.0.op.{match[2]}"
    if match := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        i = int(match[1])
        return f"output_blocks.{i * per_block + layers_per_block}.{2 if has_attentions[i] else 1}.conv.{match[2]}"
    if match := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(match[1])}.{_rename(match[2], UNET_RESNET)}"
    if match := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{match[1]}"
    return _rename(key, UNET_TOP)


def vae_key(key: str, num_blocks: int) -> str:
    """The original name of a diffusers AutoencoderKL key."""
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    if match := re.match(r"encoder\.down_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0)\.(.*)", key):
        part = f"block.{match[3]}" if match[3] is not None else "downsample"
        return f"encoder.down.{match[1]}.{part}.{match[4]}"
    if match := re.match(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)", key):
        part = f"block.{match[3]}" if match[3] is not None else "upsample"
        return f"decoder.up.{num_blocks - 1 - int(match[1])}.{part}.{match[4]}"
    if match := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"{match[1]}.mid.block_{int(match[2]) + 1}.{match[3]}"
    if match := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
        return f"{match[1]}.mid.attn_1.{_rename(match[2], VAE_ATTENTION)}"
    return key


def open_clip_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModelWithProjection's weights in open_clip's layout: one packed
    q/k/v projection per layer, the position embedding a plain tensor, the projection transposed."""
    out = {}
    for key, value in state.items():
        if match := re.match(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", key):
            layer, kind = match[1], match[2]
            parts = [state[f"text_model.encoder.layers.{layer}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(parts)
        elif match := re.match(r"text_model\.encoder\.layers\.(\d+)\.(.*)", key):
            if not re.match(r"self_attn\.[kv]_proj", match[2]):
                out[f"transformer.resblocks.{match[1]}.{_rename(match[2], OPEN_CLIP_LAYER)}"] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T
        elif not key.endswith("position_ids"):
            out[_rename(key, OPEN_CLIP_TOP)] = value
    return out


def _text_model_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIPTextModel's weights under `text_model.`, as the original files name them."""
    return {("" if key.startswith("text_model.") else "text_model.") + key: value for key, value in state.items()}


def save_original_checkpoint(folder: Path, path: Path) -> Path:
    """The UNet, VAE and text encoder(s) of the diffusers folder `folder` as one original-layout file."""
    import json

    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    has_attentions = ["CrossAttn" in kind for kind in unet_config["up_block_types"]]
    state = {}
    for key, value in load_file(folder / "unet" / "diffusion_pytorch_model.safetensors").items():
        state[UNET_PREFIX + unet_key(key, unet_config["layers_per_block"], has_attentions)] = value
    for key, value in load_file(folder / "vae" / "diffusion_pytorch_model.safetensors").items():
        original = vae_key(key, len(vae_config["block_out_channels"]))
        if ".mid.attn_1." in original and value.ndim == 2:  # 1×1 convolutions in the original
            value = value[:, :, None, None]
        state[VAE_PREFIX + original] = value
    text = _text_model_keys(load_file(folder / "text_encoder" / "model.safetensors"))
    sdxl = (folder / "text_encoder_2").is_dir()
    state |= {(SDXL_TEXT_PREFIX if sdxl else TEXT_PREFIX) + key: value for key, value in text.items()}
    if sdxl:
        second = open_clip_state(load_file(folder / "text_encoder_2" / "model.safetensors"))
        state |= {SDXL_OPEN_CLIP_PREFIX + key: value for key, value in second.items()}
    save_file({key: value.contiguous() for key, value in state.items()}, path)
    return path
