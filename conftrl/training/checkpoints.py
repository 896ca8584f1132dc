"""Checkpoint files: written atomically, read without unpickling code, found and judged for resume.

Lightning's TorchCheckpointIO writes through an fsspec transaction, which stages the file in
the system temp directory and `shutil.move`s it into place. When that directory is on another
filesystem (a tmpfs /tmp, a network checkpoint dir) the move degrades to a copy *into* the
destination, so a full disk or a crash mid-copy leaves a truncated file where the last good
checkpoint was; nothing is fsynced either. Here `conftrl.utils.atomic` writes beside the target and
renames. Loading is always `weights_only=True`: a checkpoint is tensors and plain data, and
a file that holds anything else is refused rather than run.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from conftrl.utils.atomic import atomic_write

# `ckpt_path` values with a meaning of Lightning's own ("registry:<name>" too), passed through.
LIGHTNING_KEYWORDS = ("best", "hpc", "registry")


class CheckpointError(ValueError):
    """A checkpoint to resume from is missing, damaged, or holds more than tensors and data."""


def describe(path: str | os.PathLike) -> str:
    """`path`, and for a link the file it points to."""
    path = Path(path)
    return f"{path} (-> {os.readlink(path)})" if path.is_symlink() else str(path)


def saved_step(path: str | os.PathLike) -> int | None:
    """The optimizer step a checkpoint was saved at, or None if it cannot be read.
    Memory-mapped, so a large checkpoint costs only the read of its small entries."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    except Exception:  # any unreadable file simply is no candidate
        return None


def newest_checkpoint(
    folder: str | os.PathLike, before_step: float = float("inf"), besides: Path | None = None
) -> tuple[Path, int] | None:
    """(path, step) of the newest readable checkpoint in `folder` saved before `before_step`,
    leaving out links and `besides`; None if there is none."""
    found = []
    for path in Path(folder).glob(f"*{ModelCheckpoint.FILE_EXTENSION}"):
        if path.is_symlink() or (besides is not None and path.resolve() == besides.resolve()):
            continue
        step = saved_step(path)
        if step is not None and step < before_step:
            found.append((step, path.stat().st_mtime, path))
    if not found:
        return None
    step, _, path = max(found)
    return path, step


def non_finite(node, name: str = "") -> list[str]:
    """Where a nest of dicts and lists (a checkpoint) holds NaN or infinite floating-point values."""
    if isinstance(node, torch.Tensor):
        return [name] if node.is_floating_point() and not torch.isfinite(node).all() else []
    if isinstance(node, dict):
        return [bad for key, value in node.items() for bad in non_finite(value, f"{name}.{key}".lstrip("."))]
    if isinstance(node, (list, tuple)):
        return [bad for i, value in enumerate(node) for bad in non_finite(value, f"{name}.{i}".lstrip("."))]
    return []


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """`torch.load(path, weights_only=True)`, with errors that name the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {describe(path)} not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" in str(error):  # what torch says of a class or function in the pickle
            raise CheckpointError(
                f"{describe(path)} holds objects other than tensors and plain data; conftrl loads "
                "checkpoints with weights_only=True and does not unpickle them"
            ) from error
        problem = error
    except (EOFError, RuntimeError, OSError, ValueError) as error:
        problem = error
    previous = newest_checkpoint(path.parent, besides=path)
    hint = f"the previous checkpoint is {previous[0]} (step {previous[1]})" if previous else "no other checkpoint is there"
    state = "empty" if path.stat().st_size == 0 else "truncated or corrupt"
    raise CheckpointError(
        f"checkpoint {describe(path)} is damaged ({state}; {type(problem).__name__}: {problem}); {hint}"
    ) from problem


def resume_path(ckpt_path: str | None, trainer: Trainer) -> str | None:
    """The checkpoint file `ckpt_path` means: "last" is the run's `last.ckpt`, which must exist.
    Lightning itself would start from step 0, with only a warning, when there is none."""
    if ckpt_path is None or ckpt_path.split(":", 1)[0] in LIGHTNING_KEYWORDS or "://" in ckpt_path:
        return ckpt_path
    if ckpt_path != "last":
        if not Path(ckpt_path).is_file():
            raise CheckpointError(f"ckpt_path={ckpt_path}: no such checkpoint file")
        return ckpt_path
    callback = trainer.checkpoint_callback
    if callback is None or callback.dirpath is None:
        raise CheckpointError("ckpt_path=last: this run writes no checkpoints (no model_checkpoint callback)")
    last = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
    if last.is_symlink() and not last.exists():
        raise CheckpointError(f"ckpt_path=last: {describe(last)} points to a file that does not exist")
    if not last.is_file():
        raise CheckpointError(
            f"ckpt_path=last: nothing to resume, no {last.name} in {callback.dirpath}. Run in the earlier "
            "run's directory (hydra.run.dir=<its dir>) or give a checkpoint file as ckpt_path"
        )
    return str(last)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO plugin for local paths; remote URLs keep Lightning's own path."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        # A Python file object, so that the writer's OSError (a full disk) reaches `atomic_write`.
        atomic_write(path, lambda file: torch.save(checkpoint, file))

    def load_checkpoint(self, path, map_location: Any = "cpu", weights_only: bool | None = True) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only=True)
        return load_checkpoint_file(path, map_location)
