"""Where the Hydra tree lives and the few resolvers its YAML files use."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from conftrl.config.launch import launch_time, on_rank_zero, rank_zero_file

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def config_dir() -> str:
    """The installed `conftrl.conf` package (wheel or editable install), else the `conf/`
    directory of a source checkout that is on the path without being installed."""
    spec = importlib.util.find_spec("conftrl.conf")
    if spec is not None and spec.submodule_search_locations:
        return str(Path(next(iter(spec.submodule_search_locations))).resolve())
    return str(Path(__file__).resolve().parents[2] / "conf")


def wandb_offline() -> bool:
    """Offline unless the user has credentials or chose a mode: never prompt, never fail."""
    return not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE"))


def sweep_group() -> str | None:
    """One group per multirun (its sweep directory's name); single runs have none."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().sweep.dir).name
    return None


def register_resolvers() -> None:
    resolvers = {
        "conftrl.asset": lambda name: str(ASSETS / name),
        "conftrl.wandb_offline": wandb_offline,
        "conftrl.sweep_group": sweep_group,
        "conftrl.launch_time": launch_time,
        "conftrl.on_rank_zero": on_rank_zero,
        "conftrl.rank_zero_file": rank_zero_file,
    }
    for name, resolver in resolvers.items():
        OmegaConf.register_new_resolver(name, resolver, replace=True)
