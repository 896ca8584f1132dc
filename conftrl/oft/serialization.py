"""Reading and writing adapters in PEFT's current OFT format (PEFT >= 0.18), and the seed's.

Folder layout: `adapter_config.json` + `adapter_model.safetensors` with keys
`base_model.model.<module path>.oft_R.weight` of shape (r or 1, b(b-1)/2). Two conventions
differ between conftrl and PEFT and are converted here, so outputs match in both libraries:
- Cayley-Neumann: PEFT's series approximates the transpose of its exact Cayley map, i.e. the
  rotation of -S; conftrl uses one map for both, so the stored triangle is negated.
- COFT radius: PEFT >= 0.16 uses eps / sqrt(n), conftrl (paper, seed) eps * b^2 / sqrt(n).
  conftrl's own eps travels in the safetensors metadata, PEFT's in the config.
Adapters of the seed's PEFT (0.7-0.13, `conftrl.oft.legacy`) are read and written in their own
format: no `oft_block_size` in the config, keys `<module path>.oft_r` of shape (r or 1, b, b),
eps unconverted.
Only safetensors are read: a pickle can run arbitrary code on load.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save

from conftrl.oft.config import OFTConfig
from conftrl.oft.legacy import seed_config_values
from conftrl.utils.atomic import atomic_write

if TYPE_CHECKING:
    from conftrl.oft.model import OFTModel

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")
KEY_PREFIX = "base_model.model."
# The PEFT release whose OFT parameterisation (and Cayley-Neumann series) conftrl reproduces.
PEFT_FORMAT_VERSION = "0.18.0"
_EPS_METADATA = "conftrl_eps"
_FORMATS = {
    "input": "PEFT >= 0.14's format (the config has oft_block_size; keys oft_R.weight)",
    "output": "PEFT 0.7-0.13's format (the config has no oft_block_size; keys oft_r)",
}


def _rotation_sign(config: OFTConfig) -> float:
    return -1.0 if config.use_cayley_neumann else 1.0


def adapter_state(wrapped: "OFTModel", adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key names (COFT-projected, PEFT sign convention)."""
    config = wrapped.peft_config[adapter_name]
    state: dict[str, torch.Tensor] = {}
    for name, layer in wrapped.oft_layers():
        if adapter_name in layer.oft_R:
            rotation = layer.oft_R[adapter_name]
            rotation.project_()
            weight = rotation.weight.detach() * _rotation_sign(config)
            state[f"{KEY_PREFIX}{name}.{rotation.saved_key}"] = weight.float().cpu().contiguous()
    for name, saved in wrapped.saved_modules():
        if adapter_name in saved.modules_to_save:
            for key, tensor in saved.modules_to_save[adapter_name].state_dict().items():
                state[f"{KEY_PREFIX}{name}.{key}"] = tensor.detach().cpu().contiguous()
    return state


def _peft_eps(wrapped: "OFTModel", adapter_name: str) -> float:
    """PEFT's eps giving the same COFT ball; exact when all layers share one block size."""
    config = wrapped.peft_config[adapter_name]
    sizes = {layer.oft_R[adapter_name].block_size for _, layer in wrapped.oft_layers() if adapter_name in layer.oft_R}
    if config.coft and len(sizes) > 1:
        warnings.warn(
            f"COFT adapter {adapter_name!r} has block sizes {sorted(sizes)}; PEFT has one radius for all "
            "layers, so its eps is written for the largest block. Outputs match; further COFT training "
            "in PEFT would constrain the smaller blocks less tightly."
        )
    return config.eps * max(sizes) ** 2


def save_adapter(wrapped: "OFTModel", adapter_name: str, directory: Path) -> Path:
    """Write the adapter in the format of its rotation side: PEFT's current one, or the seed's."""
    config = wrapped.peft_config[adapter_name]
    directory.mkdir(parents=True, exist_ok=True)
    state = adapter_state(wrapped, adapter_name)
    seed_format = config.rotation_side == "output"
    metadata = {"format": "pt"} if seed_format else {"format": "pt", _EPS_METADATA: repr(config.eps)}
    atomic_write(directory / "adapter_model.safetensors", lambda file: file.write(save(state, metadata=metadata)))
    # Defaults resolved from the architecture are written out: PEFT has other defaults.
    targets = wrapped.resolve_targets(config)
    values = seed_config_values(config, targets) if seed_format else _current_config_values(wrapped, adapter_name, targets)
    atomic_write(directory / "adapter_config.json", lambda file: _write_json(file, values))
    return directory


def _current_config_values(wrapped: "OFTModel", adapter_name: str, targets: Any) -> dict[str, Any]:
    config = wrapped.peft_config[adapter_name]
    extra = {"eps": _peft_eps(wrapped, adapter_name), "peft_version": PEFT_FORMAT_VERSION, "inference_mode": True}
    values = {**config.to_dict(), **extra, "target_modules": targets}
    for key in ("rank_pattern", "alpha_pattern"):
        if not values[key]:
            del values[key]  # PEFT's current OFT has neither (it ignores them); written only when set
    del values["rotation_side"]
    return values


def _write_json(file, values: dict[str, Any]) -> None:
    file.write((json.dumps(values, indent=2, sort_keys=True) + "\n").encode())


def read_config(directory: Path) -> tuple[OFTConfig, dict[str, Any]]:
    """The adapter's config in conftrl's convention, plus the raw file values."""
    config, raw = OFTConfig.load(directory)
    metadata = _weights_metadata(directory)
    if _EPS_METADATA in metadata:
        config.eps = float(metadata[_EPS_METADATA])
    return config, raw


def _weights_path(directory: Path) -> Path:
    path = directory / WEIGHTS_NAME
    if path.is_file():
        return path
    pickles = [name for name in PICKLE_NAMES if (directory / name).exists()]
    if pickles:
        raise ValueError(
            f"{directory / pickles[0]}: conftrl loads adapters only from safetensors; a pickle file can "
            "execute code when loaded. Convert it once in a trusted environment "
            "(torch.load + safetensors.torch.save_file) to adapter_model.safetensors."
        )
    raise FileNotFoundError(f"{path}: missing; an adapter folder holds {WEIGHTS_NAME} and adapter_config.json")


def _weights_metadata(directory: Path) -> dict[str, str]:
    path = _weights_path(directory)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from error


def load_weights(wrapped: "OFTModel", adapter_name: str, directory: Path, raw_config: dict[str, Any]) -> None:
    """Copy the saved tensors into the freshly added adapter, checking keys and shapes."""
    path = _weights_path(directory)
    try:
        saved = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from error
    config = wrapped.peft_config[adapter_name]
    expected = adapter_state(wrapped, adapter_name)
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{path}: keys do not match the model's adapter layers. "
            f"Missing ({len(missing)}): {missing[:5]}; unexpected ({len(extra)}): {extra[:5]}. "
            "Was it trained on another base model or with other target_modules / r? "
            f"(Read in {_FORMATS[config.rotation_side]}.)"
        )
    for key, tensor in saved.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(f"{path}: {key} has shape {tuple(tensor.shape)}, the model expects {tuple(expected[key].shape)}")

    sign = _rotation_sign(config)
    prefix = len(KEY_PREFIX)
    with torch.no_grad():
        for name, layer in wrapped.oft_layers():
            if adapter_name in layer.oft_R:
                rotation = layer.oft_R[adapter_name]
                rotation.weight.copy_(saved[f"{KEY_PREFIX}{name}.{rotation.saved_key}"] * sign)
        for name, module in wrapped.saved_modules():
            if adapter_name in module.modules_to_save:
                local = {k[prefix + len(name) + 1 :]: v for k, v in saved.items() if k.startswith(f"{KEY_PREFIX}{name}.")}
                module.modules_to_save[adapter_name].load_state_dict(local)

    # The seed's format keeps conftrl's eps; only PEFT's current format needs its radius adopted.
    if config.coft and config.rotation_side == "input" and _EPS_METADATA not in _weights_metadata(directory):
        _adopt_peft_radius(wrapped, adapter_name, float(raw_config["eps"]))


def _adopt_peft_radius(wrapped: "OFTModel", adapter_name: str, peft_eps: float) -> None:
    """Give each layer PEFT's radius eps / sqrt(n) exactly, whatever its block size."""
    sizes = Counter()
    for _, layer in wrapped.oft_layers():
        if adapter_name in layer.oft_R:
            rotation = layer.oft_R[adapter_name]
            rotation.eps = peft_eps / rotation.block_size**2
            sizes[rotation.block_size] += 1
    common = sizes.most_common(1)[0][0]
    wrapped.peft_config[adapter_name].eps = peft_eps / common**2
