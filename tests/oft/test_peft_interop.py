"""conftrl <-> PEFT (current release): adapters move both ways with the same outputs."""

import warnings

import pytest
import torch
from torch import nn

from conftrl import OFTConfig, OFTModel

peft = pytest.importorskip("peft")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(32, 48)
        self.down = nn.Linear(48, 16)
        self.conv = nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


LINEARS = ["up", "down"]


def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def randomize(parameters, scale: float) -> None:
    torch.manual_seed(5)
    with torch.no_grad():
        for p in parameters:
            p.normal_(0, scale)


def peft_config(**kwargs):
    kwargs.setdefault("oft_block_size", 0)
    return peft.OFTConfig(**kwargs)


def load_in_peft(directory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(net(), str(directory)).eval()


@pytest.mark.parametrize(
    "options",
    [
        dict(use_cayley_neumann=False),
        dict(use_cayley_neumann=True),
        dict(use_cayley_neumann=False, coft=True, eps=5e-3),
        dict(use_cayley_neumann=False, block_share=True),
    ],
    ids=["exact", "neumann", "coft", "block_share"],
)
def test_conftrl_adapter_gives_same_outputs_in_peft(options, tmp_path):
    x = torch.randn(6, 32)
    wrapped = OFTModel(net(), OFTConfig(r=4, target_modules=LINEARS, **options))
    randomize([p for p in wrapped.parameters() if p.requires_grad], 0.05)
    with torch.no_grad():
        expected = wrapped(x)
    wrapped.save_pretrained(tmp_path)
    with torch.no_grad():
        got = load_in_peft(tmp_path)(x)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(expected, net()(x), atol=1e-3)  # the adapter does something


@pytest.mark.parametrize(
    "options",
    [dict(use_cayley_neumann=False), dict(use_cayley_neumann=True), dict(use_cayley_neumann=False, coft=True, eps=1e-2)],
    ids=["exact", "neumann", "coft"],
)
def test_peft_adapter_gives_same_outputs_in_conftrl(options, tmp_path):
    x = torch.randn(6, 32)
    model = peft.get_peft_model(net(), peft_config(r=4, target_modules=LINEARS, **options)).eval()
    randomize([p for n, p in model.named_parameters() if "oft_R" in n], 0.05)
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(str(tmp_path))
    loaded = OFTModel.from_pretrained(net(), tmp_path)
    with torch.no_grad():
        got = loaded(x)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(expected, net()(x), atol=1e-3)
    if options.get("coft"):
        # PEFT's radius eps / sqrt(n) is kept layer by layer
        assert loaded.peft_config["default"].eps == pytest.approx(1e-2 / 8**2)
        assert loaded.model.up.oft_R["default"].coft_radius == pytest.approx(1e-2 / 2)


def conv_outputs(model, x):
    with torch.no_grad():
        return model.conv(x) if hasattr(model, "conv") else model.model.conv(x)


def test_conv_adapter_matches_peft_merged_model_both_ways(tmp_path):
    """PEFT's unmerged k x k conv forward is wrong, so the comparison is with its merged weights."""
    x = torch.randn(2, 4, 7, 7)
    wrapped = OFTModel(net(), OFTConfig(r=4, target_modules=["conv"]))
    randomize([p for p in wrapped.parameters() if p.requires_grad], 0.05)
    expected = conv_outputs(wrapped, x)
    wrapped.save_pretrained(tmp_path / "conftrl")
    merged_in_peft = load_in_peft(tmp_path / "conftrl").merge_and_unload()
    assert torch.allclose(conv_outputs(merged_in_peft, x), expected, atol=1e-5)

    model = peft.get_peft_model(net(), peft_config(r=4, target_modules=["conv"], use_cayley_neumann=False))
    randomize([p for n, p in model.named_parameters() if "oft_R" in n], 0.05)
    model.save_pretrained(str(tmp_path / "peft"))
    peft_merged = model.merge_and_unload()
    loaded = OFTModel.from_pretrained(net(), tmp_path / "peft")
    assert torch.allclose(conv_outputs(loaded, x), conv_outputs(peft_merged, x), atol=1e-5)


def test_unet_adapter_with_default_targets_loads_in_peft(tmp_path):
    from .conftest import tiny_unet, unet_inputs

    inputs = unet_inputs()
    wrapped = OFTModel(tiny_unet(), OFTConfig(r=4))
    randomize([p for p in wrapped.parameters() if p.requires_grad], 0.02)
    with torch.no_grad():
        expected = wrapped(*inputs).sample
    wrapped.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_peft = peft.PeftModel.from_pretrained(tiny_unet(), str(tmp_path)).eval()
    with torch.no_grad():
        got = in_peft.base_model.model(*inputs).sample
    assert torch.allclose(got, expected, atol=1e-5)
