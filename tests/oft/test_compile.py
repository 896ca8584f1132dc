"""A torch.compile'd OFT-wrapped UNet runs and matches eager mode."""

import pytest
import torch

from conftrl import OFTConfig, OFTModel

from .conftest import tiny_unet, unet_inputs


@pytest.mark.slow
def test_compiled_wrapped_unet_matches_eager():
    wrapped = OFTModel(tiny_unet(), OFTConfig(r=4, coft=True, eps=1e-2))
    torch.manual_seed(0)
    with torch.no_grad():
        for _, layer in wrapped.oft_layers():
            layer.oft_R["default"].weight.normal_(0, 0.01)
    inputs = unet_inputs()
    eager = wrapped(*inputs).sample
    compiled = torch.compile(wrapped)
    out = compiled(*inputs).sample
    assert torch.allclose(out, eager, atol=1e-4)
    out.square().mean().backward()
    grads = [p.grad for p in wrapped.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.slow
@pytest.mark.parametrize("computation", ["auto", "rotated_weight"])
def test_compiled_wide_blocks_match_eager(computation):
    """Blocks wider than 64 take the CPU's inversion by halving; compiled, it gives eager's
    output and gradients, also through the rotated-weight form's own backward."""
    torch.manual_seed(0)
    wrapped = OFTModel(torch.nn.Sequential(torch.nn.Linear(320, 16)), OFTConfig(target_modules=["0"], r=2))
    layer = next(layer for _, layer in wrapped.oft_layers())
    layer.computation = computation
    rotation = layer.oft_R["default"]
    with torch.no_grad():
        rotation.weight.normal_(0, 0.01)
    x = torch.randn(4, 320)
    gradients = []
    for model in (wrapped, torch.compile(wrapped)):
        out = model(x)
        out.square().sum().backward()
        gradients.append((out.detach(), rotation.weight.grad.clone()))
        rotation.weight.grad = None
    (eager, eager_grad), (compiled, compiled_grad) = gradients
    assert torch.allclose(compiled, eager, atol=1e-5)
    assert torch.allclose(compiled_grad, eager_grad, atol=1e-5, rtol=1e-4)
