"""EMA of the trainable weights: averaged, swapped in for validation, exported, checkpointed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.trainer.states import TrainerFn

from conftrl.cli.train import train
from conftrl.training.adapter import load_adapter
from conftrl.training.callbacks import EMA


class TwoWeights(LightningModule):
    def __init__(self):
        super().__init__()
        self.trained = torch.nn.Parameter(torch.zeros(3))
        self.frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)


def fake_trainer(step: int, fn=TrainerFn.FITTING):
    return SimpleNamespace(global_step=step, state=SimpleNamespace(fn=fn))


def test_average_swap_and_state_round_trip():
    module, ema = TwoWeights(), EMA(decay=0.5)
    ema.on_fit_start(fake_trainer(0), module)
    for step, value in [(1, 4.0), (1, 100.0), (2, 8.0)]:  # the repeated step 1: accumulation, no update
        module.trained.data.fill_(value)
        ema.on_train_batch_end(fake_trainer(step), module)
    average = ema.state_dict()["average"]
    assert torch.allclose(average["trained"], torch.full((3,), 0.5 * (0.5 * 0 + 0.5 * 4) + 0.5 * 8))  # 5
    assert set(average) == {"trained"}

    ema.on_validation_start(fake_trainer(2), module)
    assert torch.allclose(module.trained, torch.full((3,), 5.0))
    ema.on_validation_end(fake_trainer(2), module)
    assert torch.allclose(module.trained, torch.full((3,), 8.0))
    ema.on_validation_start(fake_trainer(2, TrainerFn.VALIDATING), module)  # outside fit: no swap
    assert torch.allclose(module.trained, torch.full((3,), 8.0))

    restored = EMA(decay=0.5)
    restored.load_state_dict(ema.state_dict())
    restored.on_fit_start(fake_trainer(2), module)  # Lightning restores callbacks before fit starts
    restored.on_train_batch_end(fake_trainer(2), module)  # the checkpointed step is not averaged twice
    restored.on_fit_end(fake_trainer(2), module)
    assert torch.allclose(module.trained, torch.full((3,), 5.0))
    with pytest.raises(ValueError, match="decay"):
        EMA(decay=1.0)


def test_exported_adapter_holds_the_average(make_config, tmp_path):
    cfg = make_config("experiment=canny_coft", "callbacks=[default,ema]", "callbacks.ema.decay=0.5",
                      "callbacks.model_checkpoint.every_n_train_steps=2")
    train(cfg)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    average = next(state for name, state in checkpoint["callbacks"].items() if name.startswith("EMA"))["average"]
    assert set(average) == set(checkpoint["state_dict"])  # trainable weights only
    exported = load_adapter(cfg.export_dir).control.encoder.state_dict()
    name = next(n for n in exported if not torch.equal(average[f"control.encoder.{n}"], checkpoint["state_dict"][f"control.encoder.{n}"]))
    assert torch.equal(exported[name], average[f"control.encoder.{name}"])  # not the live weights


def test_resumed_run_continues_the_average(make_config, tmp_path):
    """Interrupted at step 2 and resumed to 4, a run exports the average an uninterrupted run does."""
    common = ["experiment=canny_coft", "callbacks=[default,ema]", "callbacks.ema.decay=0.5",
              "callbacks.model_checkpoint.every_n_train_steps=2", "trainer.val_check_interval=2"]
    straight = make_config(*common, "trainer.max_steps=4", output_dir=tmp_path / "straight")
    train(straight)
    train(make_config(*common, "trainer.max_steps=2", output_dir=tmp_path / "resumed"))
    resumed = make_config(*common, "trainer.max_steps=4", "ckpt_path=last", output_dir=tmp_path / "resumed")
    train(resumed)
    expected = load_adapter(straight.export_dir).control.encoder.state_dict()
    exported = load_adapter(resumed.export_dir).control.encoder.state_dict()
    assert any(not torch.equal(v, 0 * v) for v in expected.values())
    for name, value in expected.items():
        torch.testing.assert_close(exported[name], value, rtol=1e-5, atol=1e-7)
