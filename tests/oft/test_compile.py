"""A torch.compile'd OFT-wrapped UNet runs and matches eager mode."""

import pytest
import torch

from conftrl import OFTConfig, OFTModel
from conftrl.oft import checkpoint_keeping_rotations

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


class _CheckpointedBlocks(torch.nn.Module):
    """Blocks run through `checkpoint_keeping_rotations`, as diffusers runs its checkpointed blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(96, 96), torch.nn.GELU()) for _ in range(2)
        )
        self.checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = checkpoint_keeping_rotations(block, x) if self.checkpointing else block(x)
        return x


@pytest.mark.slow
def test_compiled_checkpointing_that_keeps_the_blocks_matches_eager():
    torch.manual_seed(0)
    wrapped = OFTModel(_CheckpointedBlocks(), OFTConfig(target_modules=r"blocks\.\d\.0", r=1, init_weights=False))
    x = torch.randn(8, 96)
    gradients = []
    for checkpointing, model in [(False, wrapped), (True, torch.compile(wrapped))]:
        wrapped.model.checkpointing = checkpointing
        wrapped.zero_grad(set_to_none=True)
        model(x).square().sum().backward()
        gradients.append(torch.cat([p.grad.flatten() for p in wrapped.parameters() if p.requires_grad]))
    torch.testing.assert_close(gradients[1], gradients[0], atol=1e-5, rtol=1e-4)
