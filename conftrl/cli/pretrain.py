"""Pretrain the embedded tiny base model on ShapesWorld (resumable: rerun to continue).

    python -m conftrl.pretrain [text_to_image.steps=20000] [run_name=mine] [max_minutes_per_run=60]

Writes ``<output_dir>/tiny-sd`` (a diffusers folder) and ``pretrain_record.json`` beside it;
see docs/pretraining.md for what the stages do and how the shipped base was made.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from conftrl.config import config_dir, register_resolvers
from conftrl.pretraining.run import pretrain

log = logging.getLogger(__name__)
register_resolvers()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="pretrain")
def main(cfg: DictConfig) -> None:
    record = pretrain(cfg)
    state = "complete" if record["complete"] else f"stopped in stage {record['stage']} (rerun to continue)"
    log.info("pretraining %s; metrics %s; output %s", state, record["metrics"], cfg.output_dir)


if __name__ == "__main__":
    main()
