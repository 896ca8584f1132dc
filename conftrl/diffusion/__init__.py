"""Diffusion plumbing: loading a local base model, the training objective, sampling."""

from conftrl.diffusion.loading import (
    DiffusionBase,
    ModelFolderError,
    check_model_folder,
    config_folder,
    load_base,
    load_unet,
)

__all__ = ["DiffusionBase", "ModelFolderError", "check_model_folder", "config_folder", "load_base", "load_unet"]
