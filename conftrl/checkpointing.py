"""Checkpoint files that are either the old one or the complete new one, never half of each.

Lightning's TorchCheckpointIO writes through an fsspec transaction, which stages the file in
the system temp directory and `shutil.move`s it into place. When that directory is on another
filesystem (a tmpfs /tmp, a network checkpoint dir) the move degrades to a copy *into* the
destination, so a full disk or a crash mid-copy leaves a truncated file where the last good
checkpoint was; nothing is fsynced either. Here the temporary file sits beside the target,
is fsynced, and replaces it with one atomic rename.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` to a sibling temporary file, fsync, then `os.replace` onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO plugin for local paths; remote URLs keep Lightning's own path."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)
