"""Module paths as the model defines them, whatever wraps its blocks."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

# The attribute under which torch's FullyShardedDataParallel keeps the block it wraps; it
# appears in the path of every module inside such a block.
FSDP_WRAPPED = "_fsdp_wrapped_module."


def unwrapped_name(name: str) -> str:
    """`name` without FSDP's wrappers: the path the unwrapped model has, and files record."""
    return name.replace(FSDP_WRAPPED, "")


def named_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """`model.named_modules()` under their unwrapped paths (FSDP's wrappers themselves left out)."""
    for name, module in model.named_modules():
        if not name.endswith(FSDP_WRAPPED.rstrip(".")):
            yield unwrapped_name(name), module
