"""OFT-wrapped layers: the frozen base layer's weight rotated on its input side, W' = W R^T.

Three ways to compute the same output and gradients (see the project's OFT notes); N tokens,
extra multiply-adds over the frozen layer, forward + backward:
- input-centric: rotate the activations block-wise, then run the frozen layer; 3*N*d*b.
- weight-centric: build W' = W R^T block-wise (out*d*b), then run the base op; backward pays
  the full weight gradient of W' (N*d*out) and out*d*b to reach R.
- rotated weight (Linear, one adapter): the weight-centric forward with the input-centric
  backward; out*d*b + 2*N*d*b (`blockwise.RotatedWeightLinear`).
Linear layers pick the cheapest per call from the actual token count and the device; a
k x k Conv2d is weight-centric, or input-centric on few tokens, because the input-centric
form unfolds its activations k^2 times. Adapters of the seed's PEFT rotate the output side
instead (`conftrl.oft.legacy`) and always take the weight-centric form.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from conftrl.oft.blockwise import RotatedWeightLinear, rotate_columns, rotate_rows
from conftrl.oft.config import OFTConfig
from conftrl.oft.legacy import OutputRotation
from conftrl.oft.rotation import OFTRotation

# How much slower a multiply-add of the input-centric form's block-wise products (inner width b,
# reshapes between them) runs than one of a layer-sized matmul, per device type. Measured with
# benchmarks/oft_layers.py: on a CPU the weight-centric form is 1.2x the frozen 320->320 layer
# at 8192 tokens where the input-centric one is 1.6x, although it does more multiply-adds.
# Other device types (GPUs not yet measured) use the plain multiply-add count.
BLOCKWISE_SLOWDOWN = {"cpu": 1.5}


def input_dimension(layer: nn.Module) -> int:
    """d of the flattened weight (out, d) that OFT rotates."""
    if isinstance(layer, nn.Linear):
        return layer.in_features
    if isinstance(layer, nn.Conv2d):
        kh, kw = layer.kernel_size
        return layer.in_channels // layer.groups * kh * kw
    raise TypeError(f"OFT supports nn.Linear and nn.Conv2d, not {type(layer).__name__}")


def resolve_blocks(config: OFTConfig, d: int, r: Optional[int], name: str, side: str = "input") -> tuple[int, int]:
    """(r, b) for a rotated size d (of the layer's input or output side); refuses sizes that would
    crop a block."""
    if config.oft_block_size and r is None:
        b = config.oft_block_size
        if b > d or d % b:
            raise ValueError(
                f"{name}: oft_block_size={b} does not divide the layer's {side} size d={d}; "
                f"divisors of {d}: {_divisors(d)}"
            )
        return d // b, b
    r = r if r is not None else config.r
    if r > d or d % r:
        raise ValueError(
            f"{name}: r={r} (number of blocks) does not divide the layer's {side} size d={d}; "
            f"choose r among {_divisors(d)} or set rank_pattern for this module"
        )
    return r, d // r


def _divisors(n: int, limit: int = 12) -> list[int]:
    small = [k for k in range(1, min(n, 64) + 1) if n % k == 0]
    return small[:limit]


class OFTLayer(nn.Module):
    """Base of the OFT wrappers: holds the frozen layer and one rotation per adapter."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        if isinstance(base_layer, OFTLayer):
            raise TypeError("layer is already OFT-wrapped; add an adapter to it instead")
        self.base_layer = base_layer
        self.oft_R = nn.ModuleDict()
        self.in_dim = input_dimension(base_layer)
        self.out_dim = base_layer.weight.shape[0]
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.train(base_layer.training)  # wrapping a model in eval mode keeps it there

    # --- adapter bookkeeping ----------------------------------------------------------------

    def add_adapter(self, adapter_name: str, config: OFTConfig, name: str, r: Optional[int] = None) -> None:
        rotation_class = OutputRotation if config.rotation_side == "output" else OFTRotation
        rotated_size = self.out_dim if rotation_class.side == "output" else self.in_dim
        num_blocks, block_size = resolve_blocks(config, rotated_size, r, name, rotation_class.side)
        rotation = rotation_class(
            num_blocks,
            block_size,
            block_share=config.block_share,
            coft=config.coft,
            eps=config.eps,
            use_cayley_neumann=config.use_cayley_neumann,
            num_cayley_neumann_terms=config.num_cayley_neumann_terms,
            module_dropout=config.module_dropout,
        )
        rotation.reset(config.init_weights)
        rotation.train(self.training)  # an adapter added to a model in eval mode never drops
        weight = self.base_layer.weight
        # Parameters stay fp32 whatever the base dtype: Cayley in half precision is not orthogonal.
        self.oft_R[adapter_name] = rotation.to(device=weight.device)
        self.active_adapters = [adapter_name]

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise RuntimeError(f"adapter {adapter_name!r} is merged; unmerge before deleting it")
        del self.oft_R[adapter_name]
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def set_adapter(self, adapter_names: Iterable[str]) -> None:
        self.active_adapters = [a for a in adapter_names if a in self.oft_R]

    def _rotations(self, names: Iterable[str]) -> list[OFTRotation]:
        return [self.oft_R[a] for a in names if a in self.oft_R]

    # --- the maths --------------------------------------------------------------------------

    def _weight_with(self, rotations: list[OFTRotation], dtype: torch.dtype) -> torch.Tensor:
        """W R_1^T R_2^T ... in the base layer's shape: adapters apply in the order listed."""
        weight = self.base_layer.weight
        flat = weight.to(dtype).reshape(self.out_dim, self.in_dim)
        for rotation in rotations:
            flat = rotation.rotate_weight(flat)
        return flat.reshape(weight.shape)

    def get_merged_weight(self) -> torch.Tensor:
        """The effective weight of the active, unmerged adapters, without changing anything."""
        with torch.no_grad():
            pending = [a for a in self.active_adapters if a not in self.merged_adapters]
            if self.disabled:
                pending = []
            weight = self._weight_with(self._rotations(pending), torch.float32)
        return weight.to(self.base_layer.weight.dtype)

    def rotation_deviation(self) -> dict[str, float]:
        """||R - I||_F per adapter."""
        with torch.no_grad():
            return {name: float(rotation.deviation()) for name, rotation in self.oft_R.items()}

    # --- merge ------------------------------------------------------------------------------

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def merge(self, adapter_names: Optional[list[str]] = None) -> None:
        """W <- W R^T for each adapter (in fp32, written back in the base dtype)."""
        names = [a for a in (adapter_names or self.active_adapters) if a in self.oft_R and a not in self.merged_adapters]
        if not names:
            return
        weight = self.base_layer.weight
        with torch.no_grad():
            weight.copy_(self._weight_with(self._rotations(names), torch.float32).to(weight.dtype))
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Undo merges in reverse order, each by an exact solve in fp32."""
        weight = self.base_layer.weight
        with torch.no_grad():
            flat = weight.float().reshape(self.out_dim, self.in_dim)
            for name in reversed(self.merged_adapters):
                flat = self.oft_R[name].unrotate_weight(flat)
            weight.copy_(flat.reshape(weight.shape).to(weight.dtype))
        self.merged_adapters = []

    # --- forward ----------------------------------------------------------------------------

    # Pins the computation ("input", "weight", or for a Linear "rotated_weight") for benchmarks
    # and tests; "auto" takes the form with the fewest extra multiply-adds for the actual tokens.
    computation: str = "auto"
    # Whether the layer type has the rotated-weight form (the weight-centric forward with the
    # input-centric backward); it is written for one adapter.
    has_rotated_weight_form: bool = False

    def _extra_costs(self, tokens: int, rotations: list[OFTRotation]) -> dict[str, float]:
        """Extra multiply-adds per input feature of each form (forward, and backward if training)."""
        block_sum, out = sum(r.block_size for r in rotations), self.out_dim
        if any(r.side == "output" for r in rotations):
            # The seed's output-side rotation (conftrl.oft.legacy) runs as its merged weight R^T W.
            return {"weight": out * block_sum}
        if not self._trains(rotations):
            # Forwards only; the rotated-weight form's is the weight-centric one.
            costs = {"input": tokens * block_sum, "weight": out * block_sum}
            rotated_weight = out * block_sum
        else:
            slowdown = BLOCKWISE_SLOWDOWN.get(rotations[0].weight.device.type, 1.0)
            costs = {"input": 3 * tokens * block_sum * slowdown, "weight": tokens * out + 2 * out * block_sum}
            rotated_weight = out * block_sum + 2 * tokens * block_sum * slowdown
        if self.has_rotated_weight_form and len(rotations) == 1:
            costs["rotated_weight"] = rotated_weight
        return costs

    @staticmethod
    def _trains(rotations: list[OFTRotation]) -> bool:
        return torch.is_grad_enabled() and any(r.weight.requires_grad for r in rotations)

    def _form(self, tokens: int, rotations: list[OFTRotation]) -> str:
        costs = self._extra_costs(tokens, rotations)
        if self.computation == "auto":
            return min(costs, key=costs.get)
        if self.computation not in costs:
            raise ValueError(
                f"{type(self).__name__}.computation={self.computation!r}: expected 'auto' or one of "
                f"{sorted(costs)} for this layer and its {len(rotations)} active adapter(s)"
            )
        return self.computation

    def _live_rotations(self) -> list[OFTRotation]:
        """Rotations to apply in this forward (none when disabled, merged, or dropped)."""
        if self.disabled:
            if self.merged:
                self.unmerge()
            return []
        if self.merged:
            return []
        return [r for r in self._rotations(self.active_adapters) if not r.dropped()]

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, adapters={list(self.oft_R)}"


class Linear(OFTLayer):
    """OFT around an nn.Linear; chooses its computation per call."""

    has_rotated_weight_form = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rotations = self._live_rotations()
        if not rotations:
            return self.base_layer(x)
        form = self._form(x.numel() // self.in_dim, rotations)
        if form == "input":
            for rotation in reversed(rotations):
                x = rotate_rows(x, rotation.blocks().to(x.dtype))
            return self.base_layer(x)
        if form == "rotated_weight":
            return RotatedWeightLinear.apply(x, rotations[0].blocks(), self.base_layer.weight, self.base_layer.bias)
        weight = self._weight_with(rotations, self.base_layer.weight.dtype)
        return F.linear(x, weight, self.base_layer.bias)


class Conv2d(OFTLayer):
    """OFT around an nn.Conv2d of any kernel, stride, padding, dilation and groups.

    Weight-centric by default: the input-centric form needs the unfolded activations
    (kh*kw times the input), so it is used only where they are no larger than the rotated
    weight it replaces (few tokens: the low-resolution blocks of a UNet) and the work is
    smaller. It rotates each output position's full receptive field, which is exactly the
    merged convolution (unlike rotating unfolded patches and folding them back).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rotations = self._live_rotations()
        if not rotations:
            return self.base_layer(x)
        if self._can_unfold() and self._unfolding_is_cheaper(x, rotations):
            return self._forward_unfolded(x, rotations)
        weight = self._weight_with(rotations, self.base_layer.weight.dtype)
        return self.base_layer._conv_forward(x, weight, self.base_layer.bias)

    def _can_unfold(self) -> bool:
        return self.base_layer.groups == 1 and not isinstance(self.base_layer.padding, str)

    def _output_size(self, x: torch.Tensor) -> tuple[int, int]:
        conv = self.base_layer
        height, width = (
            (x.shape[2 + i] + 2 * conv.padding[i] - conv.dilation[i] * (conv.kernel_size[i] - 1) - 1) // conv.stride[i] + 1
            for i in range(2)
        )
        return height, width

    def _unfolding_is_cheaper(self, x: torch.Tensor, rotations: list[OFTRotation]) -> bool:
        height, width = self._output_size(x)
        tokens = x.shape[0] * height * width
        if self.computation == "auto" and tokens > self.out_dim:
            return False  # unfolded activations would outgrow the rotated weight
        return self._form(tokens, rotations) == "input"

    def _forward_unfolded(self, x: torch.Tensor, rotations: list[OFTRotation]) -> torch.Tensor:
        conv = self.base_layer
        out_size = self._output_size(x)
        padding = conv.padding
        if conv.padding_mode != "zeros":
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
            padding = (0, 0)
        columns = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)
        for rotation in reversed(rotations):
            columns = rotate_columns(columns, rotation.blocks().to(columns.dtype))
        # Kept as (batch, d, positions) throughout: the products land in the conv's output layout
        # with no transposed copies (they took 15-25 % of this path's time at SD 1.5's shapes).
        weight = conv.weight.reshape(self.out_dim, self.in_dim)
        if conv.bias is None:
            out = weight @ columns
        else:
            out = torch.baddbmm(conv.bias[None, :, None], weight.expand(columns.shape[0], -1, -1), columns)
        return out.view(x.shape[0], self.out_dim, *out_size)


def wrap(layer: nn.Module, name: str) -> OFTLayer:
    """The OFT wrapper matching `layer`'s type."""
    if isinstance(layer, nn.Linear):
        return Linear(layer)
    if isinstance(layer, nn.Conv2d):
        return Conv2d(layer)
    raise TypeError(
        f"{name}: OFT supports nn.Linear and nn.Conv2d, not {type(layer).__name__}; "
        "narrow target_modules to those layers."
    )
