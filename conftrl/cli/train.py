"""Train a control adapter into a frozen text-to-image model.

    python -m conftrl.train experiment=canny_coft [trainer.max_steps=100] [method.r=8] ...
    python -m conftrl.train -m experiment=canny_coft method.r=2,4 method.eps=1e-4,1e-3

Composes the Hydra config, instantiates datamodule, module, callbacks, loggers and trainer,
fits, validates once more at the end, and exports the adapter folder.
"""

from __future__ import annotations

import logging

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from conftrl.cli import mistakes_reported
from conftrl.config import config_dir, register_resolvers
from conftrl.config.schema import (
    ConfigError, check_method_fits, check_strategy_complete, instantiate_checked, validate_train_config,
)
from conftrl.diffusion import config_folder, load_base
from conftrl.training.adapter import INPUT_ERRORS, export_adapter
from conftrl.training.checkpoints import CheckpointError, resume_path
from conftrl.training.loggers import finish_wandb_run, keep_wandb_files_in_run_dir
from conftrl.training.module import CheckpointMismatchError
from conftrl.training.sharding import whole_weights
from conftrl.utils.atomic import DiskFullError

log = logging.getLogger(__name__)
register_resolvers()


def instantiate_all(group: DictConfig | None) -> list:
    """Every `_target_` entry of a config group that holds several (callbacks, loggers)."""
    return [instantiate(node) for node in (group or {}).values() if node and "_target_" in node]


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, validate and export; returns the final metrics (for sweeps and tests).

    The config is checked, and every part but the base model built, before the base loads,
    so that a mistake in the config costs seconds, not a model load."""
    validate_train_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    method = instantiate_checked(cfg.method, "method")
    check_method_fits(method, config_folder(cfg.model.path, cfg.model.get("config")))
    datamodule = instantiate_checked(cfg.data, "data")
    trainer = instantiate(
        cfg.trainer, callbacks=instantiate_all(cfg.get("callbacks")), logger=instantiate_all(cfg.get("logger")) or False
    )
    check_strategy_complete(trainer)
    base = load_base(cfg.model.path, cfg.model.get("config"), cfg.model.get("tokenizer"))
    module = instantiate(cfg.module)(base=base, method=method)
    keep_wandb_files_in_run_dir(trainer)
    run_info = {"trainable_parameters": module.num_trainable_parameters}
    log.info("method %s: %s trainable parameters", cfg.method.name, f"{module.num_trainable_parameters:,}")
    for logger in trainer.loggers:
        logger.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), **run_info})

    try:
        checkpoint = resume_path(cfg.ckpt_path, trainer)
        trainer.fit(module, datamodule=datamodule, ckpt_path=checkpoint, weights_only=True)
        # A fresh run that took no step. Not `global_step`: under ddp_spawn the steps are taken
        # in other processes, and only their logged metrics come back.
        if checkpoint is None and "train/loss" not in trainer.callback_metrics and trainer.max_steps != 0:
            raise RuntimeError(
                f"trained 0 steps (trainer.max_epochs={trainer.max_epochs}, limit_train_batches="
                f"{trainer.limit_train_batches}); no untrained adapter is exported (trainer.max_steps=0 asks for one)"
            )
        trainer.validate(module, datamodule=datamodule)
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
        with whole_weights(trainer.strategy.model):  # under FSDP every rank gathers, rank 0 writes
            if trainer.is_global_zero:
                path = export_adapter(module, cfg, cfg.export_dir)
                log.info("adapter written to %s", path)
    finally:
        finish_wandb_run(trainer)
    return metrics


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> float | None:
    mistakes = (ConfigError, CheckpointError, CheckpointMismatchError, DiskFullError, *INPUT_ERRORS)
    with mistakes_reported("conftrl.train", *mistakes):
        metrics = train(cfg)
    return metrics.get(cfg.optimized_metric) if cfg.optimized_metric else None


if __name__ == "__main__":
    main()
