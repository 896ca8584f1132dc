"""Pretraining configs composed from the real Hydra tree, shrunk to seconds of CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from conftrl.config import config_dir, register_resolvers
from conftrl.pretraining.run import pretrain

# A few steps of a model small enough that each takes a fraction of a second on 2 CPU cores.
TINY = [
    "model.resolution=32", "model.vae_channels=[8,16]", "model.latent_channels=4",
    "model.unet_channels=[16,32]", "model.text_hidden=32", "model.text_layers=1",
    "vae.steps=3", "vae.batch_size=4", "vae.warmup_steps=1",
    "text_to_image.steps=3", "text_to_image.batch_size=4", "text_to_image.warmup_steps=1",
    "evaluation.vae_images=8", "evaluation.num_captions=4", "evaluation.sampling_steps=2",
    "checkpoint_every_minutes=0", "threads=1",
]


def compose_pretrain(output_dir: Path, *overrides: str) -> DictConfig:
    """The pretrain config with the `TINY` budget, writing into `output_dir`."""
    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose("pretrain", overrides=[*TINY, f"output_dir={output_dir}", *overrides])
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture
def pretrain_config():
    return compose_pretrain


@pytest.fixture
def tiny_overrides() -> list[str]:
    return list(TINY)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> tuple[Path, dict]:
    """One uninterrupted tiny run (its output dir and record), shared by tests that read it."""
    out = tmp_path_factory.mktemp("uninterrupted")
    return out, pretrain(compose_pretrain(out))
