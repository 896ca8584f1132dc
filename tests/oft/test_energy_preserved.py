"""OFT and COFT keep every adapted layer's hyperspherical energy; an additive update does not."""

import copy

import pytest
import torch

from conftrl import OFTConfig, OFTModel
from conftrl.metrics import energy_summary

from .conftest import tiny_unet, unet_inputs


@pytest.mark.parametrize("options", [dict(), dict(coft=True, eps=1e-3), dict(block_share=True)], ids=["oft", "coft", "share"])
def test_training_steps_preserve_energy(options):
    base = tiny_unet()
    reference = energy_summary(copy.deepcopy(base))
    wrapped = OFTModel(base, OFTConfig(r=4, **options))
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        wrapped(*unet_inputs()).sample.square().mean().backward()
        optimizer.step()
    summary = energy_summary(wrapped.model, reference=reference)
    deviation = max(max(layer.rotation_deviation().values()) for _, layer in wrapped.oft_layers())
    assert deviation > 1e-2  # the layers really rotated
    assert max(abs(v) for v in summary.relative_change.values()) < 1e-5


def test_additive_update_changes_energy():
    base = tiny_unet()
    reference = energy_summary(copy.deepcopy(base))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, module in base.named_modules():
            if name.endswith("to_q"):
                d_out, d_in = module.weight.shape
                module.weight.add_(0.1 * torch.randn(d_out, 2) @ torch.randn(2, d_in))  # LoRA-like BA
    summary = energy_summary(base, reference=reference)
    assert max(abs(v) for v in summary.relative_change.values()) > 1e-3
