"""W&B runs around a training job: where workers write, and ending the run with the job."""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.loggers import WandbLogger


def keep_wandb_files_in_run_dir(trainer: L.Trainer) -> None:
    """Spawned DDP workers attach to the W&B run this process creates, but write its files
    (e.g. sample images) under $WANDB_DIR, by default their working directory."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger.save_dir:
            os.environ["WANDB_DIR"] = str(logger.save_dir)


def finish_wandb_run(trainer: L.Trainer) -> None:
    """W&B keeps a process's run open until it is finished, and Lightning's logger reuses an
    open run: without this, the next job of a multirun would log into this job's run."""
    if any(isinstance(logger, WandbLogger) for logger in trainer.loggers):
        import wandb

        wandb.finish()
