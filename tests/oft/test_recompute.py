"""Checkpointing that keeps the Cayley blocks: the gradients of plain backward, one transform per
layer and step instead of two."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from conftrl.oft import OFTConfig, OFTModel, OFTRotation, checkpoint_keeping_rotations
from tests.oft.conftest import tiny_unet, unet_inputs


def _gradients(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([m.weight.grad.flatten() for m in model.modules() if isinstance(m, OFTRotation)])


@pytest.mark.parametrize("coft", [False, True])
def test_keeping_rotations_gives_plain_gradients_with_one_transform_per_layer(stack, stack_input, counted_cayley, coft):
    model = OFTModel(stack, OFTConfig(r=2, target_modules=["proj", "mlp.0", "mlp.2"], init_weights=False,
                                      coft=coft, eps=1e-2))
    layers = 3

    model(stack_input).square().sum().backward()
    plain = _gradients(model)
    assert counted_cayley[0] == layers

    for function, transforms in [(checkpoint, 2 * layers), (checkpoint_keeping_rotations, layers)]:
        model.zero_grad(set_to_none=True)
        counted_cayley[0] = 0
        kwargs = {"use_reentrant": False} if function is checkpoint else {}
        function(model, stack_input, **kwargs).square().sum().backward()
        assert counted_cayley[0] == transforms, function.__name__
        torch.testing.assert_close(_gradients(model), plain, rtol=0, atol=1e-7)


def test_a_checkpointed_unet_keeps_its_rotations(counted_cayley):
    """As ControlModule sets it up: diffusers' checkpointing of each block, with this function."""
    unet = tiny_unet()
    wrapped = OFTModel(unet, OFTConfig(r=4, init_weights=False))
    layers = sum(isinstance(m, OFTRotation) for m in wrapped.modules())
    inputs = unet_inputs()

    wrapped(*inputs).sample.square().mean().backward()
    plain = _gradients(wrapped)
    for function, transforms in [(None, 2 * layers), (checkpoint_keeping_rotations, layers)]:
        unet.enable_gradient_checkpointing(function)
        wrapped.zero_grad(set_to_none=True)
        counted_cayley[0] = 0
        wrapped(*inputs).sample.square().mean().backward()
        assert counted_cayley[0] == transforms
        torch.testing.assert_close(_gradients(wrapped), plain, rtol=0, atol=1e-7)


class _Twice(torch.nn.Module):
    """One layer applied twice in a forward: both uses share one build of its blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(torch.tanh(self.layer(x)))


def test_accumulating_two_checkpointed_calls_before_one_backward(counted_cayley):
    """Each call keeps its own blocks: the second call's forward cannot leak into the first's
    recomputation, and a layer used twice in one call builds its blocks once."""
    torch.manual_seed(0)
    model = OFTModel(_Twice(), OFTConfig(r=2, target_modules=["layer"], init_weights=False))
    first, second = torch.randn(3, 16), torch.randn(5, 16)

    (model(first).sum() + model(second).square().sum()).backward()
    plain = _gradients(model)

    model.zero_grad(set_to_none=True)
    counted_cayley[0] = 0
    loss = checkpoint_keeping_rotations(model, first).sum()
    loss = loss + checkpoint_keeping_rotations(model, second).square().sum()
    loss.backward()
    assert counted_cayley[0] == 2  # one per call, none in either recomputation
    torch.testing.assert_close(_gradients(model), plain, rtol=1e-6, atol=1e-6)
