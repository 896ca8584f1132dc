"""The paper's control encoder: a small conv net from the control image to UNet features."""

from __future__ import annotations

import math

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

# Hidden widths of the paper's 8 convs (3->16->16->32->32->96->96->256->320);
# the stride-2 convs are those at STRIDE_POSITIONS, one per halving of the resolution.
PAPER_WIDTHS = (16, 16, 32, 32, 96, 96, 256)
STRIDE_POSITIONS = (2, 4, 6)


def zero_conv(channels_in: int, channels_out: int, stride: int = 1) -> nn.Conv2d:
    """Zero-initialised so the control path starts as an exact no-op on the base model."""
    conv = nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ControlEncoder(ModelMixin, ConfigMixin):
    """Maps a control image (B×3×H×W in [0,1]) to features at the UNet's `conv_in` resolution.

    With `scale_channels`, it also emits one feature map per UNet down block (multi-scale
    variant): each extra scale is a conv from the previous scale (stride 2 where the block
    halves the resolution) followed by a zero conv.

    With `latent_channels`, it also sees the UNet's input (the noisy latent), as a ControlNet
    does: a conv of the latent is added to the control's features before the zero convs, so
    the features can depend on the denoising state. That conv starts at zero: a new encoder
    computes what the control-only encoder would from the same seed, and learns how far to
    follow the latent, instead of starting with the control drowned in the latent's features.
    """

    @register_to_config
    def __init__(
        self,
        out_channels: int = 320,
        downsample_factor: int = 8,
        control_channels: int = 3,
        widths: tuple[int, ...] = PAPER_WIDTHS,
        scale_channels: tuple[int, ...] = (),
        scale_strides: tuple[int, ...] = (),
        latent_channels: int = 0,
    ):
        super().__init__()
        halvings = int(math.log2(downsample_factor))
        if 2**halvings != downsample_factor or halvings > len(STRIDE_POSITIONS):
            raise ValueError(f"downsample_factor must be 1, 2, 4 or 8, got {downsample_factor}")
        strides = [2 if i in STRIDE_POSITIONS[:halvings] else 1 for i in range(len(widths))]
        layers, channels = [], control_channels
        for width, stride in zip(widths, strides):
            layers += [nn.Conv2d(channels, width, 3, stride=stride, padding=1), nn.SiLU()]
            channels = width
        self.stem = nn.Sequential(*layers)
        self.out = zero_conv(channels, out_channels)
        self.scales = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, channels, 3, stride=s, padding=1), nn.SiLU())
            for s in scale_strides
        )
        self.scale_outs = nn.ModuleList(zero_conv(channels, c) for c in scale_channels)
        self._init_hidden_convs()
        # Made last, so that the random draws above are the control-only encoder's.
        self.latent_in = zero_conv(latent_channels, channels) if latent_channels else None

    def _init_hidden_convs(self) -> None:
        """Variance-preserving init for the SiLU convs. Near zero SiLU(x) ~ x/2, so a conv must
        double its input's scale to keep it: std 2/sqrt(fan_in). With PyTorch's default init the
        seven hidden convs shrank a sparse edge map to ~1 % of its scale before the zero conv
        (measured RMS 0.04), and the zero conv, whose gradient is proportional to its input,
        barely learned."""
        for module in [*self.stem, *self.scales.modules()]:
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                nn.init.normal_(module.weight, 0.0, 2.0 / math.sqrt(fan_in))
                nn.init.zeros_(module.bias)

    @property
    def sees_latent(self) -> bool:
        return self.latent_in is not None

    def forward(self, control: torch.Tensor, latent: torch.Tensor | None = None) -> list[torch.Tensor]:
        """One feature map per scale; `latent` (the UNet's input, B×C×h×w) iff `sees_latent`."""
        if self.sees_latent != (latent is not None):
            needs = "needs the UNet's input latent" if self.sees_latent else "takes no latent"
            raise ValueError(f"this control encoder {needs} (latent_channels={self.config.latent_channels})")
        hidden = self.stem(control)
        if latent is not None:
            hidden = hidden + self.latent_in(latent)
        features = [self.out(hidden)]
        for scale, out in zip(self.scales, self.scale_outs):
            hidden = scale(hidden)
            features.append(out(hidden))
        return features


def encoder_for_unet(
    unet,
    vae_scale_factor: int,
    multiscale: bool = False,
    widths: tuple[int, ...] | None = None,
    sees_latent: bool = False,
) -> ControlEncoder:
    """Size the encoder from the UNet it feeds: SD 1.5 gets the paper's widths; a narrower
    UNet gets them capped at its `conv_in` width, unless `widths` (one per hidden conv) says
    otherwise. With `sees_latent`, it also takes the UNet's input."""
    out_channels = unet.conv_in.out_channels
    blocks = list(unet.down_blocks) if multiscale else []
    if widths is None:
        widths = tuple(min(w, out_channels) for w in PAPER_WIDTHS)
    elif len(widths) != len(PAPER_WIDTHS):
        raise ValueError(f"expected {len(PAPER_WIDTHS)} control encoder widths, one per hidden conv, got {list(widths)}")
    return ControlEncoder(
        out_channels=out_channels,
        downsample_factor=vae_scale_factor,
        widths=tuple(widths),
        scale_channels=tuple(unet.config.block_out_channels[: len(blocks)]),
        scale_strides=tuple(1 if block.downsamplers is None else 2 for block in blocks),
        latent_channels=unet.config.in_channels if sees_latent else 0,
    )
