"""A probe callback for DDP data tests, importable by spawned workers (PYTHONPATH=tests/training)."""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch import Callback


class RecordCaptions(Callback):
    """Each rank writes the captions of the training batches it took to `directory/rank<r>.json`."""

    def __init__(self, directory: str):
        self.directory = Path(directory)
        self.captions: list[str] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.captions += batch["caption"]

    def on_train_end(self, trainer, module) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.captions))
