"""Whole weights under Fully Sharded Data Parallel (`trainer=fsdp`).

FSDP leaves each rank a shard of every weight outside the forward pass. The watchers and the
adapter export read whole weights, so they read them inside `whole_weights`, which gathers
them on every rank for the duration and frees them after. Gathering is a collective: every
rank must enter it, and forward passes inside it are collectives too (each FSDP unit still
gathers in step), so under FSDP every rank makes the same forward calls.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager

from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` (a strategy's possibly wrapped module) is sharded by FSDP."""
    return isinstance(model, FullyShardedDataParallel)


def whole_weights(model: nn.Module) -> ContextManager:
    """Every weight whole on every rank while inside, unchanged when left (no write-back);
    nothing to do when `model` is not sharded."""
    if not is_sharded(model):
        return nullcontext()
    return FullyShardedDataParallel.summon_full_params(model, writeback=False)

