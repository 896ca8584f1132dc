"""Merge a trained adapter into its base and write the result as a complete diffusers folder.

    python -m conftrl.export adapter=outputs/canny_coft/runs/<time>/adapter merged=<folder>

A stock `StableDiffusionPipeline.from_pretrained(<folder>)` (for SDXL `StableDiffusionXLPipeline`)
generates from text with the merged UNet; conftrl's commands take the folder as an adapter (`conftrl.training.merged`).
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from conftrl.cli import mistakes_reported
from conftrl.config import config_dir, register_resolvers
from conftrl.training.adapter import INPUT_ERRORS, load_adapter
from conftrl.training.merged import export_merged

log = logging.getLogger(__name__)
register_resolvers()


@hydra.main(version_base="1.3", config_path=f"{config_dir()}/cli", config_name="export")
def main(cfg: DictConfig) -> None:
    with mistakes_reported("conftrl.export", *INPUT_ERRORS):
        merged = export_merged(load_adapter(cfg.adapter, cfg.model_path), cfg.merged)
        log.info("merged export written to %s", merged)


if __name__ == "__main__":
    main()
