"""What the training tests share besides fixtures: the tiny bases' sizes, the overrides that
make a run fast, a config composed as its command would see it, and a command run as a user
runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from conftrl.config import config_dir, register_resolvers
from conftrl.diffusion.tiny import TinySDXLSpec, TinySpec

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


# Far above the slowest command the tests run, so that a hang fails with its output.
COMMAND_TIMEOUT_S = 600


def run_command(module: str, *args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """`python -m module args...` as a user runs it, offline and single-threaded; fails with its
    output, also when it does not end within `COMMAND_TIMEOUT_S`."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1", **env}
    command = [sys.executable, "-m", module, *args]
    try:
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired as hung:
        output = "".join(o.decode() if isinstance(o, bytes) else o for o in (hung.stdout, hung.stderr) if o)
        raise AssertionError(f"{' '.join(command[1:])} did not end within {COMMAND_TIMEOUT_S} s:\n{output[-6000:]}") from None
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done
