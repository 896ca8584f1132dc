"""Diffusion plumbing: loading a local base model, the training objective, sampling."""

from conftrl.diffusion.base import DiffusionBase
from conftrl.diffusion.loading import (
    ModelFolderError,
    assemble_base,
    check_model_folder,
    config_folder,
    load_base,
    load_unet,
)
from conftrl.diffusion.sdxl import SDXLBase

__all__ = [
    "DiffusionBase", "ModelFolderError", "SDXLBase", "assemble_base", "check_model_folder", "config_folder",
    "load_base", "load_unet",
]
