"""Data-parallel training on CPU: 2 spawned processes (gloo), one Hydra job; and what spawning needs."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from conftest import FAST, run_command
from hydra.utils import instantiate
from support.wandb_files import wandb_records

from conftrl.diffusion import load_base
from conftrl.training.adapter import load_adapter
from conftrl.training.module import ControlModule


@pytest.mark.slow
def test_two_process_ddp_keeps_the_replicas_identical(tiny_base, tmp_path):
    run_dir, probes = tmp_path / "run", tmp_path / "replicas"
    overrides = [o for o in FAST if not o.startswith(("logger=", "trainer.max_steps", "trainer.val_check"))]
    run_command(
        "conftrl.train", "experiment=canny_coft", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
        f"model.path={tiny_base}", *overrides, "trainer.max_steps=3", "trainer.val_check_interval=3",
        "data.num_train=8", "logger=wandb", f"hydra.run.dir={run_dir}",
        "+callbacks.replicas._target_=replicas.SaveTrainableState", f"+callbacks.replicas.directory={probes}",
        cwd=tmp_path, PYTHONPATH=str(Path(__file__).parent),
    )
    ranks = [torch.load(probes / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["step"] for r in ranks] == [3, 3]
    first, second = (r["state"] for r in ranks)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert first["control.encoder.out.weight"].abs().sum() > 0  # it trained (the zero conv moved)

    encoder = load_adapter(run_dir / "adapter").control.encoder.state_dict()
    assert all(torch.equal(encoder[k], first[f"control.encoder.{k}"]) for k in encoder)  # exported = rank 0

    assert sorted(p.name for p in tmp_path.iterdir()) == ["replicas", "run"]  # one output dir
    runs = wandb_records(run_dir)
    assert len(runs) == 1  # one W&B run, which the workers logged into
    (records,) = runs.values()
    assert any(r.WhichOneof("record_type") == "history" for r in records)


@pytest.mark.parametrize("method", ["coft", "lora", "full", "controlnet"])
def test_every_method_pickles_for_spawned_workers(make_config, tiny_base, method):
    module = ControlModule(load_base(tiny_base), instantiate(make_config(f"method={method}").method))
    for parameter in module.control.parameters():
        torch.nn.init.normal_(parameter, std=0.05)  # so that control visibly changes the output
    clone = pickle.loads(pickle.dumps(module))
    noisy, t, text, control = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 16, 32), torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        expected = module.control.predict(module.unet, noisy, t, text, control)
        torch.testing.assert_close(clone.control.predict(clone.unet, noisy, t, text, control), expected)
