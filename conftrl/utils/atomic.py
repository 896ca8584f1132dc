"""Writes that leave the old file or folder or the complete new one, never half of each or none.

Files: written to a temporary file beside the target, fsynced, then renamed over it with
`os.replace`, and the rename made durable by fsyncing the folder. Folders: built beside the
target, then swapped with it in one step (Linux `renameat2(RENAME_EXCHANGE)`). A full disk is
reported as such, naming the path, whatever the writer raised. Standard library only, so that
`conftrl.oft` can use it without depending on the rest of conftrl.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


class DiskFullError(OSError):
    """No space was left on the device while writing; what was at the target is unchanged."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(
            errno.ENOSPC,
            f"no space left on device while writing {os.fspath(path)}; what was there before is "
            "unchanged. Free some space and run again",
        )
        self.filename = os.fspath(path)

    def __str__(self) -> str:
        return self.strerror


def _disk_was_full(error: BaseException) -> bool:
    """Whether a full disk is anywhere in the chain: torch's writer wraps the OSError that the
    file raised in an error of its own, safetensors' Rust writer quotes the system's message."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC or os.strerror(errno.ENOSPC) in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextmanager
def naming_a_full_disk(path: str | os.PathLike):
    """Re-raise whatever a full disk made the block raise as `DiskFullError` naming `path`."""
    try:
        yield
    except Exception as error:
        if _disk_was_full(error):
            raise DiskFullError(path) from error
        raise


def _fsync_folder(folder: Path) -> None:
    """Make renames inside `folder` durable (a no-op where folders cannot be opened)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call `write` with a binary file open beside `path`, then put that file in `path`'s place.

    If `write` (or the fsync) fails, `path` keeps its old content and the temporary file is
    removed; a full disk raises `DiskFullError` naming `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with naming_a_full_disk(path), open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def _exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one step; False where the system or filesystem cannot."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # a C library older than glibc 2.28
        return False
    at_cwd, rename_exchange = -100, 2
    if renameat2(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), os.fspath(first), None, os.fspath(second))


def replace_folder(built: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Put the complete folder `built` at `target`, replacing the folder there, if any.

    Where paths can be exchanged atomically (Linux), a crash at any point leaves the old
    folder or the new one at `target`. Elsewhere the old folder is first renamed aside to
    `.<name>.old` and the next call puts it back if a crash came between the two renames.
    """
    built, target = Path(built), Path(target)
    aside = target.with_name(f".{target.name}.old")
    if aside.exists() and not target.exists():
        aside.rename(target)  # a swap interrupted between its two renames: restore the old one
    shutil.rmtree(aside, ignore_errors=True)
    if not target.exists():
        built.rename(target)
    elif _exchange(built, target):
        shutil.rmtree(built)  # now holds the old folder
    else:
        target.rename(aside)
        built.rename(target)
        shutil.rmtree(aside)
    _fsync_folder(target.parent)
    return target
