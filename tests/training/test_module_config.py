"""The module Hydra builds from `module`, `method` and the experiments: the optimiser and the
learning-rate schedule the config says, on the trainable weights only."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate
from lightning import Trainer

from conftrl.diffusion import load_base
from support.config_groups import shipped_options

METHODS = shipped_options("method")
EXPERIMENTS = shipped_options("experiment")

# Each method's optimiser settings, and the experiments' on the embedded base: what the
# shipped configs say, pinned so that a change to them is a change someone made on purpose.
METHOD_OPTIMISER = {
    "coft": (1e-5, 0.0), "oft": (1e-5, 0.0), "controlnet": (1e-5, 0.0), "full": (1e-5, 1e-2), "lora": (1e-4, 0.0),
    "control_only": (1e-5, 0.0),
}
EXPERIMENT_LR = {"coft": 1e-3, "oft": 1e-3, "lora": 1e-3, "controlnet": 1e-4, "full": 1e-4}
# What trains besides the control path, by parameter name.
ADAPTER_PARAMETER = {
    "coft": "oft_", "oft": "oft_", "lora": "lora_", "full": "unet.", "controlnet": None, "control_only": None,
}
STEPS = 10


def built(cfg, base_path):
    """The module as `conftrl.train` builds it, its optimiser and schedule as Lightning gets them."""
    module = instantiate(cfg.module)(base=load_base(base_path), method=instantiate(cfg.method))
    # max_epochs=-1: the trainer counts its steps from max_steps, without a datamodule.
    module.trainer = Trainer(max_steps=STEPS, max_epochs=-1, logger=False, enable_checkpointing=False)
    configured = module.configure_optimizers()
    return module, configured["optimizer"], configured["lr_scheduler"]["scheduler"]


@pytest.mark.parametrize("method", METHODS)
def test_the_module_has_the_optimiser_its_method_config_says(make_config, tiny_base, method):
    cfg = make_config(f"method={method}")
    module, optimizer, schedule = built(cfg, tiny_base)
    (group,) = optimizer.param_groups
    assert type(optimizer) is torch.optim.AdamW
    assert (group["lr"], group["weight_decay"]) == (cfg.module.optimizer.lr, cfg.module.optimizer.weight_decay)
    assert (group["lr"], group["weight_decay"]) == METHOD_OPTIMISER[method]
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    optimised = {name for name, p in module.named_parameters() if any(p is q for q in group["params"])}
    assert optimised == trainable and len(group["params"]) == len(trainable)
    adapter = {name for name in optimised if not name.startswith("control.")}
    assert all(ADAPTER_PARAMETER[method] in name for name in adapter) and bool(adapter) == (ADAPTER_PARAMETER[method] is not None)
    # constant_with_warmup without warm-up: the rate the config says, at every step.
    for _ in range(STEPS):
        assert group["lr"] == METHOD_OPTIMISER[method][0]
        optimizer.step()
        schedule.step()


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_keeps_its_learning_rate(make_config, experiment):
    cfg = make_config(f"experiment={experiment}")
    method = experiment.split("_", 1)[1]
    assert cfg.module.optimizer.lr == EXPERIMENT_LR[method]
    assert cfg.module.optimizer.weight_decay == METHOD_OPTIMISER[method][1]
    assert cfg.module.lr_scheduler.name == "constant_with_warmup" and cfg.module.lr_scheduler.num_warmup_steps == 0


def test_the_schedule_the_config_says_sets_the_rate_of_every_step(make_config, tiny_base):
    """Linear warm-up over 4 steps, then cosine decay to 0 at the last step."""
    warmup, lr = 4, 2e-3
    cfg = make_config("experiment=canny_coft", f"module.optimizer.lr={lr}",
                      "module.lr_scheduler.name=cosine", f"module.lr_scheduler.num_warmup_steps={warmup}")
    _, optimizer, schedule = built(cfg, tiny_base)
    rates = []
    for _ in range(STEPS + 1):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    expected = [lr * step / warmup for step in range(warmup)] + [
        lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (STEPS - warmup))) for step in range(warmup, STEPS + 1)
    ]
    assert rates == pytest.approx(expected, abs=1e-12)
    assert rates[warmup] == lr and rates[-1] == pytest.approx(0, abs=1e-12)
