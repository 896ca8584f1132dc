"""Fully Sharded Data Parallel (`trainer=fsdp`): the strategy, and whole weights to read.

FSDP leaves each rank a shard of every weight outside the forward pass. The watchers and the
adapter export read whole weights, so they read them inside `whole_weights`, which gathers
them on every rank for the duration and frees them after. Gathering is a collective: every
rank must enter it. Forward passes are collectives too (each FSDP unit gathers its weights in
step), so under FSDP every rank makes the same forward calls; and after a forward pass each
unit holds its shard again, so weights read after sampling need a gathering of their own.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager

from lightning.pytorch import strategies
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


class FSDPStrategy(strategies.FSDPStrategy):
    """Lightning's FSDP strategy, which keeps the module's wrapper for the stages after fit.

    Lightning wraps the module when `trainer.fit` starts. A later `trainer.validate` finds FSDP
    units inside the module and takes it as already wrapped, without the outer wrapper that
    owns the weights outside the units (the control encoder, the UNet's first and last layers,
    the VAE, the text encoder): they stay shards and the forward pass fails (Lightning issue
    19015). This strategy hands back the wrapper it made for that module instead.
    """

    def _setup_model(self, model: nn.Module) -> nn.Module:
        wrapper = getattr(self, "_wrapper", None)
        if wrapper is not None and wrapper.module is model:
            return wrapper
        self._wrapper = super()._setup_model(model)
        return self._wrapper
