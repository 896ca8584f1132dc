"""Hyperspherical energy (HE) of layer weights — the quantity OFT preserves.

OFT's claim (Qiu et al. 2023, Eq. 1) is that rotating every neuron of a layer by the same
orthogonal matrix keeps the pairwise angles between neurons, hence the layer's hyperspherical
energy, while additive updates (LoRA, full finetuning) change it. These functions measure that
claim on a live model so it can be logged during training.

Conventions (one place, so numbers are comparable across runs):

* neurons are the rows of the weight; a Conv2d weight ``(out, in/groups, kh, kw)`` is flattened
  to ``(out, in/groups·kh·kw)`` without permuting (the same flattening OFT rotates);
* ``HE(W)`` is the **mean** over ordered pairs ``i ≠ j`` of ``‖ŵ_i − ŵ_j‖^{-s}``, ``s = 1``. The
  paper writes a sum; the mean makes layers of different width comparable. The original OFT code
  also appends the negated neurons ``−ŵ_i`` before averaging (``include_negated=True`` here) and
  reports the sum of per-layer means over layers (:attr:`EnergySummary.total` here);
* neurons with zero norm have no direction and are left out; a layer with fewer than two
  directed neurons has no energy (NaN) and is left out of summaries (zero-initialised layers);
* two neurons pointing the same way have distance 0 and infinite energy. Rather than let one
  such pair turn a training log into ``inf``, distances are floored at ``min_distance``
  (default 1e-6, i.e. at most 1e6 per pair at s = 1). In float64 the rounding error of
  ``2 − 2 ŵ_i·ŵ_j`` is ~1e-16, far below the floor, so the floor only acts on (near-)duplicates;
  in float32 distances below ~1e-3 are rounding noise (and with TF32 matmuls enabled, far more:
  the float64 default is also immune to that global switch).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from conftrl.utils.names import named_modules, unwrapped_name


@runtime_checkable
class MergedWeightLayer(Protocol):
    """A wrapped layer (e.g. ``conftrl.oft.layer.OFTLayer``) that replaces the original module at
    the same path, keeps it as ``.base_layer`` and can report its effective weight ``W Rᵀ``
    without mutating anything."""

    base_layer: nn.Module

    def get_merged_weight(self) -> torch.Tensor: ...


@torch.no_grad()
def hyperspherical_energy(
    weight: torch.Tensor,
    *,
    s: float = 1.0,
    include_negated: bool = False,
    min_distance: float = 1e-6,
    chunk_size: int = 1024,
    dtype: torch.dtype = torch.float64,
) -> float:
    """Mean over ordered pairs ``i ≠ j`` of ``‖ŵ_i − ŵ_j‖^{-s}`` for the rows of ``weight``.

    Computed on ``weight``'s device, ``chunk_size`` rows at a time, so at most
    ``chunk_size × out`` Gram entries exist at once (for SD 1.5's widest layer, the 10240-row
    GEGLU projection, ~85 MB per temporary in float64), and only the upper block triangle of the
    symmetric pair matrix is formed. Squared distances use ``2 − 2 ŵ_i·ŵ_j`` (one matmul instead of a difference tensor).

    ``include_negated=True`` reproduces the original OFT code's point set ``{ŵ_i} ∪ {−ŵ_i}``
    (2·out neurons); the extra distances ``‖ŵ_i + ŵ_j‖² = 2 + 2 ŵ_i·ŵ_j`` come from the same
    Gram chunk, so it costs nothing more.

    Returns NaN when fewer than two rows have a nonzero norm (see module docstring).
    """
    if s <= 0:
        raise ValueError(f"s must be > 0 (Riesz energy), got {s}")
    rows = weight.detach().reshape(weight.shape[0], -1).to(dtype)
    norms = rows.norm(dim=1)
    unit = rows[norms > 0] / norms[norms > 0, None]
    n = unit.shape[0]
    if n < 2:
        return math.nan
    floor = min_distance**2
    total = unit.new_zeros(())
    for start in range(0, n, chunk_size):
        # rows start:stop against columns start:, i.e. the upper block triangle only (half the
        # FLOPs): the leading c×c block holds both orders of its pairs, the rest one order.
        gram = unit[start : start + chunk_size] @ unit[start:].T
        c = gram.shape[0]
        own = torch.arange(c, device=gram.device)
        squared_distances = [(2 - 2 * gram).clamp_min(floor)]
        squared_distances[0][own, own] = math.inf  # i = j contributes inf^{-s/2} = 0
        if include_negated:
            # all (i, −j) pairs, i = j included: ‖ŵ_i + ŵ_i‖ = 2
            squared_distances.append((2 + 2 * gram).clamp_min(floor))
        for dist2 in squared_distances:
            energy = dist2.pow(-s / 2)
            total += energy[:, :c].sum() + 2 * energy[:, c:].sum()
    if include_negated:
        # pairs (ŵ_i, ŵ_j), (−ŵ_i, −ŵ_j) give the same sum; so do (ŵ_i, −ŵ_j), (−ŵ_i, ŵ_j)
        return float(2 * total / (2 * n * (2 * n - 1)))
    return float(total / (n * (n - 1)))


def _peft_tuner_layer_class() -> type | None:
    """peft's ``BaseTunerLayer`` when peft is in use: a model can hold peft layers only once peft
    has been imported, and peft stays an optional dependency."""
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    return getattr(tuners, "BaseTunerLayer", None)


def _peft_effective_weight(layer: nn.Module) -> torch.Tensor:
    """``base + Σ delta`` of a peft tuner layer (e.g. LoRA's ``W + s·B A``) for its active,
    unmerged adapters; merged adapters are already inside the base weight."""
    weight = layer.get_base_layer().weight
    if layer.disable_adapters:
        return weight
    present = getattr(layer, layer.adapter_layer_names[0])
    for adapter in layer.active_adapters:
        if adapter in present and adapter not in layer.merged_adapters:
            weight = weight + layer.get_delta_weight(adapter)
    return weight


def _active_copy(wrapper: nn.Module) -> nn.Module:
    """The module a modules-to-save wrapper (conftrl.oft's ``ModulesToSave``, peft's
    ``ModulesToSaveWrapper``) runs: the active adapter's trained copy, else the original."""
    active = wrapper.active_adapter
    return wrapper.modules_to_save[active] if active in wrapper.modules_to_save else wrapper.original_module


def layer_weights(
    model: nn.Module, layer_types: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
) -> dict[str, torch.Tensor]:
    """Effective weight of every layer of ``layer_types``, keyed by module path.

    A wrapper that replaces a layer at its original path counts as that one layer, with the
    weight it computes with, and nothing inside it is measured separately:

    * :class:`MergedWeightLayer` (OFT): the merged weight ``W Rᵀ``;
    * a peft tuner layer (LoRA): ``base + get_delta_weight(adapter)``;
    * a modules-to-save wrapper: its active copy, at the wrapper's path.

    A wrapped layer is selected when either it or its base layer is one of ``layer_types``, so
    ``layer_types=(OFTLayer,)`` measures only the adapted layers, the only ones whose energy can
    move during OFT training.
    """
    peft_layer = _peft_tuner_layer_class()
    weights: dict[str, torch.Tensor] = {}

    def visit(module: nn.Module, path: str) -> None:
        if hasattr(module, "original_module") and hasattr(module, "modules_to_save"):
            return visit(_active_copy(module), path)
        merged = isinstance(module, MergedWeightLayer)
        if merged or (peft_layer is not None and isinstance(module, peft_layer)):
            base = module.base_layer
            if isinstance(module, layer_types) or isinstance(base, layer_types):
                weights[unwrapped_name(path)] = module.get_merged_weight() if merged else _peft_effective_weight(module)
            return None
        if isinstance(module, layer_types) and getattr(module, "weight", None) is not None:
            weights[unwrapped_name(path)] = module.weight
        for name, child in module.named_children():
            visit(child, f"{path}.{name}" if path else name)
        return None

    visit(model, "")
    return weights


def layer_groups(model: nn.Module, names: list[str]) -> dict[str, str]:
    """The kind of each layer in ``names``, independent of where it sits in the network.

    It is the path relative to the innermost *repeated block*: an element of an
    ``nn.ModuleList``/``nn.Sequential`` whose elements all share one class (``resnets.1``,
    ``transformer_blocks.0``, ``attentions.2``). Heterogeneous lists (``ff.net`` = GELU, Dropout,
    Linear; ``to_out`` = Linear, Dropout) are part of the layer's identity, not its location.
    In a diffusers UNet this gives ``attn1.to_q`` (self-attention), ``attn2.to_k``
    (cross-attention, text side), ``attn1.to_out.0``, ``ff.net.0.proj``, ``ff.net.2``,
    ``proj_in``, ``conv1``, ``conv_shortcut``, ``time_emb_proj``, and ``conv`` for
    ``downsamplers.0.conv``; layers outside any repeated block keep their full path (``conv_in``,
    ``time_embedding.linear_1``). Self- and cross-attention are kept apart because their
    ``to_k``/``to_v`` read different inputs (image tokens vs. text embeddings).
    """
    modules = dict(named_modules(model))

    def is_repeated_block(parts: list[str], cut: int) -> bool:
        if not parts[cut - 1].isdigit():
            return False
        container = modules[".".join(parts[: cut - 1])]
        return (
            isinstance(container, (nn.ModuleList, nn.Sequential))
            and len({type(child) for child in container.children()}) == 1
        )

    def group(name: str) -> str:
        parts = name.split(".")
        cut = next((c for c in range(len(parts) - 1, 0, -1) if is_repeated_block(parts, c)), 0)
        return ".".join(parts[cut:])

    return {name: group(name) for name in names}


@dataclass(frozen=True)
class EnergySummary:
    """HE of a model's layers.

    ``per_layer``: HE per layer path. ``per_group``: sums of ``per_layer`` per
    :func:`layer_groups`. ``total``: sum over all layers (the original OFT code's number, up to
    ``include_negated``). ``relative_change*``: ``(HE − HE_ref) / HE_ref`` against a reference,
    over the layers both have — empty/None without a reference.
    """

    per_layer: dict[str, float]
    per_group: dict[str, float]
    total: float
    relative_change: dict[str, float] = field(default_factory=dict)
    relative_change_total: float | None = None

    def log_dict(self, prefix: str = "he") -> dict[str, float]:
        """Flat scalars for a training logger: total, per group, and the reference drift."""
        out = {f"{prefix}/total": self.total}
        out.update({f"{prefix}/{group}": value for group, value in self.per_group.items()})
        if self.relative_change_total is not None:
            out[f"{prefix}/rel_change_total"] = self.relative_change_total
            out[f"{prefix}/rel_change_max_abs"] = max(map(abs, self.relative_change.values()))
        return out


def _relative(value: float, ref: float) -> float:
    return (value - ref) / ref


def layer_energies(
    model: nn.Module,
    layer_types: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d),
    names: Collection[str] | None = None,
    **energy_kwargs,
) -> dict[str, float]:
    """HE of every layer of ``model`` that has one (of those in ``names``, when given), by path."""
    energies = {}
    for name, weight in layer_weights(model, layer_types).items():
        if names is None or name in names:
            energy = hyperspherical_energy(weight, **energy_kwargs)
            if not math.isnan(energy):
                energies[name] = energy
    return energies


def energy_summary(
    model: nn.Module,
    reference: EnergySummary | Mapping[str, float] | nn.Module | None = None,
    layer_types: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d),
    per_layer: Mapping[str, float] | None = None,
    **energy_kwargs,
) -> EnergySummary:
    """Per-layer, per-group and total HE of ``model`` (see :func:`hyperspherical_energy`, whose
    keyword arguments ``energy_kwargs`` are passed on).

    ``reference`` — a previous summary, its ``per_layer`` dict, or a module (e.g. the frozen base
    model; OFT keeps layer paths, so names match as long as both sides are taken at the same
    level, e.g. ``oft_model.model`` against the unwrapped model) — adds the relative change per
    layer and in total over the layers both have. Layers without an energy (see module docstring) are left
    out everywhere. ``per_layer`` — the layers' energies when they are already measured (e.g. by
    several processes, each a share of the layers).
    """
    per_layer = dict(layer_energies(model, layer_types, **energy_kwargs) if per_layer is None else per_layer)
    per_group: dict[str, float] = {}
    for name, group in layer_groups(model, list(per_layer)).items():
        per_group[group] = per_group.get(group, 0.0) + per_layer[name]
    if reference is None:
        return EnergySummary(per_layer, per_group, sum(per_layer.values()))
    if isinstance(reference, nn.Module):
        reference = energy_summary(reference, layer_types=layer_types, **energy_kwargs)
    ref = reference.per_layer if isinstance(reference, EnergySummary) else reference
    common = [name for name in per_layer if name in ref]
    if not common:
        raise ValueError("reference shares no layer path with the model")
    return EnergySummary(
        per_layer,
        per_group,
        sum(per_layer.values()),
        relative_change={name: _relative(per_layer[name], ref[name]) for name in common},
        relative_change_total=_relative(
            sum(per_layer[name] for name in common), sum(ref[name] for name in common)
        ),
    )


def _deviations(module: nn.Module) -> list[float]:
    """``module.rotation_deviation()`` as a list: OFT layers report one value per adapter."""
    reported = module.rotation_deviation()
    values = reported.values() if isinstance(reported, Mapping) else [reported]
    return [float(value) for value in values]


@torch.no_grad()
def rotation_stats(model: nn.Module) -> dict[str, float]:
    """Mean and max of ``‖R − I‖_F`` over the rotations of layers exposing
    ``rotation_deviation()`` (OFT layers; one value per adapter): how far training has moved from
    the identity, and whether COFT's ball binds. Empty when the model has no such layer, so a
    logger can ``update`` with it unconditionally.
    """
    deviations = [
        value
        for module in model.modules()
        if callable(getattr(module, "rotation_deviation", None))
        for value in _deviations(module)
    ]
    if not deviations:
        return {}
    return {
        "rotation_dev_mean": sum(deviations) / len(deviations),
        "rotation_dev_max": max(deviations),
    }
