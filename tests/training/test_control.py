"""The control encoder and the hooks that add its features to the UNet."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftrl.control import ControlEncoder, build_control_path, load_control_path
from conftrl.diffusion import load_base
from conftrl.diffusion.conditioning import Conditioning
from conftrl.diffusion.sampling import sample_images


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


@pytest.mark.parametrize(
    "kind, sees_latent",
    [("conv_in", False), ("multiscale", False), ("multiscale", True), ("controlnet", False)],
    ids=["conv_in", "multiscale", "multiscale_sees_latent", "controlnet"],
)
def test_a_fresh_control_path_leaves_the_unet_unchanged_and_learns(tiny_base, kind, sees_latent):
    base = load_base(tiny_base)
    path = build_control_path(kind, base.unet, base.vae_scale_factor, sees_latent=sees_latent)
    noisy, t, text = torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), torch.randn(2, 12, 32)
    control = torch.rand(2, 3, 32, 32)
    plain = base.unet(noisy, t, text).sample
    controlled = path.predict(base.unet, noisy, t, Conditioning(text), control)
    torch.testing.assert_close(controlled, plain)
    controlled.square().sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in path.parameters())


def test_chosen_widths_size_the_encoder_and_load_back_with_it(tiny_base, tmp_path):
    base = load_base(tiny_base)
    widths = (16, 16, 32, 32, 96, 96, 256)  # the paper's, not capped at the tiny UNet's 32
    path = _randomised(build_control_path("multiscale", base.unet, base.vae_scale_factor, widths))
    convs = [m for m in path.encoder.stem if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == list(widths)
    assert [m.in_channels for m in path.encoder.scale_outs] == [256] * len(base.unet.down_blocks)
    path.save(tmp_path)
    path.remove_hooks()
    loaded = load_control_path(tmp_path, base.unet)
    control = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        for saved, again in zip(path.encoder(control), loaded.encoder(control)):
            torch.testing.assert_close(again, saved, rtol=0, atol=0)


def test_an_encoder_that_sees_the_latent_encodes_each_unet_calls_input(tiny_base, tmp_path):
    base = load_base(tiny_base)
    path = _randomised(build_control_path("multiscale", base.unet, base.vae_scale_factor, sees_latent=True))
    assert path.encoder.latent_in.in_channels == base.unet.config.in_channels
    control, t, text = torch.rand(1, 3, 32, 32), torch.tensor([10]), torch.randn(1, 12, 32)
    first, second = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    with torch.no_grad(), path.applied(control, scale=0.5):
        assert path.features is None  # nothing to encode before the UNet runs
        for latent in (first, second):
            base.unet(latent, t, text)
            for added, expected in zip(path.features, path.encoder(control, latent)):
                torch.testing.assert_close(added, 0.5 * expected)
        assert not torch.allclose(path.encoder(control, first)[0], path.encoder(control, second)[0])
    assert path.features is None
    # Saved and loaded, the encoder still sees the latent and computes the same features.
    path.save(tmp_path)
    path.remove_hooks()
    loaded = load_control_path(tmp_path, base.unet)
    assert loaded.encoder.config.latent_channels == base.unet.config.in_channels
    with torch.no_grad():
        for saved, again in zip(path.encoder(control, first), loaded.encoder(control, first)):
            torch.testing.assert_close(again, saved, rtol=0, atol=0)


def test_a_new_encoder_that_sees_the_latent_computes_the_control_only_features():
    """Its latent conv starts at zero and its other weights are those the seed gives the
    control-only encoder: the latent changes nothing until the encoder has learned to use it."""
    torch.manual_seed(0)
    blind = ControlEncoder(32, 4, widths=(8,) * 7, scale_channels=(32, 64), scale_strides=(1, 2))
    torch.manual_seed(0)
    sees = ControlEncoder(32, 4, widths=(8,) * 7, scale_channels=(32, 64), scale_strides=(1, 2), latent_channels=4)
    for name, weight in blind.state_dict().items():
        torch.testing.assert_close(sees.state_dict()[name], weight, rtol=0, atol=0)
    assert torch.count_nonzero(sees.latent_in.weight) == 0
    for module in [blind.out, *blind.scale_outs]:
        nn.init.normal_(module.weight, std=0.1)  # the output convs opened, as after some training
    sees.load_state_dict(blind.state_dict(), strict=False)  # all but the latent conv
    control, latent = torch.rand(2, 3, 32, 32), torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        for expected, got in zip(blind(control), sees(control, latent)):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_an_encoder_is_given_the_latent_exactly_when_it_sees_it():
    sees, blind = ControlEncoder(32, 4, widths=(8,) * 7, latent_channels=4), ControlEncoder(32, 4, widths=(8,) * 7)
    control, latent = torch.rand(1, 3, 32, 32), torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="needs the UNet's input latent.*latent_channels=4"):
        sees(control)
    with pytest.raises(ValueError, match="takes no latent.*latent_channels=0"):
        blind(control, latent)


def test_widths_must_be_one_per_conv_and_are_not_controlnets(tiny_base):
    base = load_base(tiny_base)
    with pytest.raises(ValueError, match="expected 7 control encoder widths.*16, 32"):
        build_control_path("conv_in", base.unet, base.vae_scale_factor, (16, 32))
    with pytest.raises(ValueError, match="controlnet has none"):
        build_control_path("controlnet", base.unet, base.vae_scale_factor, (16,) * 7)
    with pytest.raises(ValueError, match="control_sees_latent.*a controlnet always sees the latent"):
        build_control_path("controlnet", base.unet, base.vae_scale_factor, sees_latent=True)


def _randomised(path: nn.Module) -> nn.Module:
    """The control path with random weights in its zero-initialised convs: control has an effect."""
    for module in path.modules():
        if isinstance(module, nn.Conv2d) and torch.count_nonzero(module.weight) == 0:
            nn.init.normal_(module.weight, std=0.1)
    return path


@pytest.mark.parametrize("sees_latent", [False, True], ids=["control_only", "sees_latent"])
def test_features_are_added_for_both_guidance_branches(tiny_base, sees_latent):
    base = load_base(tiny_base)
    path = _randomised(build_control_path("multiscale", base.unet, base.vae_scale_factor, sees_latent=sees_latent))
    noisy, t, text = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 12, 32)
    control = torch.rand(1, 3, 32, 32)
    single = path.predict(base.unet, noisy, t, Conditioning(text), control)
    with path.applied(control):  # a CFG batch [uncond; cond] of one control image
        doubled = base.unet(noisy.repeat(2, 1, 1, 1), t.repeat(2), text.repeat(2, 1, 1)).sample
    torch.testing.assert_close(doubled, single.repeat(2, 1, 1, 1), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(single, base.unet(noisy, t, text).sample)  # outside the block: no control


@pytest.mark.parametrize("sees_latent", [False, True], ids=["control_only", "sees_latent"])
def test_guided_encoder_control_enters_only_the_conditional_half(tiny_base, sees_latent):
    base = load_base(tiny_base)
    path = _randomised(build_control_path("multiscale", base.unet, base.vae_scale_factor, sees_latent=sees_latent))
    noisy, t, text = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 12, 32)
    control = torch.rand(1, 3, 32, 32)
    plain = base.unet(noisy, t, text).sample
    with torch.no_grad(), path.applied(control, scale=0.5):
        half = base.unet(noisy, t, text).sample
    with torch.no_grad():
        full = path.predict(base.unet, noisy, t, Conditioning(text), control)
    with torch.no_grad(), path.applied(control, scale=0.5, guided=True):  # [uncond; cond]
        guided = base.unet(noisy.repeat(2, 1, 1, 1), t.repeat(2), text.repeat(2, 1, 1)).sample
    torch.testing.assert_close(guided[:1], plain, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(guided[1:], half, atol=1e-5, rtol=1e-4)
    assert (half - plain).abs().max() > 1e-3 and (full - half).abs().max() > 1e-3


def test_guided_controlnet_residuals_are_scaled_and_zero_for_the_unconditional_half(tiny_base):
    base = load_base(tiny_base)
    path = _randomised(build_control_path("controlnet", base.unet, base.vae_scale_factor))
    noisy, t, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 10]), torch.randn(2, 12, 32)
    control = torch.rand(1, 3, 32, 32)

    def residuals():
        down, mid = path.controlnet(
            noisy, t, encoder_hidden_states=text, controlnet_cond=control.repeat(2, 1, 1, 1), return_dict=False
        )
        return [*down, mid]

    with torch.no_grad():
        plain = residuals()
        with path.applied(control, scale=3.0, guided=True):
            guided = residuals()
        with path.applied(control, scale=3.0):
            scaled = residuals()
    assert all(p.abs().max() > 0 for p in plain)
    for p, g, s in zip(plain, guided, scaled):
        assert torch.count_nonzero(g[:1]) == 0
        torch.testing.assert_close(g[1:], 3.0 * p[1:])
        torch.testing.assert_close(s, 3.0 * p)
    torch.testing.assert_close(residuals()[-1], plain[-1])  # the hook is gone after the block


@pytest.mark.parametrize("sees_latent", [False, True], ids=["control_only", "sees_latent"])
def test_guided_control_changes_samples_only_under_guidance(tiny_base, sees_latent):
    base = load_base(tiny_base)
    path = _randomised(build_control_path("multiscale", base.unet, base.vae_scale_factor, sees_latent=sees_latent))
    control, prompts, seeds = torch.rand(2, 3, 32, 32), ["a red circle"] * 2, [0, 1]

    def sample(**sampling):
        return sample_images(base, path, prompts, control, seeds, steps=2, **sampling).astype(int)

    assert np.abs(sample(cfg_scale=4.0, guide_control=True) - sample(cfg_scale=4.0)).max() > 0
    np.testing.assert_array_equal(sample(cfg_scale=1.0, guide_control=True), sample(cfg_scale=1.0))
