"""Gradient checkpointing that builds each layer's orthogonal blocks once, not twice.

Plain checkpointing runs a block's forward again in backward, and with it every OFT layer's
Cayley transform (a b x b inversion per block, whatever the batch). The blocks are tiny next to
the activations checkpointing drops, so `checkpoint_keeping_rotations` keeps them: each call
holds its own record of the blocks built in its forward, and the recomputation of that call
takes them from there. The blocks' own autograd graph is stored normally rather than through
the checkpoint (a checkpoint drops what is saved inside it and expects the recomputation to
save it again, which a reused block does not do). Gradients are identical to plain backward.

torch's selective checkpointing (`create_selective_checkpoint_contexts`) can keep an operator's
output too, but it sends every operator of the block through a Python dispatch mode: saving
nothing, that alone made a checkpointed step of the 115 M-parameter SD-shaped UNet 3-10 % slower
on a CPU, as much as or more than the transforms cost.

With diffusers: `unet.enable_gradient_checkpointing(checkpoint_keeping_rotations)`.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# The blocks built so far in the checkpointed call being run (forward or its recomputation).
_kept_blocks: ContextVar[Optional[dict[nn.Module, torch.Tensor]]] = ContextVar("kept_blocks", default=None)


def _unchanged(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def blocks_of(rotation: nn.Module, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """`build()`, or inside `checkpoint_keeping_rotations` the blocks this call built already."""
    kept = _kept_blocks.get()
    if kept is None:
        return build()
    if rotation not in kept:
        # Saved tensors of the transform bypass the checkpoint's hooks: they stay in memory.
        with torch.autograd.graph.saved_tensors_hooks(_unchanged, _unchanged):
            kept[rotation] = build()
    return kept[rotation]


def checkpoint_keeping_rotations(function: Callable, *args: Any, **kwargs: Any) -> Any:
    """`torch.utils.checkpoint.checkpoint(function, *args)`, non-reentrant, building OFT blocks once.

    Its signature is the one diffusers' `enable_gradient_checkpointing` expects of a
    checkpointing function (the module first, then its inputs).
    """
    kept: dict[nn.Module, torch.Tensor] = {}

    def run(*inner_args: Any, **inner_kwargs: Any) -> Any:
        token = _kept_blocks.set(kept)
        try:
            return function(*inner_args, **inner_kwargs)
        finally:
            _kept_blocks.reset(token)

    return checkpoint(run, *args, use_reentrant=False, **kwargs)
