"""The options the project ships per Hydra config group, for tests that cover every one."""

from __future__ import annotations

from pathlib import Path

from conftrl.config import config_dir


def shipped_options(group: str) -> list[str]:
    """The options the project ships for a config group (`experiment`, `method`, `data`, ...)."""
    return sorted(path.stem for path in (Path(config_dir()) / group).glob("*.yaml"))
