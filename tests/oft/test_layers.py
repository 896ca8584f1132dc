"""Numerical contract of the OFT layers: identity, orthogonality, equivalences, COFT, dtypes."""

import math

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from conftrl.oft import Conv2d, Linear, OFTConfig, OFTRotation
from conftrl.oft.rotation import neumann_coefficients


def make_layer(base: nn.Module, **config) -> nn.Module:
    layer = Linear(base) if isinstance(base, nn.Linear) else Conv2d(base)
    config.setdefault("r", 4)
    layer.add_adapter("default", OFTConfig(**config), "layer")
    return layer


def randomize(layer, scale: float = 0.3) -> None:
    with torch.no_grad():
        for rotation in layer.oft_R.values():
            rotation.weight.normal_(0, scale)


def test_identity_at_init_is_exact():
    torch.manual_seed(0)
    for base, x in [
        (nn.Linear(32, 24), torch.randn(7, 32)),
        (nn.Conv2d(8, 6, 3, padding=1), torch.randn(2, 8, 5, 5)),
    ]:
        expected = base(x)
        layer = make_layer(base)
        assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("block_size", [4, 16, 192])
def test_blocks_are_orthogonal(block_size):
    torch.manual_seed(0)
    # 192-wide blocks exercise the CPU path that avoids batched LU (pytorch#142815).
    rotation = OFTRotation(3, block_size)
    rotation.reset(init_weights=False)
    with torch.no_grad():
        rotation.weight.normal_(0, 0.05)  # ||S||_F ~ b/20: far beyond what training reaches
    q = rotation.blocks().double()
    eye = torch.eye(block_size, dtype=torch.double)
    assert (q.transpose(1, 2) @ q - eye).norm(dim=(1, 2)).max() < 1e-5
    assert torch.allclose(torch.linalg.det(q), torch.ones(3, dtype=torch.double), atol=1e-5)


@pytest.mark.parametrize("use_cayley_neumann", [False, True])
def test_blocks_are_built_in_fp32_under_autocast(use_cayley_neumann):
    """Autocast must not reach the block products: in bf16 the wide CPU inversion left Q
    7e-4 away from its fp32 value and orthogonal only to ~1e-3."""
    torch.manual_seed(0)
    rotation = OFTRotation(4, 320, use_cayley_neumann=use_cayley_neumann)
    with torch.no_grad():
        rotation.weight.normal_(0, 0.01)
    expected = rotation.blocks()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        blocks = rotation.blocks()
    assert blocks.dtype == torch.float32
    assert torch.equal(blocks, expected)


def test_skew_stores_the_upper_triangle_row_major():
    """PEFT's layout: (0,1), (0,2), (1,2) for a 3x3 block; the lower triangle is its negative."""
    rotation = OFTRotation(2, 3)
    with torch.no_grad():
        rotation.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    expected = torch.tensor([[[0.0, 1, 2], [-1, 0, 3], [-2, -3, 0]], [[0.0, 4, 5], [-4, 0, 6], [-5, -6, 0]]])
    assert torch.equal(rotation.skew(), expected)


@pytest.mark.parametrize("width", [65, 201, 320])
@pytest.mark.parametrize("scale", [1e-3, 0.3])
def test_cpu_cayley_by_halving_matches_lapack(width, scale):
    """Wide CPU blocks are inverted by 2x2 block elimination; it must equal LAPACK's solve.

    Odd widths split unevenly; the larger scale gives ||S||_2 of order 10, far past training.
    """
    from conftrl.oft.rotation import cayley

    torch.manual_seed(0)
    upper = torch.randn(3, width, width, dtype=torch.double) * scale
    skew = upper - upper.transpose(1, 2)
    eye = torch.eye(width, dtype=torch.double)
    expected = torch.linalg.solve(eye + skew, eye - skew)
    assert (cayley(skew) - expected).abs().max() < 1e-12
    assert (cayley(skew.float()).double() - expected).abs().max() < 2e-5
    assert torch.equal(cayley(torch.zeros(2, width, width)), torch.eye(width).expand(2, -1, -1))


def test_rotation_acts_on_input_side():
    """y = W R^T x + b: row norms of the effective weight equal the base's; bias untouched."""
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = make_layer(base, r=2)
    randomize(layer)
    merged = layer.get_merged_weight()
    assert torch.allclose(merged.norm(dim=1), base.weight.norm(dim=1), atol=1e-6)
    x = torch.randn(5, 16)
    assert torch.allclose(layer(x), x @ merged.T + base.bias, atol=1e-6)


LINEAR_FORMS = ("input", "weight", "rotated_weight")


def forward_backward(layer, x, mode):
    """Output and the gradients of every input that requires one, with `mode` pinned."""
    layer.computation = mode
    out = layer(x)
    out.square().sum().backward()
    inputs = [x, *layer.parameters()]
    grads = [t.grad.clone() for t in inputs if t.grad is not None]
    for t in inputs:
        t.grad = None
    return [out.detach(), *grads]


@pytest.mark.parametrize("mode", LINEAR_FORMS[1:])
@pytest.mark.parametrize("block_share", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_forms_agree_with_input_centric(mode, block_share, bias):
    """Output, dL/dx and dL/dS of every form equal the input-centric form's (fp64)."""
    torch.manual_seed(0)
    layer = make_layer(nn.Linear(48, 40, bias=bias).requires_grad_(False), r=4, block_share=block_share).double()
    randomize(layer)
    x = torch.randn(2, 9, 48, dtype=torch.double, requires_grad=True)
    reference = forward_backward(layer, x, "input")
    results = forward_backward(layer, x, mode)
    assert len(results) == len(reference) == 3
    for got, expected in zip(results, reference):
        assert torch.allclose(got, expected, atol=1e-12, rtol=1e-10)


def test_rotated_weight_form_trains_a_base_left_trainable():
    """With the base weight and bias trainable, their gradients equal autograd's through x R."""
    torch.manual_seed(0)
    layer = make_layer(nn.Linear(24, 12), r=3).double()
    randomize(layer)
    x = torch.randn(5, 24, dtype=torch.double)  # no dL/dx wanted: that branch is skipped
    reference = forward_backward(layer, x, "input")
    results = forward_backward(layer, x, "rotated_weight")
    assert len(results) == len(reference) == 4  # output, dS, dW, db
    for got, expected in zip(results, reference):
        assert torch.allclose(got, expected, atol=1e-12, rtol=1e-10)


def test_rotated_weight_form_under_bf16_autocast():
    """Runs in autocast's dtype, returns fp32 gradients, and agrees with the input-centric form
    to bf16 rounding."""
    torch.manual_seed(0)
    layer = make_layer(nn.Linear(64, 32).requires_grad_(False), r=4)
    randomize(layer, 0.05)
    x = torch.randn(16, 64, requires_grad=True)
    results = {}
    for mode in ("input", "rotated_weight"):
        layer.computation = mode
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        assert out.dtype == torch.bfloat16
        out.float().square().sum().backward()
        rotation = layer.oft_R["default"]
        assert x.grad.dtype == rotation.weight.grad.dtype == torch.float32
        results[mode] = (out.float(), x.grad.clone(), rotation.weight.grad.clone())
        x.grad, rotation.weight.grad = None, None
    for got, expected in zip(results["rotated_weight"], results["input"]):
        assert (got - expected).norm() < 0.02 * expected.norm()


def test_a_form_the_layer_lacks_is_refused():
    conv = make_layer(nn.Conv2d(8, 8, 1), r=2)
    conv.computation = "rotated_weight"
    with pytest.raises(ValueError, match="rotated_weight.*expected 'auto' or one of"):
        conv(torch.randn(1, 8, 3, 3))
    linear = make_layer(nn.Linear(8, 8), r=2)
    linear.add_adapter("second", OFTConfig(r=2, init_weights=False), "layer")
    linear.set_adapter(["default", "second"])
    linear.computation = "rotated_weight"  # written for one adapter
    with pytest.raises(ValueError, match="2 active adapter"):
        linear(torch.randn(2, 8))
    linear.computation = "input"
    assert linear(torch.randn(2, 8)).shape == (2, 8)


def test_rotated_weight_form_serves_inference():
    """Pinned, it also runs without gradients (its forward is the weight-centric one)."""
    torch.manual_seed(0)
    layer = make_layer(nn.Linear(16, 8), r=2)
    randomize(layer)
    x = torch.randn(3, 16)
    with torch.no_grad():
        layer.computation = "input"
        expected = layer(x)
        layer.computation = "rotated_weight"
        assert torch.allclose(layer(x), expected, atol=1e-6)


def form(layer, tokens):
    return layer._form(tokens, list(layer.oft_R.values()))


def test_auto_choice_follows_cost_model(monkeypatch):
    monkeypatch.setattr("conftrl.oft.layer.BLOCKWISE_SLOWDOWN", {})  # plain multiply-add counts
    layer = make_layer(nn.Linear(64, 16), r=2)  # b = 32 > out/2: the weight gradient is cheaper
    assert form(layer, 1000) == "weight"
    layer = make_layer(nn.Linear(64, 64), r=8)  # b = 8: rotating 1000 tokens' inputs costs more
    assert form(layer, 1000) == "rotated_weight"  # than rotating the weight once (out < tokens)
    assert form(layer, 32) == "input"  # fewer tokens than outputs
    with torch.no_grad():  # inference: no backward to pay for
        assert form(layer, 32) == "input"
        assert form(layer, 1000) == "weight"


@pytest.mark.parametrize(
    "d, out, tokens, expected",
    [
        (320, 320, 2 * 64**2, "rotated_weight"),
        (320, 2560, 2 * 64**2, "rotated_weight"),  # GEGLU projection
        (640, 640, 2 * 32**2, "rotated_weight"),
        (1280, 1280, 2 * 16**2, "input"),  # fewer tokens than outputs
    ],
)
def test_auto_choice_on_cpu_counts_blockwise_products_slower(d, out, tokens, expected):
    layer = make_layer(nn.Linear(d, out), r=4)
    assert form(layer, tokens) == expected


def test_auto_choice_for_several_adapters_is_input_or_weight():
    layer = make_layer(nn.Linear(64, 64), r=8)
    layer.add_adapter("second", OFTConfig(r=8), "layer")
    layer.set_adapter(["default", "second"])
    assert form(layer, 1000) in ("input", "weight")


CONVS = [
    dict(in_channels=8, out_channels=6, kernel_size=1),
    dict(in_channels=8, out_channels=6, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=2, dilation=2),
    dict(in_channels=4, out_channels=4, kernel_size=(3, 5), padding=(1, 2), padding_mode="reflect"),
    dict(in_channels=8, out_channels=4, kernel_size=3, groups=2, padding=1),
]


@pytest.mark.parametrize("block_share", [False, True])
@pytest.mark.parametrize("conv_args", CONVS[:4] + [dict(CONVS[1], bias=False)])
def test_conv_unfolded_and_weight_forms_agree(conv_args, block_share):
    torch.manual_seed(0)
    layer = make_layer(nn.Conv2d(**conv_args), r=2, block_share=block_share)
    randomize(layer)
    x = torch.randn(2, conv_args["in_channels"], 9, 9, requires_grad=True)
    results = []
    for mode in ("input", "weight"):
        layer.computation = mode
        out = layer(x)
        out.square().sum().backward()
        results.append((out.detach(), layer.oft_R["default"].weight.grad.clone(), x.grad.clone()))
        layer.oft_R["default"].weight.grad, x.grad = None, None
    for unfolded, weighted in zip(*results):
        assert torch.allclose(unfolded, weighted, atol=1e-4, rtol=1e-4)


def test_conv_unfolds_only_for_few_tokens():
    layer = make_layer(nn.Conv2d(64, 64, 3, padding=1), oft_block_size=32, r=0)
    rotations = list(layer.oft_R.values())
    assert layer._unfolding_is_cheaper(torch.zeros(1, 64, 4, 4), rotations)  # 16 tokens
    assert not layer._unfolding_is_cheaper(torch.zeros(2, 64, 32, 32), rotations)  # 2048 tokens > out


@pytest.mark.parametrize("conv_args", CONVS)
def test_conv_merged_equals_unmerged_and_unmerge_restores(conv_args):
    torch.manual_seed(0)
    base = nn.Conv2d(**conv_args)
    original = base.weight.detach().clone()
    d = conv_args["in_channels"] // conv_args.get("groups", 1) * math.prod(base.kernel_size)
    layer = make_layer(base, r=2 if d % 2 == 0 else 1)
    randomize(layer)
    x = torch.randn(2, conv_args["in_channels"], 9, 9)
    unmerged = layer(x)
    layer.merge()
    assert torch.allclose(layer(x), unmerged, atol=1e-5)
    assert not torch.allclose(base.weight, original)
    layer.unmerge()
    assert torch.allclose(base.weight, original, atol=1e-6)


@pytest.mark.parametrize("neumann", [False, True])
def test_linear_merge_roundtrip(neumann):
    torch.manual_seed(0)
    base = nn.Linear(24, 12)
    original = base.weight.detach().clone()
    layer = make_layer(base, r=3, use_cayley_neumann=neumann)
    randomize(layer, 0.05)
    x = torch.randn(4, 24)
    unmerged = layer(x)
    layer.merge()
    assert torch.allclose(layer(x), unmerged, atol=1e-5)
    layer.unmerge()
    assert torch.allclose(base.weight, original, atol=1e-6)


def test_neumann_series_approximates_exact_cayley():
    torch.manual_seed(0)
    exact, approx = OFTRotation(2, 8).double(), OFTRotation(2, 8, use_cayley_neumann=True).double()
    direction = torch.randn_like(exact.weight)
    errors = []
    for scale in (0.02, 0.01):
        with torch.no_grad():
            exact.weight.copy_(scale * direction)
            approx.weight.copy_(scale * direction)
        errors.append((exact.blocks() - approx.blocks()).abs().max().item())
    assert errors[0] < 1e-3
    assert errors[0] / errors[1] > 12  # truncation error shrinks like ||S||^4
    assert neumann_coefficients(5) == (1.0, 2.0, 2.0, 2.0, 1.0)


def test_coft_radius_holds_after_optimizer_steps():
    torch.manual_seed(0)
    eps = 1e-3
    layer = make_layer(nn.Linear(32, 32), r=4, coft=True, eps=eps)
    rotation = layer.oft_R["default"]
    radius = eps * 8**2 / math.sqrt(4)
    assert rotation.coft_radius == pytest.approx(radius)
    optimizer = torch.optim.SGD(rotation.parameters(), lr=10.0)
    for _ in range(5):
        loss = layer(torch.randn(16, 32)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        layer(torch.randn(1, 32))  # every use projects first
        norms = rotation.skew().norm(dim=(1, 2))
        assert norms.max() <= radius * (1 + 1e-5)
    assert norms.max() > 0.5 * radius  # the large steps did push against the ball


def test_block_share_uses_one_block():
    torch.manual_seed(0)
    layer = make_layer(nn.Linear(32, 8), r=4, block_share=True, init_weights=False)
    rotation = layer.oft_R["default"]
    assert rotation.weight.shape == (1, 8 * 7 // 2)
    expanded = rotation.expanded_blocks()
    assert expanded.shape == (4, 8, 8)
    assert torch.equal(expanded[0], expanded[3])


def test_module_dropout_only_in_training():
    torch.manual_seed(0)
    base = nn.Linear(16, 16)
    layer = make_layer(base, r=2, module_dropout=0.5)
    randomize(layer)
    x = torch.randn(3, 16)
    layer.eval()
    rotated = layer(x)
    assert all(torch.equal(layer(x), rotated) for _ in range(20))
    layer.train()
    outcomes = [torch.equal(layer(x), base(x)) for _ in range(200)]
    assert 60 < sum(outcomes) < 140  # about half of the forwards skip the adapter


def test_half_precision_base_and_autocast():
    torch.manual_seed(0)
    base = nn.Linear(32, 16).to(torch.bfloat16)
    layer = make_layer(base, r=4)
    randomize(layer)
    assert layer.oft_R["default"].weight.dtype == torch.float32
    for mode in LINEAR_FORMS:
        layer.computation = mode
        out = layer(torch.randn(4, 32, dtype=torch.bfloat16))
        assert out.dtype == torch.bfloat16
        out.float().sum().backward()
        assert layer.oft_R["default"].weight.grad.dtype == torch.float32
    fp32_layer = make_layer(nn.Linear(32, 16), r=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fp32_layer(torch.randn(4, 32))
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("mode", LINEAR_FORMS)
def test_gradient_checkpointing_matches_plain_backward(mode):
    torch.manual_seed(0)
    layer = make_layer(nn.Linear(16, 16), r=2, coft=True, eps=1e-2)
    layer.computation = mode
    randomize(layer, 1.0)  # outside the ball: the first forward projects in place
    x = torch.randn(4, 16, requires_grad=True)
    checkpoint(layer, x, use_reentrant=False).sum().backward()
    checkpointed = layer.oft_R["default"].weight.grad.clone()
    layer.oft_R["default"].weight.grad = None
    layer(x).sum().backward()
    assert torch.allclose(checkpointed, layer.oft_R["default"].weight.grad, atol=1e-6)


@pytest.mark.parametrize(
    "base, config, message",
    [
        (nn.Linear(30, 4), dict(r=4), "does not divide"),
        (nn.Linear(8, 4), dict(r=16), "does not divide"),
        (nn.Linear(30, 4), dict(r=0, oft_block_size=7), "does not divide"),
    ],
)
def test_bad_block_sizes_are_refused(base, config, message):
    with pytest.raises(ValueError, match=message):
        make_layer(base, **config)


def test_unsupported_layer_is_refused():
    with pytest.raises(TypeError, match="nn.Linear and nn.Conv2d"):
        Linear(nn.Embedding(10, 4))


@pytest.mark.parametrize("block_size", [6, 140])
def test_cayley_gradient_matches_autograd_through_solve(block_size):
    torch.manual_seed(0)
    rotation = OFTRotation(2, block_size).double()
    with torch.no_grad():
        rotation.weight.normal_(0, 0.1)
    target = torch.randn(2, block_size, block_size, dtype=torch.double)
    (rotation.blocks() * target).sum().backward()
    custom = rotation.weight.grad.clone()
    rotation.weight.grad = None
    skew = rotation.skew()
    eye = torch.eye(block_size, dtype=torch.double)
    (torch.linalg.solve(eye + skew, eye - skew) * target).sum().backward()
    assert torch.allclose(custom, rotation.weight.grad, atol=1e-10)
    if block_size <= 8:  # a dense numerical Jacobian: (r*b^2/2) x (r*b^2) entries, ~6 GB at b = 140
        weight = rotation.weight.detach().clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda w: _cayley_of(rotation, w), (weight,))


def _cayley_of(rotation, weight):
    from conftrl.oft.rotation import _Cayley

    b = rotation.block_size
    rows, cols = torch.triu_indices(b, b, 1)
    upper = weight.new_zeros(weight.shape[0], b, b)
    upper[:, rows, cols] = weight
    return _Cayley.apply(upper - upper.transpose(1, 2))
