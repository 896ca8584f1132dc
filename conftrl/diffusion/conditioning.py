"""What the UNet is conditioned on besides the noisy latent, the timestep and the control.

A base model turns a batch's prompts (and, for SDXL, each image's size and crop) into one
`Conditioning`; the training step, the control paths and the samplers pass it to the UNet
(or a ControlNet) as keyword arguments, and never ask which kind of base made it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# The batch keys a datamodule reports each training image's geometry under (B×2 each).
ORIGINAL_SIZE, CROP_TOP_LEFT = "original_size", "crop_top_left"


@dataclass
class Conditioning:
    """Token embeddings the UNet cross-attends to, and any added conditioning: SDXL's pooled
    text embedding and size ids (diffusers' `added_cond_kwargs`)."""

    text: torch.Tensor
    added: dict[str, torch.Tensor] = field(default_factory=dict)

    def unet_kwargs(self) -> dict:
        """Keyword arguments of a `UNet2DConditionModel` or `ControlNetModel` call."""
        return {"encoder_hidden_states": self.text, **({"added_cond_kwargs": self.added} if self.added else {})}


@dataclass(frozen=True)
class SizeConditions:
    """Where each training image came from (SDXL's size and crop conditioning): its size
    before resizing, the top-left corner of its crop in the resized image, and the size the
    model sees. Rows are (height, width) and (top, left), in pixels."""

    original_size: torch.Tensor  # B×2
    crop_top_left: torch.Tensor  # B×2
    target_size: tuple[int, int]

    @classmethod
    def of(cls, batch: dict) -> SizeConditions | None:
        """The batch's conditions, or None when its datamodule reports no geometry."""
        if ORIGINAL_SIZE not in batch or CROP_TOP_LEFT not in batch:
            return None
        height, width = batch["image"].shape[-2:]
        return cls(batch[ORIGINAL_SIZE], batch[CROP_TOP_LEFT], (int(height), int(width)))

    def time_ids(self) -> torch.Tensor:
        """B×6 rows (original h, w, crop top, left, target h, w), SDXL's `time_ids`."""
        target = torch.tensor(self.target_size, device=self.original_size.device)
        target = target.expand(len(self.original_size), 2)
        return torch.cat([self.original_size, self.crop_top_left, target], dim=1)
