"""The adapter folder: what training leaves behind and `generate`/`evaluate` load.

    adapter/
      conftrl.yaml        the run's resolved config (base model path, method, control, sampling)
                          plus `trainable_parameters`, the size of what was trained
      unet/               the method's weights (PEFT-format OFT or LoRA adapter, or a full UNet)
      text_encoder/       the same for the text encoder, when it was adapted
      control_encoder/    the paper's control encoder (diffusers format, safetensors)
      controlnet/         ... or the ControlNet baseline
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from conftrl.control import EncoderControl, load_control_path
from conftrl.diffusion import DiffusionBase, ModelFolderError, load_base
from conftrl.diffusion.sampling import sample_images
from conftrl.methods import Method
from datamodules import BadSampleError

CONFIG_FILE = "conftrl.yaml"


class AdapterError(ValueError):
    """An adapter folder is missing, incomplete, corrupt or made for another base model."""


# What bad user input raises when loading an adapter and its inputs: entry points report these
# as one line instead of a traceback.
INPUT_ERRORS = (AdapterError, ModelFolderError, BadSampleError)


def export_adapter(module, config: DictConfig, directory: str | Path) -> Path:
    """Write the adapter folder next to its final place, then rename it there."""
    directory = Path(directory)
    staging = directory.with_name(f".{directory.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    module.method.save(module.base, staging)
    module.control.save(staging)
    record = {**OmegaConf.to_container(config, resolve=True), "trainable_parameters": module.num_trainable_parameters}
    OmegaConf.save(OmegaConf.create(record), staging / CONFIG_FILE)
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)
    return directory


@dataclass
class TrainedAdapter:
    """A base model with a trained adapter applied, ready to sample."""

    base: DiffusionBase
    method: Method
    control: EncoderControl
    config: DictConfig

    def sampling(self, **chosen) -> dict:
        """Sampling settings: the run's own (its `sampling`), except those chosen and not None."""
        return {**self.config.sampling, **{name: value for name, value in chosen.items() if value is not None}}

    def sample(self, prompts: list[str], control: torch.Tensor, seeds: list[int], **sampling) -> np.ndarray:
        """uint8 images B×H×W×3, drawn with `self.sampling(**sampling)`."""
        return sample_images(self.base, self.control, prompts, control, seeds, **self.sampling(**sampling))


def load_adapter(directory: str | Path, model_path: str | Path | None = None) -> TrainedAdapter:
    """Load the base named in the adapter's config (or `model_path`) and apply the adapter."""
    directory = Path(directory).expanduser()
    if not (directory / CONFIG_FILE).is_file():
        raise AdapterError(f"{str(directory)!r} is not a conftrl adapter folder (no {CONFIG_FILE})")
    try:
        config = OmegaConf.load(directory / CONFIG_FILE)
        base_path, method = model_path or config.model.path, instantiate(config.method)
    except (yaml.YAMLError, OmegaConfBaseException, HydraException) as error:
        raise AdapterError(f"{CONFIG_FILE} in {str(directory)!r} is corrupt: {error}") from error
    base = load_base(base_path)
    try:
        method.load(base, directory)
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
    return TrainedAdapter(base, method, control, config)
