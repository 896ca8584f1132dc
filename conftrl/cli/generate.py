"""Generate images with a trained adapter from a control image and a prompt.

    python -m conftrl.generate adapter=outputs/canny_coft/runs/<time>/adapter control=edges.png \
        prompt="a red circle on a gray background" [seeds=[0,1,2]] [steps=30] [cfg_scale=7.5]

`python -m conftrl.generate --help` lists every key (conf/generate.yaml). Whether the control
image is annotated first is decided by the adapter's recorded annotator
(`conftrl.control.inputs`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from conftrl.cli import mistakes_reported
from conftrl.config import config_dir, register_resolvers
from conftrl.config.schema import ConfigError, validate_sampling_overrides
from conftrl.control.inputs import control_from_file
from conftrl.diffusion.sampling import SAMPLING_OPTIONS
from conftrl.training.adapter import INPUT_ERRORS, load_adapter
from conftrl.utils.images import save_png, to_uint8

log = logging.getLogger(__name__)
register_resolvers()


def generate(cfg: DictConfig) -> list[Path]:
    """One PNG per seed, plus the control as the model saw it; returns the images' paths."""
    adapter = load_adapter(cfg.adapter, cfg.model_path)
    resolution = cfg.resolution or adapter.config.data.resolution
    control = control_from_file(cfg.control, adapter.build("annotator"), resolution, cfg.annotate)
    seeds = list(cfg.seeds)
    images = adapter.sample(
        [cfg.prompt] * len(seeds), control.repeat(len(seeds), 1, 1, 1), seeds,
        **{option: cfg[option] for option in SAMPLING_OPTIONS},
    )
    output_dir, stem = Path(cfg.output_dir), Path(cfg.control).stem
    save_png(to_uint8(control)[0], output_dir / f"{stem}_control.png")
    paths = [save_png(image, output_dir / f"{stem}_seed{seed}.png") for image, seed in zip(images, seeds)]
    log.info("wrote %d image(s) to %s", len(paths), output_dir)
    return paths


@hydra.main(version_base="1.3", config_path=f"{config_dir()}/cli", config_name="generate")
def main(cfg: DictConfig) -> None:
    with mistakes_reported("conftrl.generate", ConfigError, *INPUT_ERRORS):
        validate_sampling_overrides(cfg)
        generate(cfg)


if __name__ == "__main__":
    main()
