"""`OFTModel`: finds the target layers of any torch model and wraps them with OFT adapters.

The API is the seed's (PEFT's `OFTModel`): `OFTModel(model, config, adapter_name)`, attributes
`model` and `peft_config`, adapter management, merge / unload, and PEFT's on-disk format.
"""

from __future__ import annotations

import contextlib
import copy
import re
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from torch import nn

from conftrl.oft import serialization
from conftrl.oft.config import OFTConfig
from conftrl.oft.layer import OFTLayer, wrap
from conftrl.oft.legacy import seed_keeps_layer
from conftrl.utils.names import named_modules

# Targets used when `target_modules` is None, per architecture class name.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    # The paper's controllable-generation set: attention projections and the GEGLU input.
    "UNet2DConditionModel": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj"],
    "CLIPTextModel": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "CLIPTextModelWithProjection": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}
# Module lists searched for a layer index when `layers_pattern` is not given: those of PEFT's
# transformer models, and a diffusers UNet's down and up blocks.
COMMON_LAYER_LISTS = ("layers", "h", "blocks", "layer", "block", "down_blocks", "up_blocks")


def name_matches(name: str, targets: Union[str, list[str]]) -> bool:
    """PEFT's rule: a string is a regex full match; a list matches exact names or suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def pattern_value(name: str, pattern: dict[str, Any]) -> Optional[Any]:
    """The value of the first key of `pattern` that matches the end of `name` as a regex."""
    for key, value in pattern.items():
        if re.fullmatch(rf"(.*\.)?(?:{key})", name):
            return value
    return None


def layer_index(name: str, layers_pattern: Optional[Union[str, list[str]]]) -> Optional[int]:
    """The index after the outermost `layers_pattern` list in `name` (default: COMMON_LAYER_LISTS).

    On a diffusers UNet the default is the block index users see: `down_blocks.N...` and
    `up_blocks.N...` both have index N (`layers_pattern="up_blocks"` keeps one side), not that of
    the `transformer_blocks` inside. `mid_block` has no index, so `layers_to_transform` never
    selects it; target it by name instead.
    """
    lists = [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or COMMON_LAYER_LISTS)
    alternatives = "|".join(re.escape(p) for p in lists)
    match = re.search(rf"(?:^|\.)(?:{alternatives})\.(\d+)(?:\.|$)", name)
    return int(match.group(1)) if match else None


def keeps_layer(name: str, targets: Union[str, list[str]], config: OFTConfig) -> bool:
    """Whether `layers_to_transform` keeps the target `name`."""
    return layer_index(name, config.layers_pattern) in config.wanted_layers()


class ModulesToSave(nn.Module):
    """A frozen original module plus one trainable copy per adapter (PEFT's modules_to_save)."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: Optional[str] = None
        self.training = self.modules_to_save.training = original.training  # flags only: copies keep their modes

    def add_adapter(self, adapter_name: str) -> None:
        trainable = copy.deepcopy(self.original_module)
        trainable.requires_grad_(True)
        self.modules_to_save[adapter_name] = trainable
        self.active_adapter = adapter_name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.active_adapter is None or self.active_adapter not in self.modules_to_save:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active_adapter](*args, **kwargs)


class OFTModel(nn.Module):
    """Wraps `model` in place with OFT adapters; forward passes through to `model`.

    Unknown attributes are looked up on the wrapped model, so a wrapped diffusers UNet still
    answers `config`, `dtype`, `device` and friends inside a pipeline.
    """

    prefix = "oft_R"

    def __init__(self, model: nn.Module, config: OFTConfig, adapter_name: str = "default") -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, OFTConfig] = {}
        self.active_adapters: list[str] = []
        model.requires_grad_(False)
        self.training = model.training  # only the flag: the model's own modules keep their modes
        self.add_adapter(adapter_name, config)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    # --- injection --------------------------------------------------------------------------

    def resolve_targets(self, config: OFTConfig) -> Union[str, list[str]]:
        if config.target_modules is not None:
            return config.target_modules
        architecture = type(self.model).__name__
        if architecture not in DEFAULT_TARGET_MODULES:
            raise ValueError(
                f"target_modules is None and conftrl knows no default targets for {architecture}; "
                f"set target_modules (known defaults: {sorted(DEFAULT_TARGET_MODULES)})"
            )
        return DEFAULT_TARGET_MODULES[architecture]

    def _target_names(self, config: OFTConfig) -> list[str]:
        targets = self.resolve_targets(config)
        candidates = [(n, m) for n, m in named_modules(self.model) if n and not _inside_wrapper(n)]
        if targets == "all-linear":
            output_layer = _output_layer_name(self.model)
            names = [n for n, m in candidates if _is_linear(m) and n != output_layer]
        else:
            names = [n for n, m in candidates if name_matches(n, targets)]
        if config.exclude_modules:
            names = [n for n in names if not name_matches(n, config.exclude_modules)]
        if config.layers_to_transform is not None:
            keeps = seed_keeps_layer if config.rotation_side == "output" else keeps_layer
            names = [n for n in names if keeps(n, targets, config)]
        if not names:
            sample = [n for n, m in candidates if _is_linear(m) or isinstance(m, nn.Conv2d)][:20]
            raise ValueError(
                f"target_modules={targets!r} matched no module of {type(self.model).__name__} "
                f"(after layers_to_transform / exclude_modules). Some Linear/Conv2d modules: {sample}"
            )
        return names

    def add_adapter(self, adapter_name: str, config: OFTConfig) -> None:
        """Add an adapter to every target layer and make it the (only) active one."""
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists")
        names = self._target_names(config)
        for name in names:
            module = self.model.get_submodule(name)
            if isinstance(module, ModulesToSave):
                raise ValueError(f"{name} is in modules_to_save and cannot also be an OFT target")
            if not isinstance(module, OFTLayer):
                module = wrap(module, name)
                _set_submodule(self.model, name, module)
            module.add_adapter(adapter_name, config, name, r=pattern_value(name, config.rank_pattern))
        for name in config.modules_to_save or []:
            self._add_module_to_save(name, adapter_name)
        self.peft_config[adapter_name] = config
        self.set_adapter(adapter_name)

    def _add_module_to_save(self, key: str, adapter_name: str) -> None:
        matches = [n for n, _ in named_modules(self.model) if n and name_matches(n, [key]) and not _inside_wrapper(n)]
        if not matches:
            raise ValueError(f"modules_to_save entry {key!r} matched no module")
        for name in matches:
            module = self.model.get_submodule(name)
            if not isinstance(module, ModulesToSave):
                module = ModulesToSave(module)
                _set_submodule(self.model, name, module)
            module.add_adapter(adapter_name)

    # --- adapter management -----------------------------------------------------------------

    def oft_layers(self) -> Iterator[tuple[str, OFTLayer]]:
        for name, module in named_modules(self.model):
            if isinstance(module, OFTLayer):
                yield name, module

    def saved_modules(self) -> Iterator[tuple[str, ModulesToSave]]:
        for name, module in named_modules(self.model):
            if isinstance(module, ModulesToSave):
                yield name, module

    def set_adapter(self, adapter_name: Union[str, list[str]]) -> None:
        """Activate one adapter, or several applied in the order given; only they train."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        missing = [n for n in names if n not in self.peft_config]
        if missing:
            raise ValueError(f"unknown adapter(s) {missing}; available: {sorted(self.peft_config)}")
        for _, layer in self.oft_layers():
            layer.set_adapter(names)
            for adapter, rotation in layer.oft_R.items():
                trainable = adapter in names and not self.peft_config[adapter].inference_mode
                rotation.requires_grad_(trainable)
        for _, saved in self.saved_modules():
            saved.active_adapter = names[-1] if names[-1] in saved.modules_to_save else None
            for adapter, module in saved.modules_to_save.items():
                module.requires_grad_(adapter == saved.active_adapter and not self.peft_config[adapter].inference_mode)
        self.active_adapters = names

    @property
    def active_adapter(self) -> str:
        return self.active_adapters[0]

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter {adapter_name!r}; available: {sorted(self.peft_config)}")
        for _, layer in self.oft_layers():
            if adapter_name in layer.oft_R:
                layer.delete_adapter(adapter_name)
        for _, saved in self.saved_modules():
            saved.modules_to_save.pop(adapter_name, None)
        del self.peft_config[adapter_name]
        remaining = [a for a in self.active_adapters if a != adapter_name] or list(self.peft_config)[:1]
        if remaining:
            self.set_adapter(remaining)
        else:
            self.active_adapters = []

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model: adapters (merged ones are unmerged first) and saved copies off."""
        saved_active = {name: m.active_adapter for name, m in self.saved_modules()}
        for _, layer in self.oft_layers():
            layer.disabled = True
        for _, saved in self.saved_modules():
            saved.active_adapter = None
        try:
            yield
        finally:
            for _, layer in self.oft_layers():
                layer.disabled = False
            for name, saved in self.saved_modules():
                saved.active_adapter = saved_active[name]

    # --- merge / unload ---------------------------------------------------------------------

    def merge_adapter(self, adapter_names: Optional[list[str]] = None) -> None:
        for _, layer in self.oft_layers():
            layer.merge(adapter_names or self.active_adapters)

    def unmerge_adapter(self) -> None:
        for _, layer in self.oft_layers():
            layer.unmerge()

    def _unload(self, merge: bool) -> nn.Module:
        for name, layer in list(self.oft_layers()):
            if merge:
                layer.merge(self.active_adapters)
            elif layer.merged:
                layer.unmerge()
            _set_submodule(self.model, name, layer.base_layer)
        for name, saved in list(self.saved_modules()):
            keep = saved.modules_to_save[saved.active_adapter] if merge and saved.active_adapter else saved.original_module
            _set_submodule(self.model, name, keep)
        return self.model

    def merge_and_unload(self) -> nn.Module:
        """Fold the active adapters into the weights and return the plain model (zero overhead)."""
        return self._unload(merge=True)

    def unload(self) -> nn.Module:
        """Remove all adapters and return the original model."""
        return self._unload(merge=False)

    # --- parameters -------------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # --- save / load ------------------------------------------------------------------------

    def save_pretrained(self, save_directory: Union[str, Path], selected_adapters: Optional[list[str]] = None) -> Path:
        """Write each selected adapter (default: all) as adapter_config.json + adapter_model.safetensors.

        PEFT's layout: the adapter named "default" in `save_directory`, every other one in
        `save_directory/<name>`; each in the format of its rotation side (PEFT's current one, or
        the seed's for adapters loaded from it). `load_adapter(save_directory / name, name)` reads one back.
        """
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [name for name in names if name not in self.peft_config]
        if unknown or not names:
            raise ValueError(f"selected_adapters={selected_adapters!r}: choose among {sorted(self.peft_config)}")
        directory = Path(save_directory)
        for name in names:
            serialization.save_adapter(self, name, directory if name == "default" else directory / name)
        return directory

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: Union[str, Path],
        adapter_name: str = "default",
        is_trainable: bool = False,
    ) -> "OFTModel":
        """Wrap `model` with the adapter saved in `model_id` (conftrl's or PEFT's)."""
        config, raw = serialization.read_config(Path(model_id))
        config.inference_mode = not is_trainable
        wrapped = cls(model, config, adapter_name)
        serialization.load_weights(wrapped, adapter_name, Path(model_id), raw)
        return wrapped

    def load_adapter(self, model_id: Union[str, Path], adapter_name: str, is_trainable: bool = False) -> None:
        config, raw = serialization.read_config(Path(model_id))
        config.inference_mode = not is_trainable
        self.add_adapter(adapter_name, config)
        serialization.load_weights(self, adapter_name, Path(model_id), raw)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)


def _inside_wrapper(name: str) -> bool:
    """Names inside conftrl's own wrappers are never targets themselves."""
    parts = name.split(".")
    return any(p in ("base_layer", "oft_R", "original_module", "modules_to_save") for p in parts)


def _output_layer_name(model: nn.Module) -> Optional[str]:
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if output is None:
        return None
    return next((n for n, m in model.named_modules() if m is output), None)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
