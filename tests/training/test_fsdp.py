"""FSDP (`trainer=fsdp`) over two CPU processes: what the watchers and the adapter export read
under FSDP equals what they read unsharded. Lightning's FSDPStrategy runs on GPUs only, so the
module is sharded with torch's FSDP directly, as conf/trainer/fsdp.yaml asks Lightning to
(tests/training/fsdp_worker.py); `bash benchmarks/gpu.sh fsdp` trains through Lightning."""

from __future__ import annotations

from pathlib import Path

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from support.training_runs import run_command
from lightning.pytorch import strategies
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from conftrl.training.sharding import FSDPStrategy

WORKER = Path(__file__).with_name("fsdp_worker.py")


@pytest.fixture(scope="module")
def read_both_ways(tiny_base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    run_command("torch.distributed.run", "--nproc-per-node", "2", str(WORKER), str(tiny_base), str(out), cwd=out)
    return out


def test_gathered_weights_rotations_and_samples_equal_the_unsharded_module(read_both_ways):
    unsharded, sharded = (torch.load(read_both_ways / f"{name}.pt", weights_only=True) for name in ("unsharded", "sharded"))
    assert sharded["weights"].keys() == unsharded["weights"].keys() and len(sharded["weights"]) > 10
    for name, weight in unsharded["weights"].items():
        torch.testing.assert_close(sharded["weights"][name], weight, rtol=0, atol=0, msg=name)
    assert sharded["stats"] == unsharded["stats"] and unsharded["stats"]["rotation_dev_max"] > 0.01
    torch.testing.assert_close(sharded["images"], unsharded["images"], rtol=0, atol=1)


def test_energy_monitor_and_sample_grid_under_fsdp_equal_one_process(read_both_ways):
    unsharded, sharded = (torch.load(read_both_ways / f"energies_{name}.pt") for name in ("unsharded", "sharded"))
    assert list(sharded) == list(unsharded) and len(unsharded) > 10  # the model's own layer paths
    for name, energy in unsharded.items():
        assert sharded[name] == pytest.approx(energy, rel=1e-6), name
    grids = [np.asarray(Image.open(read_both_ways / f"grid_{name}" / "step_000000.png")) for name in ("unsharded", "sharded")]
    assert grids[0].shape == grids[1].shape and np.abs(grids[0].astype(int) - grids[1].astype(int)).max() <= 1


def test_the_strategy_hands_back_its_wrapper_for_the_stages_after_fit(monkeypatch):
    """Lightning wraps anew only a module without FSDP units; `trainer.validate` after fit must
    get the wrapper fit made (its own wrapping needs a GPU, so it is replaced here)."""
    monkeypatch.setattr(strategies.FSDPStrategy, "_setup_model", lambda self, model: SimpleNamespace(module=model))
    strategy, module, other = FSDPStrategy(), nn.Linear(2, 2), nn.Linear(2, 2)
    wrapper = strategy._setup_model(module)
    assert wrapper.module is module and strategy._setup_model(module) is wrapper
    assert strategy._setup_model(other).module is other and strategy._setup_model(other) is not wrapper


@pytest.mark.parametrize("part", ["unet/adapter_model.safetensors", "control_encoder/diffusion_pytorch_model.safetensors"])
def test_adapter_exported_under_fsdp_equals_the_unsharded_export(read_both_ways, part):
    unsharded = load_file(read_both_ways / "adapter_unsharded" / part)
    sharded = load_file(read_both_ways / "adapter_sharded" / part)
    assert sharded.keys() == unsharded.keys()  # the model's own paths, no FSDP wrapper in them
    for key, tensor in unsharded.items():
        torch.testing.assert_close(sharded[key], tensor, rtol=0, atol=0, msg=key)
    config = "unet/adapter_config.json"
    assert (read_both_ways / "adapter_sharded" / config).read_text() == (read_both_ways / "adapter_unsharded" / config).read_text()

