"""The CSV log of a run that more than one process writes (the final validation under
`trainer=ddp` runs in new processes, with a copy of the launching process's logger)."""

from __future__ import annotations

import pickle

from conftrl.training.loggers import RunCSVLogger, logged_metrics


def test_a_copy_made_before_the_first_rows_continues_the_metrics_file(tmp_path):
    launcher = RunCSVLogger(save_dir=tmp_path, name="csv")
    launcher.log_hyperparams({"seed": 0})  # the writer exists, with no columns yet
    fit, validate = (pickle.loads(pickle.dumps(launcher)) for _ in range(2))  # as spawned, twice
    fit.log_metrics({"train/loss": 0.5}, step=1)
    fit.save()
    validate.log_metrics({"val/loss": 0.25, "val/edge_f1": 0.5}, step=2)
    validate.save()

    assert logged_metrics(tmp_path) == [{"train/loss": 0.5, "step": 1}, {"val/loss": 0.25, "val/edge_f1": 0.5, "step": 2}]
