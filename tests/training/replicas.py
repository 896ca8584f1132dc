"""A probe callback for the DDP test, importable by spawned workers (PYTHONPATH=tests/training)."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import Callback


class SaveTrainableState(Callback):
    """Each rank writes its trainable weights to `directory/rank<global rank>.pt` when fit ends."""

    def __init__(self, directory: str):
        self.directory = Path(directory)

    def on_train_end(self, trainer, module) -> None:
        state = {name: p.detach().cpu() for name, p in module.named_parameters() if p.requires_grad}
        self.directory.mkdir(parents=True, exist_ok=True)
        torch.save({"step": trainer.global_step, "state": state}, self.directory / f"rank{trainer.global_rank}.pt")
