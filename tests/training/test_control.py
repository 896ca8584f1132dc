"""The control encoder and the hooks that add its features to the UNet."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftrl.control import ControlEncoder, build_control_path
from conftrl.diffusion import load_base


def test_encoder_has_the_papers_eight_convs_for_sd15():
    encoder = ControlEncoder(out_channels=320, downsample_factor=8)
    convs = [m for m in encoder.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 16, 32, 32, 96, 96, 256, 320]
    assert [c.stride[0] for c in convs] == [1, 1, 2, 1, 2, 1, 2, 1]
    assert torch.count_nonzero(convs[-1].weight) == 0
    assert encoder(torch.rand(1, 3, 512, 512))[0].shape == (1, 320, 64, 64)


def test_encoder_rejects_a_factor_it_cannot_reach():
    with pytest.raises(ValueError, match="downsample_factor"):
        ControlEncoder(downsample_factor=3)


@pytest.mark.parametrize("kind", ["conv_in", "multiscale", "controlnet"])
def test_a_fresh_control_path_leaves_the_unet_unchanged_and_learns(tiny_base, kind):
    base = load_base(tiny_base)
    path = build_control_path(kind, base.unet, base.vae_scale_factor)
    noisy, t, text = torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), torch.randn(2, 12, 32)
    control = torch.rand(2, 3, 32, 32)
    plain = base.unet(noisy, t, text).sample
    controlled = path.predict(base.unet, noisy, t, text, control)
    torch.testing.assert_close(controlled, plain)
    controlled.square().sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in path.parameters())


def test_features_are_added_for_both_guidance_branches(tiny_base):
    base = load_base(tiny_base)
    path = build_control_path("multiscale", base.unet, base.vae_scale_factor)
    for conv in path.encoder.modules():
        if isinstance(conv, nn.Conv2d):
            nn.init.normal_(conv.weight, std=0.05)
    noisy, t, text = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 12, 32)
    control = torch.rand(1, 3, 32, 32)
    single = path.predict(base.unet, noisy, t, text, control)
    with path.applied(control):  # a CFG batch [uncond; cond] of one control image
        doubled = base.unet(noisy.repeat(2, 1, 1, 1), t.repeat(2), text.repeat(2, 1, 1)).sample
    torch.testing.assert_close(doubled, single.repeat(2, 1, 1, 1), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(single, base.unet(noisy, t, text).sample)  # outside the block: no control
