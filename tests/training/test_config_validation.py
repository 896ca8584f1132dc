"""A wrong config fails when it is composed, naming key, value and what is allowed, before any
model or data is loaded."""

from __future__ import annotations

import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from hydra.utils import instantiate
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

from conftrl.cli import train as train_command
from conftrl.cli.train import train
from conftrl.config.schema import ConfigError, check_strategy_complete, validate_train_config
from conftrl.training.callbacks import EMA, EnergyMonitor, SampleGrid
from support.config_groups import shipped_options

EXPERIMENTS = shipped_options("experiment")
METHODS = shipped_options("method")

# (overrides, what the message must say): one case per kind of mistake.
MISTAKES = {
    "wrong type": (["method.r=abc"], ["method.r='abc'", "valid integer"]),
    "wrong type, float": (["module.optimizer.lr=fast"], ["module.optimizer.lr='fast'", "valid number"]),
    "out of range": (["module.optimizer.lr=-1"], ["module.optimizer.lr=-1", "greater than 0"]),
    "a learning rate of 0": (["module.optimizer.lr=0"], ["module.optimizer.lr=0", "greater than 0"]),
    "weight decay": (["module.optimizer.weight_decay=-0.1"], ["module.optimizer.weight_decay=-0.1", "greater than or equal to 0"]),
    "an optimiser argument": (["+module.optimizer.amsgrad=maybe"], ["module.optimizer.amsgrad='maybe'", "valid boolean"]),
    "a key the optimiser does not take": (["+module.optimizer.momentum=0.9"], ["module.optimizer.momentum: unknown key", "weight_decay"]),
    "an optimiser that is not there": (["module.optimizer._target_=torch.optim.AdamWW"], ["module.optimizer._target_='torch.optim.AdamWW'", "cannot be imported"]),
    "warm-up": (["module.lr_scheduler.num_warmup_steps=-1"], ["module.lr_scheduler.num_warmup_steps=-1", "greater than or equal to 0"]),
    "probability": (["data.proportion_empty_prompts=1.5"], ["data.proportion_empty_prompts=1.5", "less than or equal to 1"]),
    "resolution": (["data.resolution=60"], ["data.resolution=60", "multiple of 8"]),
    "resolution and the VAE": (["data.resolution=36"], ["data.resolution=36", "multiple of 8"]),
    "OFT's own rule": (["method.eps=0"], ["method:", "eps"]),
    "r that does not divide a layer": (["method.r=3"], ["method:", "r=3", "does not divide"]),
    "a target that matches nothing": (["method.target_modules=[to_qq]"], ["method:", "to_qq"]),
    "sampler": (["sampling.sampler=ddm"], ["sampling.sampler='ddm'", "'ddim' or 'unipc'"]),
    "timesteps": (["loss.timesteps=cubicc"], ["loss.timesteps='cubicc'", "'uniform' or 'cubic'"]),
    "control widths": (["method.control_widths=[16,32]"], ["method.control_widths=[16, 32]", "at least 7 items"]),
    "control sees latent": (["method.control_sees_latent=maybe"], ["method.control_sees_latent='maybe'", "valid boolean"]),
    "control path": (["method.control_path=conv"], ["method.control_path='conv'", "'conv_in', 'multiscale' or 'controlnet'"]),
    "metric": (["callbacks.control_fidelity.metric=f1"], ["callbacks.control_fidelity.metric='f1'", "'edge_f1'"]),
    "scheduler": (["module.lr_scheduler.name=cosin"], ["module.lr_scheduler.name='cosin'", "'cosine'"]),
    "a module argument": (["module.seed=first"], ["module.seed='first'", "valid integer"]),
    "a node inside a group's": (
        ["annotator=depth_dnn", "annotator.estimator.path=.", "annotator.estimator.near_is_larger=maybe"],
        ["annotator.estimator.near_is_larger='maybe'", "valid boolean"],
    ),
    "a key the method does not take": (["method=full"], ["method.eps: unknown key", "control_path"]),
    "ControlNet without its control path": (["method=controlnet"], ["method.control_path='multiscale'", "Input should be 'controlnet'"]),
    "a trainer argument": (["trainer.max_steps=many"], ["trainer.max_steps='many'", "valid integer"]),
}


@pytest.fixture
def no_model_loads(monkeypatch):
    """Loading the base model fails the test: validation must stop the run before it."""

    def load_base(*args, **kwargs):
        raise AssertionError("the base model was loaded")

    monkeypatch.setattr(train_command, "load_base", load_base)


@pytest.mark.parametrize("overrides, expected", MISTAKES.values(), ids=MISTAKES.keys())
def test_a_mistake_is_reported_by_key_before_the_model_loads(make_config, no_model_loads, overrides, expected):
    cfg = make_config("experiment=canny_coft", *overrides)
    with pytest.raises(ConfigError) as error:
        train(cfg)
    for text in expected:
        assert text in str(error.value)


@pytest.mark.parametrize("overrides", [["experiment=canny_controlnet"], ["experiment=canny_oft", "method=control_only"]])
def test_a_method_that_adapts_nothing_of_the_base_refuses_the_text_encoder(make_config, no_model_loads, overrides):
    """It would run the frozen text encoder with gradients and train nothing of it."""
    cfg = make_config(*overrides, "+method.text_encoder=true")
    with pytest.raises(ConfigError, match=r"^method: (controlnet|control_only) trains its control path alone"):
        train(cfg)


def test_every_mistake_is_reported_at_once(make_config, no_model_loads):
    cfg = make_config("experiment=canny_coft", "method.r=abc", "sampling.sampler=ddm", "data.resolution=60")
    with pytest.raises(ConfigError) as error:
        train(cfg)
    assert len(str(error.value).splitlines()) == 3


def test_a_missing_model_path_is_named(compose_train, tmp_path, no_model_loads):
    with pytest.raises(ConfigError, match=r"model.path: missing value"):
        train(compose_train(["model=sd15"], tmp_path))


def test_a_data_folder_that_is_not_there_is_named(compose_train, tmp_path, no_model_loads):
    with pytest.raises(ConfigError, match=r"data.root='/no/such/folder': Path does not point to a directory"):
        train(compose_train(["data=folder", "data.root=/no/such/folder"], tmp_path))


def test_every_shipped_experiment_and_option_is_valid(compose_train, tmp_path):
    """The checks reject no config the project ships."""
    for experiment in EXPERIMENTS:
        validate_train_config(compose_train([f"experiment={experiment}"], tmp_path))
    for method in METHODS:
        validate_train_config(compose_train([f"method={method}"], tmp_path))
    for overrides in (["trainer=cpu_long"], ["trainer=ddp"], ["trainer=ddp_spawn"], ["trainer=fsdp"], ["trainer=gpu"], ["callbacks=[default,ema]"], ["debug=quick"]):
        validate_train_config(compose_train(["experiment=canny_coft", *overrides], tmp_path))


def test_the_command_prints_the_mistake_without_a_traceback(tmp_path):
    """As a user types it: exit status 1, the key and value on stderr, no traceback, quickly."""
    started = time.time()
    done = subprocess.run(
        [sys.executable, "-m", "conftrl.train", "experiment=canny_coft", "method.r=abc"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 1
    assert "method.r='abc': Input should be a valid integer" in done.stderr
    assert "Traceback" not in done.stderr
    assert not list(tmp_path.glob("outputs/*/runs/*/checkpoints/*"))
    assert time.time() - started < 60  # imports included; the check itself takes well under a second


@pytest.mark.parametrize(
    ("command", "given", "required"),
    [("conftrl.export", [], "adapter"), ("conftrl.export", ["merged=out"], "adapter"), ("conftrl.generate", [], "adapter")],
)
def test_a_required_key_left_out_is_named_in_one_line(tmp_path, command, given, required):
    done = subprocess.run([sys.executable, "-m", command, *given], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert f"{command}: {required} is required ({required}=...; --help lists the keys)" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("command", ["conftrl.generate", "conftrl.evaluate"])
def test_generate_and_evaluate_name_a_sampling_mistake_before_loading_the_adapter(tmp_path, command):
    required = ["control=edges.png", "prompt=x"] if command == "conftrl.generate" else []
    done = subprocess.run(
        [sys.executable, "-m", command, "adapter=no/such/adapter", *required, "sampler=ddm", "steps=0"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 1
    assert "sampler='ddm': Input should be 'ddim' or 'unipc'" in done.stderr
    assert "steps=0: Input should be greater than or equal to 1" in done.stderr


def test_fsdp_over_several_processes_refuses_only_ema_with_the_reason(compose_train, tmp_path):
    """Lightning runs FSDP on GPUs only, so the strategy the config builds is checked as it is."""
    strategy = instantiate(compose_train(["experiment=canny_coft", "trainer=fsdp"], tmp_path).trainer.strategy)
    assert isinstance(strategy, FSDPStrategy) and strategy.kwargs["use_orig_params"]
    watchers = [SampleGrid(1, [0], {}, str(tmp_path)), EnergyMonitor()]
    check_strategy_complete(SimpleNamespace(strategy=strategy, world_size=8, callbacks=watchers))
    check_strategy_complete(SimpleNamespace(strategy=strategy, world_size=1, callbacks=[*watchers, EMA()]))
    check_strategy_complete(SimpleNamespace(strategy=DDPStrategy(), world_size=8, callbacks=[*watchers, EMA()]))
    with pytest.raises(ConfigError, match="trainer=fsdp over 8 processes with callbacks.ema: .* each rank's shard"):
        check_strategy_complete(SimpleNamespace(strategy=strategy, world_size=8, callbacks=[*watchers, EMA()]))