"""One-file safetensors checkpoints of nested training state, written atomically."""

from __future__ import annotations

import pytest
import torch

from conftrl.pretraining.checkpoint import DamagedCheckpointError, load_checkpoint, save_checkpoint


def test_optimizer_state_round_trips_with_integer_keys_and_scalars(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "progress": {"stage": "vae", "step": 7, "seconds": 1.5}}

    save_checkpoint(state, tmp_path / "checkpoint.safetensors")
    loaded = load_checkpoint(tmp_path / "checkpoint.safetensors")

    assert loaded["progress"] == state["progress"]
    assert set(loaded["optimizer"]["state"]) == {0, 1}  # integer parameter ids survive
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(loaded["optimizer"]["state"][1][key], state["optimizer"]["state"][1][key])
    restored = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.5)
    restored.load_state_dict(loaded["optimizer"])
    assert restored.param_groups[0]["lr"] == 0.1
    assert list(tmp_path.iterdir()) == [tmp_path / "checkpoint.safetensors"]  # no temporary left


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint({"step": 1}, path)
    with pytest.raises(TypeError):
        save_checkpoint({"step": 2, "bad": object()}, path)  # not JSON-serialisable
    assert load_checkpoint(path) == {"step": 1}
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("damage", ["empty", "truncated", "another file"])
def test_a_damaged_checkpoint_is_named(tmp_path, damage):
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint({"step": 1, "weights": torch.ones(100)}, path)
    data = path.read_bytes()
    if damage == "another file":
        from safetensors.torch import save_file

        save_file({"w": torch.ones(2)}, path)  # safetensors, but no conftrl state in its header
    else:
        path.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    with pytest.raises(DamagedCheckpointError, match=f"checkpoint {path} is damaged"):
        load_checkpoint(path)
