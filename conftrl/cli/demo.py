"""Serve a web page to try a trained adapter (`conftrl.evaluation.demo`).

    python -m conftrl.demo adapter=outputs/canny_coft/runs/<time>/adapter [port=7860]
    python -m conftrl.demo                      # the newest adapter under outputs/
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from conftrl.cli import mistakes_reported
from conftrl.config import config_dir, register_resolvers
from conftrl.evaluation.demo import Demo, DemoInputError, build_page, newest_adapter
from conftrl.training.adapter import INPUT_ERRORS, load_adapter

log = logging.getLogger(__name__)
register_resolvers()


@hydra.main(version_base="1.3", config_path=f"{config_dir()}/cli", config_name="demo")
def main(cfg: DictConfig) -> None:
    with mistakes_reported("conftrl.demo", DemoInputError, *INPUT_ERRORS):
        adapter_dir = Path(cfg.adapter) if cfg.adapter else newest_adapter(cfg.outputs)
        demo = Demo(load_adapter(adapter_dir, cfg.model_path), cfg.max_side)
    log.info("serving %s", adapter_dir)
    build_page(demo, f"conftrl: {adapter_dir}").launch(
        server_name=cfg.host, server_port=cfg.port, share=False, show_error=True
    )


if __name__ == "__main__":
    main()
