"""Atomic file writes and folder swaps under injected faults: a full disk, a crash at any step."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from conftrl.utils import atomic
from conftrl.utils.atomic import DiskFullError, atomic_write, replace_folder


def test_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "deep" / "record.json"
    atomic_write(path, lambda file: file.write(b"one"))
    atomic_write(path, lambda file: file.write(b"two"))
    assert path.read_bytes() == b"two"
    assert os.listdir(path.parent) == ["record.json"]


def test_disk_full_names_the_path_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"old")

    def fill_the_disk(file):
        file.write(b"new, half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError, match=f"no space left on device while writing {path}"):
        atomic_write(path, fill_the_disk)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["weights.safetensors"]


def test_disk_full_wrapped_by_the_writer_is_still_named(tmp_path):
    """Writers such as torch's raise their own error while the file's ENOSPC is its context."""

    def write_like_torch(file):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos 228 vs 0")

    def fail_otherwise(file):
        raise RuntimeError("unexpected pos 228 vs 0")

    with pytest.raises(DiskFullError, match="no space left on device"):
        atomic_write(tmp_path / "a", write_like_torch)
    with pytest.raises(RuntimeError, match="unexpected pos"):  # no ENOSPC anywhere: passed on as it is
        atomic_write(tmp_path / "a", fail_otherwise)
    assert not any(tmp_path.iterdir())


def make_folder(path: Path, version: str) -> Path:
    (path / "unet").mkdir(parents=True)
    (path / "unet" / "weights").write_text(version)
    (path / "conftrl.yaml").write_text(version)
    return path


def version_at(path: Path) -> str | None:
    """The version of a complete folder at `path`, None if there is none."""
    if not path.is_dir():
        return None
    versions = {(path / "unet" / "weights").read_text(), (path / "conftrl.yaml").read_text()}
    assert len(versions) == 1, f"a mix of two folders at {path}"
    return versions.pop()


class Crash(Exception):
    """A process killed between two filesystem steps."""


def crash_at_step(monkeypatch, crash_at: int) -> list[str]:
    """Make the `crash_at`-th rename, exchange or tree removal raise `Crash` instead of acting."""
    steps: list[str] = []

    def counted(name, real):
        def step(*args, **kwargs):
            steps.append(name)
            if len(steps) == crash_at:
                raise Crash(name)
            return real(*args, **kwargs)

        return step

    monkeypatch.setattr(Path, "rename", counted("rename", Path.rename))
    monkeypatch.setattr(Path, "replace", counted("replace", Path.replace))
    monkeypatch.setattr(os, "replace", counted("os.replace", os.replace))
    monkeypatch.setattr(shutil, "rmtree", counted("rmtree", shutil.rmtree))
    monkeypatch.setattr(atomic, "_exchange", counted("exchange", atomic._exchange))
    return steps


@pytest.mark.parametrize("crash_at", range(1, 6))
def test_a_crash_at_any_step_of_the_swap_leaves_the_old_or_the_new_folder(tmp_path, monkeypatch, crash_at):
    target = make_folder(tmp_path / "adapter", "old")
    built = make_folder(tmp_path / ".adapter.partial", "new")
    steps = crash_at_step(monkeypatch, crash_at)
    try:
        replace_folder(built, target)
    except Crash:
        assert version_at(target) in ("old", "new"), f"no folder after a crash at {steps[-1]}"
    else:
        assert len(steps) < crash_at  # the swap had fewer steps: it finished
        assert version_at(target) == "new"


def test_without_an_atomic_exchange_an_interrupted_swap_is_undone_by_the_next(tmp_path, monkeypatch):
    """Systems without `renameat2` rename the old folder aside first; a crash right after
    that is repaired by the next swap before it does its own."""
    monkeypatch.setattr(atomic, "_exchange", lambda first, second: False)
    target = make_folder(tmp_path / "adapter", "old")
    steps = crash_at_step(monkeypatch, 4)  # rmtree of a leftover, no exchange, rename aside, crash
    with pytest.raises(Crash):
        replace_folder(make_folder(tmp_path / ".partial", "new"), target)
    assert steps == ["rmtree", "exchange", "rename", "rename"] and version_at(target) is None
    monkeypatch.undo()
    monkeypatch.setattr(atomic, "_exchange", lambda first, second: False)
    replace_folder(make_folder(tmp_path / ".partial2", "newer"), target)
    assert version_at(target) == "newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".partial", "adapter"]


def test_swap_into_an_empty_place(tmp_path):
    built = make_folder(tmp_path / ".partial", "new")
    assert replace_folder(built, tmp_path / "adapter") == tmp_path / "adapter"
    assert version_at(tmp_path / "adapter") == "new" and not built.exists()
