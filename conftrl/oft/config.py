"""`OFTConfig`: the seed's configuration, with the paper's meaning of every field.

Fields and defaults follow PEFT's `OFTConfig` as documented for the seed release (r = number of
blocks, default 8; eps = 6e-5), plus the later extensions `oft_block_size`,
`use_cayley_neumann`, `num_cayley_neumann_terms` and `exclude_modules`, and `rotation_side`,
which tells the seed PEFT's own adapters (output side) from the paper's. Validation happens
here so a bad combination fails before any module of the model is touched.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

CONFIG_NAME = "adapter_config.json"
PEFT_TYPE = "OFT"
ROTATION_SIDES = ("input", "output")

# Keys PEFT writes that have no effect on OFT's maths; accepted on load, never needed.
_IGNORED_PEFT_KEYS = frozenset(
    {"auto_mapping", "peft_version", "fan_in_fan_out", "layer_replication", "runtime_config"}
)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=4)  # the caller of OFTConfig(...)


@dataclass
class OFTConfig:
    """Configuration of an OFT / COFT adapter.

    Args:
        r: number of diagonal blocks of the rotation ("OFT rank" in the seed). The block size of
            a layer with input dimension d is b = d / r. Exactly one of `r` and `oft_block_size`
            is non-zero.
        oft_block_size: block size b instead of `r` (then r = d / b per layer).
        module_dropout: probability of skipping a layer's adapter for one training forward.
        target_modules: regex (full match) on module names, a list of exact names or name
            suffixes, ``"all-linear"``, or None for the default of a known architecture.
        exclude_modules: names (same matching rules as `target_modules`) never adapted.
        init_weights: True starts at the identity rotation; False draws small random
            rotations (for tests).
        layers_to_transform: only adapt modules whose layer index (the integer after
            `layers_pattern` in the name) is in this list (or equals this int).
        layers_pattern: name of the module list holding the layers, e.g. ``"layers"``; by
            default PEFT's usual names or, on a diffusers UNet, ``down_blocks`` and ``up_blocks``
            (`mid_block` has no index and is never selected; see `model.layer_index`).
        rank_pattern: per-module `r`, keyed by a regex matched against the name's suffix.
        alpha_pattern: accepted as the seed accepts it, with no effect: a rotation has no
            scale. A non-empty value warns once.
        modules_to_save: modules (besides adapted ones) that become trainable copies and are
            saved with the adapter.
        coft: constrain every block's skew matrix to a Frobenius ball (COFT).
        eps: COFT strength; the ball's radius is eps * b**2 / sqrt(n), n = stored blocks.
        block_share: one block shared by all blocks of a layer.
        use_cayley_neumann: approximate the Cayley inverse by a truncated Neumann series.
        num_cayley_neumann_terms: number of Neumann terms (5 is OFTv2's default).
        bias: only ``"none"`` is supported; OFT never changes biases.
        rotation_side: ``"input"`` (the paper's W' = W R^T, PEFT >= 0.14's format) or
            ``"output"`` (W' = R^T W with b = out / r, the seed's PEFT 0.7-0.13 and its format;
            set when such an adapter is loaded, see `conftrl.oft.legacy`).
    """

    r: int = 8
    oft_block_size: int = 0
    module_dropout: float = 0.0
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: Optional[dict[str, int]] = field(default_factory=dict)
    alpha_pattern: Optional[dict[str, Any]] = field(default_factory=dict)
    modules_to_save: Optional[list[str]] = None
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = False
    num_cayley_neumann_terms: int = 5
    bias: str = "none"
    peft_type: str = PEFT_TYPE
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    rotation_side: str = "input"

    def __post_init__(self) -> None:
        # The seed types both patterns Optional[dict]: None means no pattern.
        self.rank_pattern = self.rank_pattern or {}
        self.alpha_pattern = self.alpha_pattern or {}
        if self.peft_type != PEFT_TYPE:
            raise ValueError(f"OFTConfig.peft_type must be {PEFT_TYPE!r}, got {self.peft_type!r}")
        if self.r < 0 or self.oft_block_size < 0:
            raise ValueError(f"r ({self.r}) and oft_block_size ({self.oft_block_size}) must be >= 0")
        if (self.r == 0) == (self.oft_block_size == 0):
            raise ValueError(
                f"Set exactly one of r (number of blocks, got {self.r}) and oft_block_size "
                f"(got {self.oft_block_size}); r * oft_block_size is the layer's input size."
            )
        if not 0.0 <= self.module_dropout < 1.0:
            raise ValueError(f"module_dropout must be in [0, 1), got {self.module_dropout}")
        if self.coft and self.eps <= 0:
            raise ValueError(f"COFT needs eps > 0, got eps={self.eps}")
        if self.use_cayley_neumann and self.num_cayley_neumann_terms < 1:
            raise ValueError(f"num_cayley_neumann_terms must be >= 1, got {self.num_cayley_neumann_terms}")
        if self.alpha_pattern:
            _warn_once("alpha_pattern has no effect on OFT (a rotation has no scale); it is kept as the seed keeps it.")
        if self.rotation_side not in ROTATION_SIDES:
            raise ValueError(f"rotation_side must be one of {ROTATION_SIDES}, got {self.rotation_side!r}")
        if self.rotation_side == "output" and (self.oft_block_size or self.use_cayley_neumann):
            raise ValueError(
                "rotation_side='output' is the OFT of PEFT 0.7-0.13, which has neither oft_block_size "
                f"(got {self.oft_block_size}) nor the Cayley-Neumann series (got {self.use_cayley_neumann}); set r"
            )
        if self.bias != "none":
            raise ValueError(f"OFT leaves biases untouched; bias must be 'none', got {self.bias!r}")
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ValueError("layers_pattern is only used together with layers_to_transform")
        for key, value in self.rank_pattern.items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"rank_pattern[{key!r}] must be a positive int, got {value!r}")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)

    def wanted_layers(self) -> set[int]:
        """`layers_to_transform` as a set of indices (it may be one int)."""
        wanted = self.layers_to_transform
        return {wanted} if isinstance(wanted, int) else set(wanted or ())

    # --- serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "OFTConfig":
        """Build a config from PEFT's `adapter_config.json` fields, refusing foreign formats."""
        values = dict(values)
        peft_type = values.get("peft_type", PEFT_TYPE)
        if peft_type != PEFT_TYPE:
            raise ValueError(f"{source}: peft_type is {peft_type!r}, expected {PEFT_TYPE!r}")
        if "oft_block_size" not in values:
            # Written by PEFT 0.7-0.13 (the seed's): their OFT rotates the output side.
            values.setdefault("rotation_side", "output")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known - _IGNORED_PEFT_KEYS
        if unknown:
            warnings.warn(f"{source}: ignoring keys with no meaning for conftrl's OFT: {sorted(unknown)}")
        return cls(**{k: v for k, v in values.items() if k in known})

    def save(self, directory: Union[str, Path], extra: Optional[dict[str, Any]] = None) -> Path:
        path = Path(directory) / CONFIG_NAME
        payload = {**self.to_dict(), **(extra or {})}
        path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, directory: Union[str, Path]) -> tuple["OFTConfig", dict[str, Any]]:
        """Read `adapter_config.json`; returns the config and the raw dict (for format details)."""
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no {CONFIG_NAME}; is {directory} an adapter folder?")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from error
        return cls.from_dict(raw, source=str(path)), raw
