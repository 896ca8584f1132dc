import math

import pytest
import torch
from torch import nn

from conftrl.metrics import energy_summary, hyperspherical_energy, layer_weights, rotation_stats

F64 = torch.float64


def naive_energy(weight: torch.Tensor, s: float = 1.0, include_negated: bool = False) -> float:
    """O(out²·d) definition: explicit differences of unit rows, mean over ordered pairs."""
    rows = weight.reshape(weight.shape[0], -1).to(F64)
    unit = rows / rows.norm(dim=1, keepdim=True)
    if include_negated:
        unit = torch.cat([unit, -unit])
    n = unit.shape[0]
    dist = (unit[:, None] - unit[None]).norm(dim=-1)
    off_diagonal = ~torch.eye(n, dtype=torch.bool)
    return float(dist[off_diagonal].pow(-s).mean())


def random_orthogonal(d: int, generator: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=F64))
    return q


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_orthonormal_rows_closed_form(gen):
    rows = random_orthogonal(16, gen)[:10]  # 10 orthonormal neurons: every distance is √2
    assert hyperspherical_energy(rows) == pytest.approx(1 / math.sqrt(2), rel=1e-12)
    # with negated copies: 2n points, the n antipodal pairs at distance 2, the rest at √2
    n = 10
    expected = ((2 * n - 2) / math.sqrt(2) + 0.5) / (2 * n - 1)
    assert hyperspherical_energy(rows, include_negated=True) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("theta", [0.1, math.pi / 3, 2.5])
@pytest.mark.parametrize("s", [1.0, 2.0])
def test_two_neurons_at_angle(theta, s):
    # ‖ŵ_1 − ŵ_2‖ = 2 sin(θ/2); the norms (3 and 0.5) must not matter
    w = torch.tensor([[3.0, 0, 0], [0.5 * math.cos(theta), 0.5 * math.sin(theta), 0]], dtype=F64)
    assert hyperspherical_energy(w, s=s) == pytest.approx((2 * math.sin(theta / 2)) ** -s, rel=1e-9)


@pytest.mark.parametrize("include_negated", [False, True])
@pytest.mark.parametrize("shape", [(37, 20), (64, 300), (12, 4, 3, 3)])
def test_matches_naive_and_is_chunk_independent(gen, shape, include_negated):
    w = torch.randn(*shape, generator=gen)
    expected = naive_energy(w, include_negated=include_negated)
    for chunk_size in (1, 5, shape[0], 1024):
        got = hyperspherical_energy(w, chunk_size=chunk_size, include_negated=include_negated)
        assert got == pytest.approx(expected, rel=1e-10)


def test_conv_weight_is_flattened_per_output_channel(gen):
    conv = nn.Conv2d(6, 10, 3, groups=2)  # weight (10, 3, 3, 3): neurons of length 27
    flat = conv.weight.detach().reshape(10, 27)
    assert hyperspherical_energy(conv.weight) == hyperspherical_energy(flat)


def test_invariant_under_rotation_and_positive_row_scaling(gen):
    w = torch.randn(64, 48, generator=gen, dtype=F64)
    base = hyperspherical_energy(w)
    rotated = w @ random_orthogonal(48, gen).T
    assert abs(hyperspherical_energy(rotated) / base - 1) < 1e-6
    scaled = w * torch.rand(64, 1, generator=gen, dtype=F64).add(0.1) * 10
    assert abs(hyperspherical_energy(scaled) / base - 1) < 1e-6


def test_changes_under_additive_low_rank_update(gen):
    w = torch.randn(64, 48, generator=gen, dtype=F64)
    b = torch.randn(64, 4, generator=gen, dtype=F64)
    a = torch.randn(4, 48, generator=gen, dtype=F64)
    lora = w + 0.3 * b @ a
    assert abs(hyperspherical_energy(lora) / hyperspherical_energy(w) - 1) > 1e-3


def test_float32_agrees_with_float64(gen):
    w = torch.randn(200, 90, generator=gen)
    assert hyperspherical_energy(w, dtype=torch.float32) == pytest.approx(
        hyperspherical_energy(w), rel=1e-4
    )


def test_identical_neurons_hit_the_distance_floor(gen):
    w = torch.randn(3, 50, generator=gen, dtype=F64)
    w[1] = 2 * w[0]  # same direction: distance 0
    others = naive_energy(w[[0, 2]]), naive_energy(w[[1, 2]])  # each: both orderings of one pair
    for floor in (1e-6, 1e-3):
        expected = (2 / floor + 2 * others[0] + 2 * others[1]) / 6
        got = hyperspherical_energy(w, min_distance=floor)
        assert math.isfinite(got) and got == pytest.approx(expected, rel=1e-9)


def test_zero_rows_have_no_direction(gen):
    w = torch.randn(5, 8, generator=gen)
    padded = torch.cat([w, torch.zeros(2, 8)])
    assert hyperspherical_energy(padded) == pytest.approx(hyperspherical_energy(w), rel=1e-12)
    assert math.isnan(hyperspherical_energy(torch.zeros(4, 8)))
    assert math.isnan(hyperspherical_energy(w[:1]))


def test_rejects_non_positive_s(gen):
    with pytest.raises(ValueError):
        hyperspherical_energy(torch.randn(3, 3), s=0)


# --- model level --------------------------------------------------------------------------


class StandInOFT(nn.Module):
    """Minimal layer with the OFT wrapper contract: replaces the original at its path, keeps it
    as ``.base_layer``, exposes the effective weight W Rᵀ and ‖R − I‖_F per adapter."""

    def __init__(self, base_layer: nn.Module, rotation: torch.Tensor):
        super().__init__()
        self.base_layer = base_layer
        self.register_buffer("rotation", rotation)

    def get_merged_weight(self) -> torch.Tensor:
        w = self.base_layer.weight
        return (w.reshape(w.shape[0], -1).to(self.rotation) @ self.rotation.T).reshape(w.shape)

    def rotation_deviation(self) -> dict[str, float]:
        eye = torch.eye(len(self.rotation), dtype=self.rotation.dtype)
        return {"default": float((self.rotation - eye).norm())}


class Attention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.to_q = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout()])


class Proj(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * dim)


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.attn1 = Attention(dim)
        self.ff = nn.Module()
        self.ff.net = nn.ModuleList([Proj(dim), nn.Dropout(), nn.Linear(2 * dim, dim)])


class TinyNet(nn.Module):
    """diffusers-like naming: repeated blocks in a homogeneous ModuleList, heterogeneous
    lists (``to_out``, ``ff.net``) inside them, a zero-initialised conv."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.conv_in = nn.Conv2d(3, dim, 3)
        self.blocks = nn.ModuleList([Block(dim), Block(dim)])
        self.zero_conv = nn.Conv2d(dim, dim, 1)
        nn.init.zeros_(self.zero_conv.weight)


def oft_wrap(model: nn.Module, names: list[str], gen: torch.Generator) -> nn.Module:
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        d = base.weight[0].numel()
        setattr(parent, child, StandInOFT(base, random_orthogonal(d, gen)))
    return model


@pytest.fixture
def tiny(gen) -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


def test_summary_groups_by_position_in_repeated_block(tiny):
    summary = energy_summary(tiny)
    assert set(summary.per_group) == {
        "conv_in", "attn1.to_q", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2"
    }
    assert "zero_conv" not in summary.per_layer  # no direction, no energy
    assert len(summary.per_layer) == 1 + 2 * 4
    both = [f"blocks.{i}.attn1.to_q" for i in (0, 1)]
    assert summary.per_group["attn1.to_q"] == pytest.approx(sum(summary.per_layer[n] for n in both))
    assert summary.total == pytest.approx(sum(summary.per_layer.values()))
    assert summary.relative_change == {} and summary.relative_change_total is None


def test_wrapped_layers_use_merged_weight_and_skip_base_layer(tiny, gen):
    base = energy_summary(tiny)
    wrapped = ["conv_in", "blocks.0.attn1.to_q", "blocks.1.ff.net.0.proj"]
    oft_wrap(tiny, wrapped, gen)
    weights = layer_weights(tiny)
    assert set(weights) == set(base.per_layer) | {"zero_conv"}
    assert not any("base_layer" in name for name in weights)
    assert weights["conv_in"].shape == tiny.conv_in.base_layer.weight.shape
    assert not torch.equal(weights["conv_in"], tiny.conv_in.base_layer.weight)

    only_wrapped = energy_summary(tiny, layer_types=(StandInOFT,))
    assert set(only_wrapped.per_layer) == set(wrapped)

    summary = energy_summary(tiny, reference=base)
    assert set(summary.per_group) == set(base.per_group)
    assert max(map(abs, summary.relative_change.values())) < 1e-6  # rotations keep HE
    assert abs(summary.relative_change_total) < 1e-6
    logged = summary.log_dict()
    assert logged["he/total"] == summary.total and "he/rel_change_max_abs" in logged


def test_relative_change_against_module_dict_and_summary(tiny, gen):
    reference = TinyNet()
    reference.load_state_dict(tiny.state_dict())
    base = energy_summary(reference)
    with torch.no_grad():
        tiny.blocks[0].attn1.to_q.weight += 0.5 * torch.randn(8, 2, generator=gen) @ torch.randn(
            2, 8, generator=gen
        )
    results = [energy_summary(tiny, reference=r) for r in (reference, base, base.per_layer)]
    assert all(s.relative_change == results[0].relative_change for s in results)
    for name, change in results[0].relative_change.items():
        assert abs(change) > 1e-3 if name == "blocks.0.attn1.to_q" else change == 0
    assert results[0].relative_change_total != 0
    with pytest.raises(ValueError):
        energy_summary(tiny, reference={"elsewhere": 1.0})


def test_rotation_stats(tiny, gen):
    assert rotation_stats(tiny) == {}
    oft_wrap(tiny, ["blocks.0.attn1.to_q", "blocks.1.attn1.to_q"], gen)
    devs = [m.rotation_deviation()["default"] for m in tiny.modules() if isinstance(m, StandInOFT)]
    stats = rotation_stats(tiny)
    assert stats["rotation_dev_mean"] == pytest.approx(sum(devs) / 2)
    assert stats["rotation_dev_max"] == max(devs)


def test_groups_on_a_diffusers_unet():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    groups = set(energy_summary(unet).per_group)
    expected = {
        "attn1.to_q", "attn2.to_k", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in",
        "conv1", "conv2", "time_emb_proj", "conv", "conv_in", "conv_out", "time_embedding.linear_1",
    }
    assert expected <= groups
    assert not any(g.startswith(("down_blocks", "up_blocks", "mid_block")) for g in groups)


def test_real_oft_model_keeps_energy():
    from conftrl import oft

    torch.manual_seed(0)
    model = TinyNet(dim=16)
    base = energy_summary(model)
    config = oft.OFTConfig(r=4, target_modules=["to_q", "proj"], init_weights=False)
    wrapped = oft.OFTModel(model, config)  # swaps layers inside `model`, keeps their paths
    summary = energy_summary(wrapped.model, reference=base)
    assert not any("base_layer" in name for name in summary.per_layer)
    assert set(summary.relative_change) == set(base.per_layer)
    assert max(map(abs, summary.relative_change.values())) < 1e-5  # fp32 W Rᵀ
    adapted = energy_summary(wrapped.model, layer_types=(oft.OFTLayer,))
    assert set(adapted.per_layer) == {name for name, _ in wrapped.oft_layers()}
    stats = rotation_stats(wrapped)
    assert stats and stats["rotation_dev_max"] > 0


def test_peft_lora_layer_is_measured_once_with_its_delta(tiny, gen):
    peft = pytest.importorskip("peft")
    base = energy_summary(tiny)
    reference = TinyNet()
    reference.load_state_dict(tiny.state_dict())
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "proj"], init_lora_weights=False)
    model = peft.inject_adapter_in_model(config, tiny)
    weights = layer_weights(model)
    assert set(weights) == set(base.per_layer) | {"zero_conv"}  # no base_layer, lora_A, lora_B
    lora = model.blocks[0].attn1.to_q
    expected = lora.base_layer.weight + lora.scaling["default"] * lora.lora_B["default"].weight @ lora.lora_A["default"].weight
    torch.testing.assert_close(weights["blocks.0.attn1.to_q"], expected)

    change = energy_summary(model, reference=reference).relative_change
    adapted = {f"blocks.{i}.{name}" for i in (0, 1) for name in ("attn1.to_q", "ff.net.0.proj")}
    assert all(abs(change[name]) > 1e-4 for name in adapted)  # an additive update moves HE
    assert all(change[name] == 0 for name in set(change) - adapted)

    lora.merge()  # merged: the delta is inside the base weight, not added twice
    torch.testing.assert_close(layer_weights(model)["blocks.0.attn1.to_q"], expected)


def test_modules_to_save_wrapper_is_measured_once_as_its_active_copy():
    from conftrl import oft

    torch.manual_seed(0)
    model = TinyNet(dim=16)
    config = oft.OFTConfig(r=4, target_modules=["to_q"], modules_to_save=["conv_in"])
    wrapped = oft.OFTModel(model, config)
    saved = model.conv_in
    with torch.no_grad():
        saved.modules_to_save["default"].weight.mul_(-1).add_(0.1)
    weights = layer_weights(wrapped.model)
    assert [name for name in weights if name.startswith("conv_in")] == ["conv_in"]
    assert torch.equal(weights["conv_in"], saved.modules_to_save["default"].weight)
    saved.active_adapter = None  # no active copy: the frozen original runs, and is measured
    assert torch.equal(layer_weights(wrapped.model)["conv_in"], saved.original_module.weight)
