"""Atomic checkpoint writes: a failed save leaves the previous file intact."""

from __future__ import annotations

import errno

import pytest
import torch

from conftrl import checkpointing
from conftrl.checkpointing import AtomicCheckpointIO


def test_save_then_load_round_trips(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, tmp_path / "deep" / "a.ckpt")
    assert torch.equal(io.load_checkpoint(tmp_path / "deep" / "a.ckpt")["state_dict"]["w"], torch.ones(3))


def test_disk_full_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)
    real_save = torch.save

    def save_until_disk_is_full(obj, file):
        real_save(obj, file)  # bytes reach the file ...
        raise OSError(errno.ENOSPC, "No space left on device")  # ... then the disk fills up

    monkeypatch.setattr(checkpointing.torch, "save", save_until_disk_is_full)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(1000)}, path)
    assert io.load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind
