"""Adapters saved by the seed's own PEFT (0.8.2) load and reproduce that PEFT's recorded outputs.

The fixtures under fixtures/peft08/ were made by fixtures/make_peft08_fixtures.py with PEFT
0.8.2 itself; these tests need no old PEFT.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftrl import OFTConfig, OFTModel
from conftrl.oft.legacy import SEED_CONFIG_KEYS

from .fixtures.make_peft08_fixtures import CASES, TinyModel, base_model
from .fixtures.make_peft08_fixtures import OUT as FIXTURES

# fp32 outputs of magnitude ~1: PEFT and conftrl multiply in different orders.
TOLERANCE = 2e-6


def loaded(case: str, **options) -> OFTModel:
    model_class, _ = CASES[case]
    return OFTModel.from_pretrained(base_model(model_class), FIXTURES / case / "adapter", **options)


def recorded(case: str) -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / case / "outputs.safetensors")


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("case", sorted(CASES))
def test_seed_adapter_reproduces_peft_outputs_unmerged_and_merged(case):
    outputs = recorded(case)
    wrapped = loaded(case)
    config = wrapped.peft_config["default"]
    assert config.rotation_side == "output" and config.r == CASES[case][1]["r"]
    with torch.no_grad():
        assert torch.equal(base_model(CASES[case][0])(outputs["input"]), outputs["base"])
        unmerged = wrapped(outputs["input"])
        wrapped.merge_adapter()
        merged = wrapped(outputs["input"])
        wrapped.unmerge_adapter()
        restored = wrapped(outputs["input"])
    # The adapter moves the output far more than the tolerance: the comparison is meaningful.
    assert max_difference(outputs["unmerged"], outputs["base"]) > 1000 * TOLERANCE
    assert max_difference(unmerged, outputs["unmerged"]) < TOLERANCE
    assert max_difference(merged, outputs["merged"]) < TOLERANCE
    assert max_difference(restored, outputs["unmerged"]) < TOLERANCE
    plain = wrapped.merge_and_unload()
    with torch.no_grad():
        assert max_difference(plain(outputs["input"]), outputs["merged"]) < TOLERANCE


def test_coft_blocks_saved_outside_the_ball_are_projected_as_the_seed_does():
    """The fixture's saved blocks lie outside the ball (the script asserts it); PEFT rescales the
    whole stored matrix A to eps * b^2 / sqrt(n), not its skew part."""
    raw = load_file(FIXTURES / "coft" / "adapter" / "adapter_model.safetensors")
    wrapped = loaded("coft")
    eps = CASES["coft"][1]["eps"]
    outside = 0
    for name, layer in wrapped.oft_layers():
        rotation = layer.oft_R["default"]
        stored = raw[f"base_model.model.{name}.oft_r"]
        radius = eps * stored.shape[-1] ** 2 / stored.shape[0] ** 0.5
        assert rotation.coft_radius == pytest.approx(radius)
        outside += int((stored.flatten(1).norm(dim=1) > radius).sum())
        rotation.project_()
        assert torch.all(rotation.weight.flatten(1).norm(dim=1) <= radius * (1 + 1e-6))
    assert outside > 0


def test_seed_adapter_saves_back_in_its_own_format(tmp_path):
    source = FIXTURES / "coft" / "adapter"
    wrapped = loaded("coft")
    wrapped.save_pretrained(tmp_path)
    original_config = json.loads((source / "adapter_config.json").read_text())
    written_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(written_config) == set(original_config) == set(SEED_CONFIG_KEYS)
    for key in ("r", "eps", "coft", "block_share", "module_dropout", "peft_type"):
        assert written_config[key] == original_config[key]
    assert sorted(written_config["target_modules"]) == sorted(original_config["target_modules"])
    original, written = load_file(source / "adapter_model.safetensors"), load_file(tmp_path / "adapter_model.safetensors")
    assert original.keys() == written.keys()
    for key, tensor in written.items():
        # Saved as the seed saves: projected onto the COFT ball, otherwise unchanged.
        projected = tensor.flatten(1).norm(dim=1) < original[key].flatten(1).norm(dim=1)
        assert torch.equal(tensor[~projected], original[key][~projected])
    outputs = recorded("coft")
    reloaded = OFTModel.from_pretrained(base_model(TinyModel), tmp_path)
    with torch.no_grad():
        assert max_difference(reloaded(outputs["input"]), outputs["unmerged"]) < TOLERANCE


def test_seed_adapter_with_modules_to_save_round_trips_bit_identically(tmp_path):
    source = FIXTURES / "block_share" / "adapter"
    wrapped = loaded("block_share")
    wrapped.save_pretrained(tmp_path)
    original, written = load_file(source / "adapter_model.safetensors"), load_file(tmp_path / "adapter_model.safetensors")
    assert original.keys() == written.keys() and "base_model.model.head.weight" in written
    assert all(torch.equal(original[key], written[key]) for key in original)


def test_seed_adapter_trains_on(tmp_path):
    """A seed adapter loaded as trainable gets gradients on its whole stored blocks."""
    wrapped = loaded("linear_conv", is_trainable=True)
    wrapped.train()
    wrapped(recorded("linear_conv")["input"]).square().mean().backward()
    gradients = [layer.oft_R["default"].weight.grad for _, layer in wrapped.oft_layers()]
    assert all(g is not None and g.abs().max() > 0 for g in gradients)


def test_seed_layers_to_transform_selects_the_layers_the_seed_did():
    """Without layers_pattern the seed indexes the innermost numbered list (attentions.1 here);
    conftrl's own rule indexes the outer blocks, so the seed's adapter keeps the seed's."""
    assert sorted(name for name, _ in loaded("layers_to_transform").oft_layers()) == [
        "down_blocks.0.attentions.1.proj", "down_blocks.1.attentions.1.proj"
    ]
    model_class, options = CASES["layers_to_transform"]
    own = OFTModel(base_model(model_class), OFTConfig(**options))
    assert sorted(name for name, _ in own.oft_layers()) == [
        "down_blocks.1.attentions.0.proj", "down_blocks.1.attentions.1.proj"
    ]


def test_output_side_rotation_is_orthogonal_and_merges_exactly():
    """rotation_side='output' on a fresh model: W' = R^T W keeps column norms, merge = forward."""
    torch.manual_seed(0)
    model = TinyModel().eval()
    config = OFTConfig(r=2, target_modules=["conv", "proj"], rotation_side="output", init_weights=False)
    wrapped = OFTModel(model, config)
    image = torch.randn(2, 3, 8, 8)
    weight = model.proj.base_layer.weight.detach().clone()
    with torch.no_grad():
        unmerged = wrapped(image)
        wrapped.merge_adapter()
        merged_weight = model.proj.base_layer.weight.detach().clone()
        assert max_difference(wrapped(image), unmerged) < TOLERANCE
        wrapped.unmerge_adapter()
    assert not torch.allclose(merged_weight, weight, atol=1e-3)
    assert torch.allclose(merged_weight.norm(dim=0), weight.norm(dim=0), atol=1e-5)  # R^T W: columns rotate
    assert torch.allclose(model.proj.base_layer.weight, weight, atol=1e-6)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(r=0, oft_block_size=2), "neither oft_block_size"),
        (dict(r=2, use_cayley_neumann=True), "Cayley-Neumann"),
        (dict(r=5), "does not divide the layer's output size d=8"),
        (dict(r=2, rotation_side="sideways"), "rotation_side must be one of"),
    ],
)
def test_output_side_refuses_what_the_seed_cannot_express(options, message):
    with pytest.raises(ValueError, match=message):
        OFTModel(TinyModel(), OFTConfig(target_modules=["conv"], **{"rotation_side": "output", **options}))
