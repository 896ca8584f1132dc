"""A run's logs: the CSV log written from several processes and read back (W&B holds the same
numbers), and the W&B run kept in the run folder and ended with the job."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only


class RunCSVLogger(CSVLogger):
    """Lightning's `CSVLogger`, whose metrics file may be continued by another process.

    Under `trainer=ddp` (spawn) the final validation runs in new processes with a copy of the
    launching process's writer, which knows no columns: Lightning's writer would then rewrite
    the file with the new columns only and fail on the rows already there.
    """

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None and rank_zero_only.rank == 0:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return super().experiment


class _ContinuingWriter(ExperimentWriter):
    """Adds columns to a metrics file another process of the same run began, never deletes it."""

    def _check_log_dir_exists(self) -> None:
        pass  # Lightning deletes an existing file here; each run (or resume) has its own version dir

    def _record_new_keys(self) -> set[str]:
        if not self.metrics_keys and self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = sorted(next(csv.reader(file), []))
        return super()._record_new_keys()


def logged_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    """Every row the CSV logger wrote in `run_dir`, over all its versions in order (a resumed
    run adds one), with empty cells left out and `step` as an int."""
    versions = sorted(Path(run_dir).glob("csv/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    if not versions:
        raise FileNotFoundError(f"no csv/version_*/metrics.csv in {str(run_dir)!r}; was it trained with logger=csv or many?")
    rows = []
    for path in versions:
        with open(path, newline="") as file:
            for row in csv.DictReader(file):
                values = {name: float(value) for name, value in row.items() if value not in ("", None)}
                rows.append({**values, "step": int(values["step"])})
    return rows


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
