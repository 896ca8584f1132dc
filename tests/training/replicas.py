"""Probe callbacks for the DDP tests, importable by every rank (PYTHONPATH=tests/training)."""

from __future__ import annotations

import json
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


class RecordBatches(Callback):
    """Each rank appends, per training step, the keys of its batch and its loss to
    `directory/batches_rank<global rank>.jsonl` (a resumed run continues the file)."""

    def __init__(self, directory: str):
        self.directory = Path(directory)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        record = {"step": trainer.global_step, "keys": list(batch["key"]), "loss": float(outputs["loss"])}
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / f"batches_rank{trainer.global_rank}.jsonl", "a") as file:
            file.write(json.dumps(record) + "\n")
