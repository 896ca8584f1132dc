"""OFTModel: targeting, adapter management, training invariants, save / load."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftrl import OFTConfig, OFTModel
from conftrl.oft import OFTLayer
from conftrl.oft import config as config_module

from .conftest import tiny_clip, tiny_unet, unet_inputs


def adapted_names(wrapped: OFTModel) -> list[str]:
    return sorted(name for name, _ in wrapped.oft_layers())


def randomize(wrapped: OFTModel, scale: float = 0.2, adapter: str = "default") -> None:
    torch.manual_seed(3)
    with torch.no_grad():
        for _, layer in wrapped.oft_layers():
            if adapter in layer.oft_R:
                layer.oft_R[adapter].weight.normal_(0, scale)


def test_seed_defaults():
    config = OFTConfig()
    assert (config.r, config.eps, config.module_dropout, config.coft, config.block_share) == (8, 6e-5, 0.0, False, False)
    assert config.init_weights and config.target_modules is None and config.peft_type == "OFT"
    with pytest.raises(ValueError, match="exactly one of r"):
        OFTConfig(r=4, oft_block_size=8)
    with pytest.raises(ValueError, match="layers_to_transform"):
        OFTConfig(layers_pattern="layers")


def test_alpha_pattern_is_accepted_as_the_seed_does_with_one_warning(stack, stack_input, monkeypatch):
    monkeypatch.setattr(config_module, "_warned", set())
    with pytest.warns(UserWarning, match="alpha_pattern has no effect on OFT") as caught:
        config = OFTConfig(r=2, target_modules="all-linear", init_weights=False, alpha_pattern={"proj": 2})
        OFTConfig(alpha_pattern={"mlp.0": 4})
    assert len(caught) == 1 and config.alpha_pattern == {"proj": 2}
    torch.manual_seed(0)
    with_pattern = OFTModel(copy.deepcopy(stack), config)
    torch.manual_seed(0)
    without = OFTModel(copy.deepcopy(stack), OFTConfig(r=2, target_modules="all-linear", init_weights=False))
    assert torch.equal(with_pattern(stack_input), without(stack_input))


def test_adapters_added_to_a_model_in_eval_mode_never_drop(stack, stack_input):
    """Module dropout is for training: an adapter loaded into an eval model must not skip."""
    options = dict(r=2, target_modules="all-linear", modules_to_save=["head"])
    reference = OFTModel(copy.deepcopy(stack), OFTConfig(**options, init_weights=False))
    randomize(reference)
    reference.eval()
    expected = reference(stack_input)
    wrapped = OFTModel(copy.deepcopy(stack).eval(), OFTConfig(**options, module_dropout=0.9))
    wrapped.load_state_dict(reference.state_dict())
    assert all(not m.training for m in wrapped.modules())
    assert all(torch.equal(wrapped(stack_input), expected) for _ in range(5))


def test_target_rules(stack):
    assert adapted_names(OFTModel(copy.deepcopy(stack), OFTConfig(r=2, target_modules=r"mlp\.[02]"))) == ["mlp.0", "mlp.2"]
    assert adapted_names(OFTModel(copy.deepcopy(stack), OFTConfig(r=2, target_modules=["0", "proj"]))) == ["mlp.0", "proj"]
    # all-linear: every Linear except the output head
    assert adapted_names(OFTModel(copy.deepcopy(stack), OFTConfig(r=2, target_modules="all-linear"))) == [
        "mlp.0", "mlp.2", "proj"
    ]
    excluded = OFTModel(copy.deepcopy(stack), OFTConfig(r=2, target_modules="all-linear", exclude_modules=["proj"]))
    assert adapted_names(excluded) == ["mlp.0", "mlp.2"]


def test_no_match_and_unknown_architecture_are_explained(stack):
    with pytest.raises(TypeError, match="mlp.1: OFT supports nn.Linear and nn.Conv2d, not GELU"):
        OFTModel(copy.deepcopy(stack), OFTConfig(r=2, target_modules=r"mlp\.\d"))
    with pytest.raises(ValueError, match=r"matched no module.*mlp\.0"):
        OFTModel(stack, OFTConfig(r=2, target_modules=["to_q"]))
    with pytest.raises(ValueError, match="no default targets for Stack"):
        OFTModel(stack, OFTConfig(r=2))


def test_default_targets_for_unet_and_clip():
    unet = OFTModel(tiny_unet(), OFTConfig(r=4))
    names = adapted_names(unet)
    kinds = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "ff.net.0.proj")
    assert all(any(name.endswith(kind) for name in names) for kind in kinds)
    assert len(names) == 4 * 9  # down 1 + mid 1 + up 2 transformer blocks x (2 attentions x 4 + GEGLU)
    assert not any(name.endswith(("proj_in", "proj_out", "ff.net.2")) or "resnets" in name for name in names)
    clip = OFTModel(tiny_clip(), OFTConfig(r=4))
    assert len(adapted_names(clip)) == 3 * 6


def test_layers_to_transform_and_rank_pattern():
    config = OFTConfig(r=4, target_modules=["q_proj", "fc1"], layers_to_transform=[0, 2], layers_pattern="layers",
                       rank_pattern={"fc1": 8})
    wrapped = OFTModel(tiny_clip(), config)
    names = adapted_names(wrapped)
    assert [n.split("layers.", 1)[1] for n in names] == [f"{i}.{m}" for i in (0, 2) for m in ("mlp.fc1", "self_attn.q_proj")]
    fc1, q = (wrapped.model.get_submodule(n) for n in names[:2])
    assert fc1.oft_R["default"].num_blocks == 8 and q.oft_R["default"].num_blocks == 4


@pytest.mark.parametrize(
    ("layers_pattern", "prefixes"),
    [(None, ("down_blocks.0.", "up_blocks.0.")), ("up_blocks", ("up_blocks.0.",)), (["down_blocks"], ("down_blocks.0.",))],
)
def test_layers_to_transform_on_a_unet_selects_by_block_index(layers_pattern, prefixes):
    """Block 0 of a UNet is down_blocks.0 and up_blocks.0 (mid_block has no index)."""
    targets = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "conv1", "conv2"]
    candidates = [n for n, _ in tiny_unet().named_modules() if n and any(n == t or n.endswith("." + t) for t in targets)]
    expected = sorted(n for n in candidates if n.startswith(prefixes))
    assert any(n.startswith("mid_block.") for n in candidates) and any(n.startswith("down_blocks.1.") for n in candidates)
    assert {n.split(".")[0] for n in expected} == {p.split(".")[0] for p in prefixes}
    config = OFTConfig(r=4, target_modules=targets, layers_to_transform=[0], layers_pattern=layers_pattern)
    assert adapted_names(OFTModel(tiny_unet(), config)) == expected


def test_only_adapter_parameters_change_during_training(stack, stack_input):
    wrapped = OFTModel(stack, OFTConfig(r=2, target_modules="all-linear", modules_to_save=["head"]))
    before = {k: v.clone() for k, v in wrapped.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        wrapped(stack_input).square().mean().backward()
        optimizer.step()
    changed = {k for k, v in wrapped.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".oft_R." in k or ".modules_to_save." in k for k in changed)
    assert {k for k in changed if ".oft_R." in k} == {k for k in before if ".oft_R." in k}


def test_trainable_parameter_count(stack):
    wrapped = OFTModel(stack, OFTConfig(r=2, target_modules=["proj", "mlp.0"]))
    trainable, total = wrapped.get_nb_trainable_parameters()
    # proj: d=8, b=4 -> 2*6; mlp.0: d=16, b=8 -> 2*28
    assert trainable == 2 * 6 + 2 * 28
    assert total == trainable + sum(p.numel() for p in Stack_params(wrapped))


def Stack_params(wrapped):
    return [p for n, p in wrapped.named_parameters() if ".oft_R." not in n]


def test_adapters_apply_in_order_and_merge_in_order(stack, stack_input):
    reference = copy.deepcopy(stack)
    wrapped = OFTModel(stack, OFTConfig(r=2, target_modules="all-linear"), "first")
    randomize(wrapped, adapter="first")
    wrapped.add_adapter("second", OFTConfig(r=4, target_modules=["proj", "mlp.2"]))
    randomize(wrapped, adapter="second")
    wrapped.set_adapter(["first", "second"])
    both = wrapped(stack_input)
    wrapped.set_adapter("first")
    only_first = wrapped(stack_input)
    assert not torch.allclose(both, only_first)
    wrapped.set_adapter(["first", "second"])
    with wrapped.disable_adapter():
        assert torch.allclose(wrapped(stack_input), reference(stack_input), atol=1e-6)
    wrapped.merge_adapter()
    assert torch.allclose(wrapped(stack_input), both, atol=1e-5)
    wrapped.unmerge_adapter()
    assert torch.allclose(wrapped(stack_input), both, atol=1e-5)
    wrapped.delete_adapter("second")
    assert wrapped.active_adapters == ["first"]
    assert torch.allclose(wrapped(stack_input), only_first, atol=1e-6)


@pytest.mark.filterwarnings("ignore:COFT adapter 'default' has block sizes")
def test_several_adapters_save_in_peft_layout_and_load_back(stack, stack_input, tmp_path):
    """"default" in the folder, every other adapter in a subfolder named after it, each in its
    own format (the seed's output-side adapter included); loading reproduces every combination."""
    pristine = copy.deepcopy(stack)
    wrapped = OFTModel(stack, OFTConfig(r=2, target_modules="all-linear", coft=True, eps=1e-2, modules_to_save=["head"]))
    wrapped.add_adapter("canny", OFTConfig(r=4, target_modules=["proj", "mlp.2"]))
    wrapped.add_adapter("seed", OFTConfig(r=2, target_modules=["proj", "mlp.0"], rotation_side="output"))
    for name in wrapped.peft_config:
        randomize(wrapped, adapter=name)
    combinations = ["default", "canny", "seed", ["default", "canny", "seed"]]
    expected = []
    for names in combinations:
        wrapped.set_adapter(names)
        expected.append(wrapped(stack_input))

    wrapped.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 2
    assert "oft_block_size" in json.loads((tmp_path / "canny" / "adapter_config.json").read_text())
    assert "oft_block_size" not in json.loads((tmp_path / "seed" / "adapter_config.json").read_text())
    loaded = OFTModel.from_pretrained(copy.deepcopy(pristine), tmp_path)
    loaded.load_adapter(tmp_path / "canny", "canny")
    loaded.load_adapter(tmp_path / "seed", "seed")
    for names, output in zip(combinations, expected):
        loaded.set_adapter(names)
        assert torch.allclose(loaded(stack_input), output, atol=1e-6), names

    only = tmp_path / "only"
    wrapped.save_pretrained(only, selected_adapters=["canny"])
    assert sorted(p.relative_to(only).as_posix() for p in only.rglob("*.*")) == [
        "canny/adapter_config.json", "canny/adapter_model.safetensors"
    ]
    with pytest.raises(ValueError, match=r"selected_adapters=\['sketch'\]: choose among \['canny', 'default', 'seed'\]"):
        wrapped.save_pretrained(tmp_path, selected_adapters=["sketch"])


def test_merge_and_unload_and_unload(stack, stack_input):
    reference = copy.deepcopy(stack)
    wrapped = OFTModel(copy.deepcopy(stack), OFTConfig(r=2, target_modules="all-linear"))
    randomize(wrapped)
    adapted = wrapped(stack_input)
    merged = wrapped.merge_and_unload()
    assert not any(isinstance(m, OFTLayer) for m in merged.modules())
    assert torch.allclose(merged(stack_input), adapted, atol=1e-5)
    wrapped = OFTModel(copy.deepcopy(stack), OFTConfig(r=2, target_modules="all-linear"))
    randomize(wrapped)
    wrapped.merge_adapter()
    plain = wrapped.unload()
    assert torch.allclose(plain(stack_input), reference(stack_input), atol=1e-5)


def test_save_load_round_trip_is_bit_identical(stack, stack_input, tmp_path):
    pristine = copy.deepcopy(stack)
    config = OFTConfig(r=2, target_modules="all-linear", coft=True, eps=1e-2, modules_to_save=["head"])
    wrapped = OFTModel(stack, config)
    randomize(wrapped)
    with torch.no_grad():
        wrapped.model.head.modules_to_save["default"].weight.add_(1.0)
    with torch.no_grad():
        expected = wrapped(stack_input)
    wrapped.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "OFT" and saved["r"] == 2 and saved["coft"] is True
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.mlp.0.oft_R.weight" in keys and "base_model.model.head.weight" in keys
    loaded = OFTModel.from_pretrained(copy.deepcopy(pristine), tmp_path)
    assert loaded.peft_config["default"].eps == pytest.approx(1e-2)
    original_state, loaded_state = wrapped.state_dict(), loaded.state_dict()
    assert original_state.keys() == loaded_state.keys()
    assert all(torch.equal(original_state[k], loaded_state[k]) for k in original_state)
    with torch.no_grad():
        assert torch.equal(loaded(stack_input), expected)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference by default
    trainable = OFTModel.from_pretrained(copy.deepcopy(pristine), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] > 0


def test_unet_wrapping_is_transparent_and_saves(tmp_path):
    unet = tiny_unet()
    inputs = unet_inputs()
    base_out = unet(*inputs).sample
    wrapped = OFTModel(unet, OFTConfig(r=4))
    assert wrapped.config.in_channels == 4 and wrapped.dtype == torch.float32  # attributes pass through
    assert torch.equal(wrapped(*inputs).sample, base_out)
    randomize(wrapped, 0.05)
    adapted = wrapped(*inputs).sample
    wrapped.save_pretrained(tmp_path)
    reloaded = OFTModel.from_pretrained(tiny_unet(), tmp_path)
    assert torch.equal(reloaded(*inputs).sample, adapted)


@pytest.mark.parametrize("problem", ["missing", "extra", "shape", "pickle", "corrupt", "old_peft"])
def test_bad_adapter_files_are_refused(stack, tmp_path, problem):
    wrapped = OFTModel(copy.deepcopy(stack), OFTConfig(r=2, target_modules="all-linear"))
    wrapped.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    state = load_file(weights)
    message = {
        "missing": "Missing \\(1\\)", "extra": "unexpected \\(1\\)", "shape": "has shape", "pickle": "pickle",
        "corrupt": "not a readable safetensors", "old_peft": "Missing \\(3\\).*PEFT 0.7-0.13's format",
    }[problem]
    if problem == "missing":
        state.pop("base_model.model.proj.oft_R.weight")
        save_file(state, weights)
    elif problem == "extra":
        state["base_model.model.conv1.oft_R.weight"] = torch.zeros(2, 1)
        save_file(state, weights)
    elif problem == "shape":
        state["base_model.model.proj.oft_R.weight"] = torch.zeros(4, 1)
        save_file(state, weights)
    elif problem == "pickle":
        weights.unlink()
        torch.save(state, tmp_path / "adapter_model.bin")
    elif problem == "corrupt":
        weights.write_bytes(weights.read_bytes()[:40])
    elif problem == "old_peft":
        config = json.loads((tmp_path / "adapter_config.json").read_text())
        del config["oft_block_size"]
        (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        OFTModel.from_pretrained(copy.deepcopy(stack), tmp_path)
