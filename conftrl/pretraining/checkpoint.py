"""One-file checkpoints: every tensor in a safetensors file, everything else as JSON in its header.

A training state is a nest of dicts and lists (model and optimizer state dicts, EMA, LR
schedule, progress counters). Its tensors go into the safetensors body under dotted names; the
nest itself, with each tensor replaced by its name, goes into the header metadata as JSON. Every
node is tagged with its kind, so integer keys (optimizer state) and lists survive the round
trip. One file means one atomic `os.replace`: a crash leaves the previous checkpoint or the new
one, never a mix. No pickle is involved anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from conftrl.utils.atomic import atomic_write

_HEADER_KEY = "conftrl.state"


def _split(node: Any, name: str, tensors: dict[str, torch.Tensor]) -> dict:
    if isinstance(node, torch.Tensor):
        tensors[name] = node.detach().cpu().contiguous().clone()
        return {"tensor": name}
    if isinstance(node, dict):
        return {"dict": [[key, _split(value, f"{name}.{key}", tensors)] for key, value in node.items()]}
    if isinstance(node, (list, tuple)):
        return {"list": [_split(value, f"{name}.{i}", tensors) for i, value in enumerate(node)]}
    return {"value": node}


def _join(node: dict, tensors: dict[str, torch.Tensor]) -> Any:
    (kind, content), = node.items()
    if kind == "tensor":
        return tensors[content]
    if kind == "dict":
        return {key: _join(value, tensors) for key, value in content}
    if kind == "list":
        return [_join(value, tensors) for value in content]
    return content


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write `state` to `path` atomically (`conftrl.utils.atomic.atomic_write`)."""
    tensors: dict[str, torch.Tensor] = {}
    header = json.dumps(_split(state, "state", tensors))
    atomic_write(path, lambda file: file.write(save(tensors, metadata={_HEADER_KEY: header})))


class DamagedCheckpointError(ValueError):
    """A checkpoint file that cannot be read back: empty, truncated, or not one of ours."""


def load_checkpoint(path: str | Path) -> dict:
    """The state saved by :func:`save_checkpoint`, tensors on the CPU."""
    try:
        with safe_open(str(path), framework="pt") as file:
            header = json.loads((file.metadata() or {})[_HEADER_KEY])
        return _join(header, load_file(str(path)))
    except (SafetensorError, KeyError, ValueError) as error:  # JSONDecodeError is a ValueError
        raise DamagedCheckpointError(
            f"checkpoint {path} is damaged ({type(error).__name__}: {error}); delete it to start the run over"
        ) from error
