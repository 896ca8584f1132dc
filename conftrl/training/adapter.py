"""The adapter folder: what training leaves behind and `generate`/`evaluate` load.

    adapter/
      conftrl.yaml        the run's resolved config (base model path, method, annotator, sampling)
                          plus `trainable_parameters`, the size of what was trained
      unet/               the method's weights (PEFT-format OFT or LoRA adapter, or a full UNet)
      text_encoder/       the same for the text encoder, when it was adapted
      control_encoder/    the paper's control encoder (diffusers format, safetensors)
      controlnet/         ... or the ControlNet baseline
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from conftrl.control import EncoderControl, load_control_path
from conftrl.diffusion import DiffusionBase, ModelFolderError, load_base
from conftrl.diffusion.sampling import sample_images
from conftrl.training.methods import Adapted, Method
from conftrl.utils.atomic import naming_a_full_disk, replace_folder
from datamodules import BadSampleError, EmptySplitError

CONFIG_FILE = "conftrl.yaml"


class AdapterError(ValueError):
    """An adapter folder is missing, incomplete, corrupt or made for another base model."""


# Every class an adapter's conftrl.yaml may name (its method, annotator and data, with their
# estimators). Loading an adapter instantiates these and nothing else: the file may come from
# anywhere, and a `_target_` is a Python callable.
ADAPTER_TARGETS = frozenset({
    "conftrl.training.methods.OFTMethod", "conftrl.training.methods.LoRAMethod", "conftrl.training.methods.FullMethod",
    "conftrl.training.methods.ControlNetMethod", "conftrl.training.methods.ControlOnlyMethod",
    "datamodules.annotators.CannyAnnotator", "datamodules.annotators.DepthAnnotator",
    "datamodules.annotators.SegmentationAnnotator", "datamodules.annotators.PrecomputedControl",
    "datamodules.annotators.DnnDepthEstimator", "datamodules.annotators.TransformersDepthEstimator",
    "datamodules.annotators.TransformersSegmentationEstimator",
    "datamodules.FolderDataModule", "datamodules.HFDataModule", "datamodules.ShapesWorldDataModule",
})


# Classes that moved, under the names adapters written before the move recorded. The methods'
# former base class, `Method`, trained the control path alone (the ControlNet baseline used it).
MOVED_TARGETS = {
    **{f"conftrl.methods.{name}": f"conftrl.training.methods.{name}" for name in ("OFTMethod", "LoRAMethod", "FullMethod")},
    "conftrl.methods.Method": "conftrl.training.methods.ControlOnlyMethod",
    "conftrl.training.methods.Method": "conftrl.training.methods.ControlOnlyMethod",
}


def _targets(node, where: str):
    """(where, target) of every `_target_` in a nest of dicts and lists."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "_target_":
                yield where, value
            else:
                yield from _targets(value, f"{where}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _targets(value, f"{where}[{index}]")


def _rename_moved_classes(node) -> None:
    """Each `_target_` in `node` (a config) that names a class under its former name, renamed
    to where the class lives now. Interpolations are left as written: `check_targets` checks
    what they resolve to."""
    if not isinstance(node, DictConfig | ListConfig):
        return
    for key in node.keys() if isinstance(node, DictConfig) else range(len(node)):
        if OmegaConf.is_interpolation(node, key):
            continue
        if key == "_target_" and isinstance(node[key], str) and node[key] in MOVED_TARGETS:
            node[key] = MOVED_TARGETS[node[key]]
        else:
            _rename_moved_classes(node[key])


# The sections of an adapter's config that are instantiated: the method when loading, the
# annotator by `generate` and `evaluate`, the data by `evaluate`.
RECORDED_OBJECTS = ("method", "annotator", "data")
# Adapters written before the config group `control` was named `annotator` record it so.
FORMER_ANNOTATOR_KEY = "control"
# Adapters written before the optimiser became the module's record its settings in the method,
# under these keys; today's keys in `module` say the same.
FORMER_OPTIMISER_KEYS = {
    "lr": "optimizer.lr", "weight_decay": "optimizer.weight_decay",
    "lr_scheduler": "lr_scheduler.name", "warmup_steps": "lr_scheduler.num_warmup_steps",
}


def in_current_form(config: DictConfig) -> DictConfig:
    """An adapter's recorded config with the keys and classes that moved since it was written
    where they are now, so that old adapters load and read as new ones."""
    if "annotator" not in config and FORMER_ANNOTATOR_KEY in config:
        config.annotator = config[FORMER_ANNOTATOR_KEY]
    method = config.get("method")
    if isinstance(method, DictConfig):
        for former, current in FORMER_OPTIMISER_KEYS.items():
            if former in method:
                if OmegaConf.select(config, f"module.{current}") is None:
                    OmegaConf.update(config, f"module.{current}", method[former])
                del method[former]
    for key in RECORDED_OBJECTS:
        _rename_moved_classes(config.get(key))
    return config


def read_adapter_config(path: str | Path) -> DictConfig:
    """An adapter folder's conftrl.yaml in today's form (`in_current_form`), once every class
    it names is known to be allowed (`check_targets`)."""
    path = Path(path)
    try:
        config = in_current_form(OmegaConf.load(path))
        check_targets(config, path)
    except (yaml.YAMLError, OmegaConfBaseException) as error:
        raise AdapterError(f"{path.name} in {str(path.parent)!r} is corrupt: {error}") from error
    return config


def check_targets(config: DictConfig, source: str | Path) -> dict:
    """The resolved config (a target cannot hide in `${...}`) if every `_target_` in its
    `RECORDED_OBJECTS` is one of `ADAPTER_TARGETS`; otherwise
    `AdapterError` naming the file and the target."""
    resolved = OmegaConf.to_container(config, resolve=True)
    if not isinstance(resolved, dict):
        raise AdapterError(f"{source}: not a mapping of settings")
    for key in RECORDED_OBJECTS:
        for where, target in _targets(resolved.get(key), key):
            if target not in ADAPTER_TARGETS:
                raise AdapterError(
                    f"{source}: {where}._target_ is {target!r}, which is not one of conftrl's classes; "
                    "an adapter folder may only name conftrl's methods, annotators and datamodules, so it is not loaded"
                )
    return resolved


def instantiate_recorded(config: DictConfig, key: str, source: str | Path):
    """`config[key]` of an adapter's config file `source`, built from allowed classes only."""
    node = check_targets(config, source).get(key)
    if not isinstance(node, dict) or "_target_" not in node:
        raise AdapterError(f"{source}: {key!r} names no class")
    return instantiate(node)


# What bad user input raises when loading an adapter and its inputs: entry points report these
# as one line instead of a traceback.
INPUT_ERRORS = (AdapterError, ModelFolderError, BadSampleError, EmptySplitError)


def write_folder(
    directory: str | Path, build: Callable[[Path], None], ours: Callable[[Path], bool], kind: str, key: str
) -> Path:
    """Build a folder beside `directory` with `build(staging)`, then swap it in
    (`replace_folder`): a crash leaves the previous folder or the new one. A non-empty folder
    there that `ours` does not recognise as `kind` is never replaced (`key` names the setting
    that chose the place)."""
    directory = Path(directory)
    occupied = directory.is_file() or directory.is_dir() and any(directory.iterdir())
    if occupied and not ours(directory):
        raise AdapterError(f"{key} {str(directory)!r} exists and is not {kind}; it is left as it is")
    staging = directory.with_name(f".{directory.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with naming_a_full_disk(directory):
            staging.mkdir(parents=True)
            build(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return replace_folder(staging, directory)


def is_adapter(directory: Path) -> bool:
    return (directory / CONFIG_FILE).is_file()


def export_adapter(module, config: DictConfig, directory: str | Path) -> Path:
    """Write the adapter folder atomically (`write_folder`); a folder there that is not an
    adapter is never replaced."""

    def build(staging: Path) -> None:
        module.method.save(module.adapted, staging)
        module.control.save(staging)
        record = OmegaConf.to_container(config, resolve=True)
        record["trainable_parameters"] = module.num_trainable_parameters
        OmegaConf.save(OmegaConf.create(record), staging / CONFIG_FILE)

    return write_folder(directory, build, is_adapter, "an adapter folder", "export_dir")


@dataclass
class TrainedAdapter:
    """A base model with a trained adapter applied, ready to sample."""

    base: DiffusionBase
    method: Method
    adapted: Adapted
    control: EncoderControl
    config: DictConfig
    directory: Path

    def build(self, key: str):
        """The run's `annotator` or `data` (datamodule), from the allowed classes only."""
        return instantiate_recorded(self.config, key, self.directory / CONFIG_FILE)

    def sampling(self, **chosen) -> dict:
        """Sampling settings: the run's own (its `sampling`), except those chosen and not None."""
        return {**self.config.sampling, **{name: value for name, value in chosen.items() if value is not None}}

    def sample(self, prompts: list[str], control: torch.Tensor, seeds: list[int], **sampling) -> np.ndarray:
        """uint8 images B×H×W×3, drawn with `self.sampling(**sampling)`."""
        return sample_images(self.base, self.control, prompts, control, seeds, **self.sampling(**sampling))


def load_adapter(directory: str | Path, model_path: str | Path | None = None) -> TrainedAdapter:
    """Load the base named in the adapter's config (or `model_path`; a merged export, whose
    config names none, is its own base) and apply the adapter."""
    directory = Path(directory).expanduser()
    if not (directory / CONFIG_FILE).is_file():
        raise AdapterError(f"{str(directory)!r} is not a conftrl adapter folder (no {CONFIG_FILE})")
    config = read_adapter_config(directory / CONFIG_FILE)  # checked before anything is built
    try:
        base_path = model_path or config.model.path or directory
        method = instantiate_recorded(config, "method", directory / CONFIG_FILE)
    except (OmegaConfBaseException, HydraException) as error:
        raise AdapterError(f"{CONFIG_FILE} in {str(directory)!r} is corrupt: {error}") from error
    base = load_base(base_path, config.model.get("config"), config.model.get("tokenizer"))
    try:
        adapted = method.load(base, directory)
        control = load_control_path(directory, base.unet)
    except Exception as error:  # missing, truncated or mismatched weights: name the folder and the base
        raise AdapterError(f"cannot apply the adapter in {str(directory)!r} to {str(base.path)!r}: {error}") from error
    encoder = getattr(control, "encoder", None)
    if encoder is not None and encoder.config.out_channels != base.unet.conv_in.out_channels:
        raise AdapterError(
            f"the control encoder in {str(directory)!r} feeds {encoder.config.out_channels} channels, "
            f"the UNet of {str(base.path)!r} has {base.unet.conv_in.out_channels}: another base model"
        )
    control.eval()
    return TrainedAdapter(base, method, adapted, control, config, directory)
