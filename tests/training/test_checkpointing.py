"""Checkpoint files: atomic writes under a full disk, damaged files, unsafe pickles, and what
`ckpt_path=last` finds."""

from __future__ import annotations

import errno
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftrl.training import checkpoints as checkpoint_files
from conftrl.training.checkpoints import AtomicCheckpointIO, CheckpointError, non_finite, resume_path
from conftrl.training.module import NonFiniteLossError


def test_save_then_load_round_trips(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, tmp_path / "deep" / "a.ckpt")
    assert torch.equal(io.load_checkpoint(tmp_path / "deep" / "a.ckpt")["state_dict"]["w"], torch.ones(3))


class FullDisk:
    """A file on a disk that fills up after `room` bytes, as the OS reports it."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data) -> int:
        if self.file.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)


def test_disk_full_mid_write_says_so_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(1000)}, path)
    real_save = torch.save
    monkeypatch.setattr(checkpoint_files.torch, "save", lambda obj, file: real_save(obj, FullDisk(file, room=2000)))
    # torch's own error would be "unexpected pos ..."; the full disk is only its context
    with pytest.raises(OSError, match=f"no space left on device while writing {path}") as raised:
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(1000)}, path)
    assert raised.value.errno == errno.ENOSPC
    assert io.load_checkpoint(path)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


@pytest.fixture
def checkpoints(tmp_path) -> Path:
    """A checkpoint folder as a run leaves it: two steps, last.ckpt linking to the newer."""
    folder = tmp_path / "checkpoints"
    for step in (2, 4):
        AtomicCheckpointIO().save_checkpoint({"global_step": step, "w": torch.full((100,), float(step))}, folder / f"step_{step:06d}.ckpt")
    (folder / "last.ckpt").symlink_to("step_000004.ckpt")
    return folder


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_damaged_checkpoint_is_named_with_the_previous_one(checkpoints, damage):
    newest = checkpoints / "step_000004.ckpt"
    data = newest.read_bytes()
    newest.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"last\.ckpt \(-> step_000004\.ckpt\) is damaged") as raised:
        AtomicCheckpointIO().load_checkpoint(checkpoints / "last.ckpt")
    assert f"the previous checkpoint is {checkpoints / 'step_000002.ckpt'} (step 2)" in str(raised.value)
    (checkpoints / "step_000002.ckpt").unlink()
    with pytest.raises(CheckpointError, match="damaged.*no other checkpoint is there"):
        AtomicCheckpointIO().load_checkpoint(newest)


class PlantedCode:
    """Unpickling this creates a marker file: what a malicious checkpoint would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_checkpoint_with_code_in_it_is_refused_even_if_torch_defaults_to_unpickling(tmp_path, monkeypatch):
    marker = tmp_path / "code_ran"
    path = tmp_path / "planted.ckpt"
    torch.save({"global_step": 1, "state_dict": {}, "payload": PlantedCode(marker)}, path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch's default is then to unpickle
    with pytest.raises(CheckpointError, match=f"{path} holds objects other than tensors"):
        AtomicCheckpointIO().load_checkpoint(path)
    assert not marker.exists()


def trainer_with_checkpoints_in(folder: Path | None):
    callback = None if folder is None else SimpleNamespace(dirpath=str(folder), CHECKPOINT_NAME_LAST="last", FILE_EXTENSION=".ckpt")
    return SimpleNamespace(checkpoint_callback=callback)


def test_ckpt_path_last_with_nothing_to_resume_says_where_it_looked(tmp_path):
    folder = tmp_path / "checkpoints"
    with pytest.raises(CheckpointError, match=f"nothing to resume, no last.ckpt in {folder}"):
        resume_path("last", trainer_with_checkpoints_in(folder))
    folder.mkdir()
    (folder / "last.ckpt").symlink_to("step_000500.ckpt")  # its target was deleted
    with pytest.raises(CheckpointError, match=r"last\.ckpt \(-> step_000500\.ckpt\) points to a file that does not exist"):
        resume_path("last", trainer_with_checkpoints_in(folder))
    with pytest.raises(CheckpointError, match="writes no checkpoints"):
        resume_path("last", trainer_with_checkpoints_in(None))
    with pytest.raises(CheckpointError, match=f"ckpt_path={tmp_path / 'typo.ckpt'}: no such checkpoint file"):
        resume_path(str(tmp_path / "typo.ckpt"), trainer_with_checkpoints_in(folder))


def test_ckpt_path_last_resolves_to_the_runs_last_checkpoint(checkpoints):
    assert resume_path("last", trainer_with_checkpoints_in(checkpoints)) == str(checkpoints / "last.ckpt")
    assert resume_path(None, trainer_with_checkpoints_in(checkpoints)) is None


def test_non_finite_state_is_found_in_weights_optimiser_and_callbacks():
    checkpoint = {
        "state_dict": {"w": torch.ones(2)},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.tensor([1.0, float("inf")]), "step": torch.tensor(3.0)}}}],
        "callbacks": {"EMA": {"average": {"w": torch.tensor([float("nan")])}}},
        "global_step": 3,
    }
    assert non_finite(checkpoint) == ["optimizer_states.0.state.0.exp_avg", "callbacks.EMA.average.w"]
    assert non_finite({"state_dict": {"w": torch.ones(2), "steps": torch.tensor([1, 2])}}) == []


def test_checkpoint_with_non_finite_optimiser_state_is_refused(make_config, tmp_path, monkeypatch):
    """Weights can be finite while Adam's moments are not; resuming would diverge at once."""
    from conftrl.cli.train import train
    from conftrl.training.module import ControlModule

    real_hook = ControlModule.on_save_checkpoint

    def poison_the_moments_at_step_4(self, checkpoint):
        if checkpoint["global_step"] == 4:
            moments = next(iter(checkpoint["optimizer_states"][0]["state"].values()))
            moments["exp_avg_sq"].fill_(float("inf"))
        return real_hook(self, checkpoint)

    monkeypatch.setattr(ControlModule, "on_save_checkpoint", poison_the_moments_at_step_4)
    cfg = make_config("experiment=canny_coft", "trainer.max_steps=6")  # checkpoints at every validation: 2, 4, 6
    with pytest.raises(NonFiniteLossError, match=r"refusing to checkpoint step 4.*exp_avg_sq.*step_000002\.ckpt \(step 2\)"):
        train(cfg)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt", "step_000002.ckpt"]


def test_a_full_disk_stops_training_with_a_plain_message_and_the_last_checkpoint_intact(make_config, tmp_path, monkeypatch):
    from conftrl.cli.train import train

    real_save, saves = torch.save, []

    def save_until_the_disk_fills(obj, file):
        saves.append(obj["global_step"])
        real_save(obj, FullDisk(file, room=2000) if len(saves) > 1 else file)

    monkeypatch.setattr(checkpoint_files.torch, "save", save_until_the_disk_fills)
    folder = tmp_path / "checkpoints"
    with pytest.raises(OSError, match=f"^no space left on device while writing {folder / 'step_000004.ckpt'}"):
        train(make_config("experiment=canny_coft", "trainer.max_steps=4"))
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "step_000002.ckpt"]
    assert AtomicCheckpointIO().load_checkpoint(folder / "last.ckpt")["global_step"] == 2
