"""Small models for the OFT tests: plain torch stacks, a tiny UNet and a tiny CLIP text encoder."""

import pytest
import torch
from torch import nn


class Stack(nn.Module):
    """Linear and conv layers of several shapes, with an output head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv3 = nn.Conv2d(4, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 1)
        self.proj = nn.Linear(8, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(torch.relu(self.conv3(x)))
        h = h.mean(dim=(2, 3))
        h = self.proj(h)
        return self.head(self.mlp(h) + h)

    def get_output_embeddings(self) -> nn.Module:
        return self.head


@pytest.fixture
def stack() -> Stack:
    torch.manual_seed(0)
    return Stack()


@pytest.fixture
def stack_input() -> torch.Tensor:
    return torch.randn(3, 4, 6, 6, generator=torch.Generator().manual_seed(1))


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def unet_inputs(batch: int = 2):
    g = torch.Generator().manual_seed(2)
    return (
        torch.randn(batch, 4, 8, 8, generator=g),
        torch.tensor([10, 500])[:batch],
        torch.randn(batch, 5, 32, generator=g),
    )


def tiny_clip():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=16,
    )
    return CLIPTextModel(config).eval()
