"""The seed's own OFT (PEFT 0.7-0.13): a rotation of the layer's output side, and its format.

Those releases compute y = R^T W x + b, i.e. W' = R^T W: R = blockdiag(Q_1 .. Q_r) acts on
the out features (b = out / r), so it mixes neurons and, unlike input-side OFT, does not keep
the hyperspherical energy. Each block is stored whole, a b x b matrix A (key `oft_r`, shape
(r or 1, b, b)), and Q = (I - S)(I + S)^-1 with S = (A - A^T) / 2. COFT rescales A itself
into the ball ||A||_F <= eps * b^2 / sqrt(n): the same radius as conftrl's, on another norm.
conftrl reproduces this exactly so adapters saved by the seed's PEFT load, give its outputs
(merged and unmerged), train on, and are written back in their own format; that includes
which layers its `layers_to_transform` selects (`seed_keeps_layer`).
"""

from __future__ import annotations

import re
from typing import Any, Optional, Union

import torch

from conftrl.oft.blockwise import rotate_columns
from conftrl.oft.config import OFTConfig
from conftrl.oft.rotation import OFTRotation, solve_blocks

# The fields of the seed's OFTConfig, in its adapter_config.json (no `oft_block_size`).
SEED_CONFIG_KEYS = (
    "peft_type", "auto_mapping", "base_model_name_or_path", "revision", "task_type", "inference_mode",
    "rank_pattern", "alpha_pattern", "r", "module_dropout", "target_modules", "init_weights",
    "layers_to_transform", "layers_pattern", "modules_to_save", "coft", "eps", "block_share",
)


class OutputRotation(OFTRotation):
    """The seed PEFT's rotation of a layer's output side, W' = R^T W, stored as whole blocks A."""

    side = "output"
    saved_key = "oft_r"

    @staticmethod
    def stored_block_shape(block_size: int) -> tuple[int, ...]:
        return (block_size, block_size)

    def block_norms(self) -> torch.Tensor:
        """||A||_F per stored block: the seed's COFT constrains the whole stored matrix."""
        return self.weight.flatten(1).norm(dim=1)

    def skew(self) -> torch.Tensor:
        return 0.5 * (self.weight - self.weight.transpose(1, 2))

    def rotate_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """R^T W for a flattened (out, d) weight: each block of b rows mixed by Q_i^T."""
        return rotate_columns(weight.contiguous().unsqueeze(0), self.blocks().to(weight.dtype)).squeeze(0)

    def unrotate_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W from R^T W by an exact solve per block of rows."""
        out, d = weight.shape
        blocks = self.expanded_blocks().to(weight.dtype)
        rows = weight.reshape(self.num_blocks, self.block_size, d)
        return solve_blocks(blocks.transpose(1, 2), rows).reshape(out, d)


def seed_config_values(config: OFTConfig, target_modules: Any) -> dict[str, Any]:
    """adapter_config.json in the seed's format: its fields only, eps in its own (= conftrl's) units."""
    values = {key: value for key, value in config.to_dict().items() if key in SEED_CONFIG_KEYS}
    return {**values, "auto_mapping": None, "target_modules": target_modules, "inference_mode": True}


def seed_keeps_layer(name: str, targets: Union[list[str], str], config: OFTConfig) -> bool:
    """The seed's `layers_to_transform`, so its adapters find the layers they were saved from.

    It filters only names matched as the suffix of a listed target (a regex target or an exact
    name is kept), by the number after the last `.<list>.` in the name followed by a dot, where
    <list> is `layers_pattern`, or any module when it is unset: on a UNet that is the
    `transformer_blocks` or `attentions` index, not the `down_blocks` one.
    """
    if isinstance(targets, str) or name in targets:
        return True
    return _seed_layer_index(name, config.layers_pattern) in config.wanted_layers()


def _seed_layer_index(name: str, layers_pattern: Optional[Union[list[str], str]]) -> Optional[int]:
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or [r"[^.]*"])
    for pattern in patterns:
        match = re.match(rf".*\.{pattern}\.(\d+)\.", name)
        if match:
            return int(match.group(1))
    return None
