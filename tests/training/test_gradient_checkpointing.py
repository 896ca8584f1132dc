"""ControlModule with gradient checkpointing (as `model=sd15` trains): plain gradients, each OFT
block built once per step, and a module that still pickles for spawned workers."""

from __future__ import annotations

import pickle

import pytest
import torch
from hydra.utils import instantiate

from conftrl.diffusion import load_base
from conftrl.oft import OFTRotation
from conftrl.training.module import ControlModule


def _batch() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "image": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
        "control": torch.rand(2, 3, 32, 32, generator=g),
        "caption": ["a red circle on a gray background", "a blue square on a white background"],
    }


def _trainable_gradients(module: ControlModule) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["coft", "lora"])
def test_checkpointed_loss_has_the_plain_gradients(make_config, tiny_base, method, counted_cayley):
    config = make_config(f"method={method}").method
    plain, checkpointed = (
        ControlModule(load_base(tiny_base), instantiate(config), gradient_checkpointing=flag) for flag in (False, True)
    )
    torch.manual_seed(0)
    for parameter in plain.parameters():
        if parameter.requires_grad:
            torch.nn.init.normal_(parameter, std=0.02)  # away from the identity / zero init
    checkpointed.load_state_dict(plain.state_dict())

    gradients = []
    for module in (plain, checkpointed):
        counted_cayley[0] = 0
        module.diffusion_loss(_batch(), torch.Generator().manual_seed(1)).backward()
        gradients.append(_trainable_gradients(module))
        rotations = sum(isinstance(m, OFTRotation) for m in module.unet.modules())
        assert counted_cayley[0] == rotations  # once each, also where the forward was recomputed

    assert gradients[0].keys() == gradients[1].keys()
    for name in gradients[0]:
        torch.testing.assert_close(gradients[1][name], gradients[0][name], rtol=1e-5, atol=1e-7, msg=name)
    assert any(g.abs().sum() > 0 for name, g in gradients[1].items() if not name.startswith("control."))

    clone = pickle.loads(pickle.dumps(checkpointed))  # DDP's spawned workers receive it pickled
    for module in (checkpointed, clone):
        module.zero_grad(set_to_none=True)
        module.diffusion_loss(_batch(), torch.Generator().manual_seed(1)).backward()
    torch.testing.assert_close(_trainable_gradients(clone), _trainable_gradients(checkpointed), rtol=0, atol=0)
