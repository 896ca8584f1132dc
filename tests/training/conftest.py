"""Fixtures for training tests: a tiny random base saved once per session, configs composed
from the real Hydra tree with Hydra's compose API, and one short trained run to load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig
from support.training_runs import FAST, TEST_SDXL_SPEC, TEST_SPEC, compose_config

from conftrl.cli.train import train
from conftrl.diffusion.tiny import save_tiny_pipeline


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
