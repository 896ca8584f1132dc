"""A Hydra multirun: every combination in its own directory and W&B run, one W&B group."""

from __future__ import annotations

import pytest
from conftest import FAST, run_command, wandb_runs
from omegaconf import OmegaConf
from safetensors.torch import load_file


@pytest.mark.slow
def test_sweep_over_r_gives_one_directory_and_run_per_job(tiny_base, tmp_path):
    sweep = tmp_path / "sweep"
    overrides = [o for o in FAST if not o.startswith("logger=")]
    run_command("conftrl.train", "-m", "experiment=canny_coft", "method.r=2,4", f"model.path={tiny_base}", *overrides,
                "logger=wandb", f"hydra.sweep.dir={sweep}", cwd=tmp_path)

    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    rs = [OmegaConf.load(job / "adapter" / "conftrl.yaml").method.r for job in jobs]
    assert rs == [2, 4]
    shapes = [{k: v.shape for k, v in load_file(job / "adapter" / "unet" / "adapter_model.safetensors").items()}
              for job in jobs]
    assert shapes[0].keys() == shapes[1].keys() and shapes[0] != shapes[1]

    runs = [wandb_runs(job) for job in jobs]
    assert [len(r) for r in runs] == [1, 1]  # each job its own run ...
    assert runs[0][0].run_id != runs[1][0].run_id
    assert runs[0][0].run_group == runs[1][0].run_group == sweep.name  # ... in the sweep's group
