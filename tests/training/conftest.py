"""Fixtures for training tests: a tiny random base saved once per session, configs composed
from the real Hydra tree with Hydra's compose API, and one short trained run to load."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from conftrl.cli.train import train
from conftrl.config import config_dir, register_resolvers
from conftrl.diffusion.tiny import TinySDXLSpec, TinySpec, save_tiny_pipeline

# Small enough that a training step takes well under a second on 2 CPU cores.
TEST_SPEC = TinySpec(
    resolution=32, vae_channels=(8, 8, 16), unet_channels=(16, 32), norm_groups=8,
    text_hidden=32, text_layers=1, max_tokens=16,  # ShapesWorld's captions fit 16 tokens
)
# The same sizes in SDXL's architecture: two text encoders (of different widths, as SDXL's),
# size conditioning, three down blocks.
TEST_SDXL_SPEC = TinySDXLSpec(
    resolution=32, vae_channels=(8, 8, 16), unet_channels=(16, 32, 32), norm_groups=8,
    text_hidden=32, text_hidden_2=48, text_layers=1, max_tokens=16,
)
FAST = [
    "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
    "sampling.steps=2", "callbacks.sample_grid.num_rows=2", "callbacks.sample_grid.seeds=[0]",
    "callbacks.control_fidelity.num_images=2", "data.batch_size=2", "data.resolution=32",
    "data.num_train=4", "data.num_val=4", "data.num_test=4", "logger=csv", "trainer.log_every_n_steps=1",
]


@pytest.fixture(scope="session", autouse=True)
def single_thread():
    """Models this small gain nothing from intra-op threads, and on a busy CPU OpenMP's
    spinning threads make every op up to ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd"), TEST_SPEC)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sdxl"), TEST_SDXL_SPEC)


def compose_config(name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """The config `name` (train, or cli/generate, cli/evaluate) as its entry point would see
    it, writing under `output_dir`."""
    register_resolvers()
    GlobalHydra.instance().clear()
    directory, _, name = f"{config_dir()}/{name}".rpartition("/")
    with initialize_config_dir(config_dir=directory, version_base="1.3"):
        cfg = compose(name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        if "paths" in cfg:
            cfg.paths.output_dir = str(output_dir)
            cfg.paths.log_dir = str(output_dir)
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg.hydra  # as under @hydra.main, where the job's config has no hydra node
    GlobalHydra.instance().clear()
    return cfg


@pytest.fixture
def make_config(tiny_base, tmp_path):
    """`make_config(*overrides)` → the composed train config, writing under tmp_path."""

    def make(*overrides: str, output_dir: Path | None = None) -> DictConfig:
        return compose_config("train", [f"model.path={tiny_base}", *FAST, *overrides], output_dir or tmp_path)

    return make


@pytest.fixture
def compose_train():
    """`compose_train(overrides, output_dir)` → the train config with nothing preset (the
    embedded base, full-size data), for runs that must measure the real thing."""
    return lambda overrides, output_dir: compose_config("train", overrides, output_dir)


@pytest.fixture(scope="session")
def trained_run(tiny_base, tmp_path_factory) -> Path:
    """The output dir of a 4-step canny COFT run validated twice (CSV log, adapter/)."""
    output_dir = tmp_path_factory.mktemp("canny_coft")
    overrides = [f"model.path={tiny_base}", *FAST, "experiment=canny_coft", "trainer.max_steps=4"]
    train(compose_config("train", overrides, output_dir))
    return output_dir


def run_command(module: str, *args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """`python -m module args...` as a user runs it, offline and single-threaded; fails with its output."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1", **env}
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done
