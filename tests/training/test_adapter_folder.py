"""The adapter folder as untrusted input and as a write that must not lose the old one:
no `_target_` outside conftrl's own classes runs, and exporting swaps folders atomically."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
import yaml
from support.training_runs import compose_config, run_command
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftrl.cli.evaluate import evaluate
from conftrl.cli.generate import generate
from conftrl.training.adapter import (
    ADAPTER_TARGETS, AdapterError, export_adapter, instantiate_recorded, load_adapter, read_adapter_config,
)
from conftrl.training.methods import ControlOnlyMethod

CONF = Path(__file__).parents[2] / "conf"


def planted_adapter(trained_run: Path, tmp_path: Path, where: list[str]) -> tuple[Path, Path]:
    """A copy of the trained adapter whose conftrl.yaml, at `where`, calls `shutil.copyfile`
    to create a marker file (a callable Hydra's own blocklist lets through, where it stops
    `os.system`); returns (adapter, marker)."""
    adapter, marker = tmp_path / "downloaded", tmp_path / "code_ran"
    shutil.copytree(trained_run / "adapter", adapter)
    config = yaml.safe_load((adapter / "conftrl.yaml").read_text())
    node = config
    for key in where:
        node = node[key]
    node.clear()
    node.update({"_target_": "shutil.copyfile", "_args_": [str(adapter / "conftrl.yaml"), str(marker)]})
    (adapter / "conftrl.yaml").write_text(yaml.safe_dump(config))
    return adapter, marker


@pytest.mark.parametrize("where", [["method"], ["annotator"], ["data", "annotator"]], ids=["method", "annotator", "data.annotator"])
def test_loading_an_adapter_never_calls_a_planted_target(trained_run, tmp_path, where):
    adapter, marker = planted_adapter(trained_run, tmp_path, where)
    target = ".".join(where)
    with pytest.raises(AdapterError, match=rf"{adapter / 'conftrl.yaml'}: {target}._target_ is 'shutil.copyfile', which is not one of conftrl's classes"):
        load_adapter(adapter)
    assert not marker.exists()


def test_an_adapter_written_before_the_renames_loads(trained_run, tmp_path):
    """Adapters written before `conftrl.methods` became `conftrl.training.methods`, the
    config group `control` became `annotator`, and the optimiser's settings moved from the
    method to the module, still load, still annotate, and read as new ones."""
    adapter = tmp_path / "older"
    shutil.copytree(trained_run / "adapter", adapter)
    config = yaml.safe_load((adapter / "conftrl.yaml").read_text())
    config["method"]["_target_"] = config["method"]["_target_"].replace("conftrl.training.methods.", "conftrl.methods.")
    config["control"] = config.pop("annotator")
    del config["module"]
    config["method"].update(lr=1e-3, weight_decay=0.01, lr_scheduler="cosine", warmup_steps=7)
    (adapter / "conftrl.yaml").write_text(yaml.safe_dump(config))
    loaded, current = load_adapter(adapter), load_adapter(trained_run / "adapter")
    assert type(loaded.method) is type(current.method) and loaded.method == current.method
    assert type(loaded.build("annotator")) is type(current.build("annotator"))
    assert OmegaConf.to_container(loaded.config.module) == {
        "optimizer": {"lr": 1e-3, "weight_decay": 0.01}, "lr_scheduler": {"name": "cosine", "num_warmup_steps": 7},
    }
    for (name, mine), theirs in zip(loaded.base.unet.state_dict().items(), current.base.unet.state_dict().values()):
        assert torch.equal(mine, theirs), name


@pytest.mark.parametrize("target", ["conftrl.methods.Method", "conftrl.training.methods.Method"])
def test_a_controlnet_adapter_written_before_controlnet_had_its_own_method_loads(tmp_path, target):
    """The methods' former base class trained the control path alone, as ControlNetMethod and
    ControlOnlyMethod do; an adapter that names it gets the method that trains the same."""
    path = tmp_path / "conftrl.yaml"
    path.write_text(yaml.safe_dump({"method": {
        "_target_": target, "name": "controlnet", "control_path": "controlnet", "text_encoder": False,
        "lr": 1e-4, "weight_decay": 0.0, "lr_scheduler": "constant_with_warmup", "warmup_steps": 0,
    }}))
    config = read_adapter_config(path)
    method = instantiate_recorded(config, "method", path)
    assert (type(method), method.name, method.control_path) == (ControlOnlyMethod, "controlnet", "controlnet")
    assert method.adapt(SimpleNamespace(unet=torch.nn.Linear(2, 2))) == {}  # nothing of the base trains
    assert config.module.optimizer.lr == 1e-4


def test_adapter_weights_are_read_from_safetensors_only(trained_run, tmp_path):
    """A pickle beside or instead of the weights is never unpickled, even as weights only."""
    adapter = tmp_path / "downloaded"
    shutil.copytree(trained_run / "adapter", adapter)
    weights = adapter / "control_encoder" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), weights.with_suffix(".bin"))
    weights.unlink()
    with pytest.raises(AdapterError, match=f"cannot apply the adapter in '{adapter}'.*safetensors"):
        load_adapter(adapter)


def test_generate_never_calls_a_planted_target(trained_run, tmp_path):
    adapter, marker = planted_adapter(trained_run, tmp_path, ["annotator"])
    control = tmp_path / "edges.png"
    cv2.imwrite(str(control), np.zeros((32, 32, 3), np.uint8))
    cfg = compose_config("cli/generate", [f"adapter={adapter}", f"control={control}", "prompt=a circle"], tmp_path / "out")
    with pytest.raises(AdapterError, match=r"conftrl.yaml: annotator._target_ is 'shutil.copyfile'"):
        generate(cfg)
    assert not marker.exists()


def test_evaluate_never_calls_a_target_nested_in_the_data(trained_run, tmp_path):
    adapter, marker = planted_adapter(trained_run, tmp_path, ["data", "annotator"])
    cfg = compose_config("cli/evaluate", [f"adapter={adapter}", "split=val", "num_images=1", "steps=1"], tmp_path / "out")
    with pytest.raises(AdapterError, match=r"conftrl.yaml: data.annotator._target_ is 'shutil.copyfile'"):
        evaluate(cfg)
    assert not marker.exists()


def test_the_command_line_reports_a_planted_target_in_one_line(trained_run, tmp_path):
    adapter, marker = planted_adapter(trained_run, tmp_path, ["method"])
    with pytest.raises(AssertionError, match=r"conftrl.evaluate: .*method._target_ is 'shutil.copyfile'"):
        run_command("conftrl.evaluate", f"adapter={adapter}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert not marker.exists()


def test_every_class_the_configs_can_record_is_allowed():
    """The allow-list keeps up with conf/: each method, annotator and data target may load."""
    recorded = set()
    for group in ("method", "annotator", "data"):
        for path in (CONF / group).glob("*.yaml"):
            text = path.read_text()
            recorded |= {line.split(":", 1)[1].strip() for line in text.splitlines() if line.strip().startswith("_target_:")}
    assert recorded and recorded <= ADAPTER_TARGETS, recorded - ADAPTER_TARGETS


# --- exporting -------------------------------------------------------------------------------


def fake_module(version: str):
    """What export_adapter reads of a trained module, writing `version` into every file."""

    def save_method(adapted, directory):
        (directory / "unet").mkdir()
        (directory / "unet" / "adapter_model.safetensors").write_text(version)

    return SimpleNamespace(
        adapted={},
        method=SimpleNamespace(save=save_method),
        control=SimpleNamespace(save=lambda directory: (directory / "control_encoder").mkdir()),
        num_trainable_parameters=1,
    )


def exported_version(directory: Path) -> str | None:
    if not (directory / "conftrl.yaml").is_file():
        return None
    version = OmegaConf.load(directory / "conftrl.yaml").version
    assert (directory / "unet" / "adapter_model.safetensors").read_text() == version, "a mix of two adapters"
    return version


class Crash(Exception):
    pass


@pytest.mark.parametrize("crash_at", range(1, 5))
def test_a_crash_during_export_leaves_the_old_or_the_new_adapter(tmp_path, monkeypatch, crash_at):
    """Every rename and removal is a point where the process may die: at none of them may
    the adapter folder be missing."""
    directory = tmp_path / "adapter"
    export_adapter(fake_module("old"), OmegaConf.create({"version": "old"}), directory)
    steps = []

    def crashing(real):
        def step(*args, **kwargs):
            steps.append(real.__name__)
            if len(steps) == crash_at:
                raise Crash(real.__name__)
            return real(*args, **kwargs)

        return step

    for owner, name in ((Path, "rename"), (Path, "replace"), (os, "replace"), (os, "rename"), (shutil, "rmtree")):
        monkeypatch.setattr(owner, name, crashing(getattr(owner, name)))
    try:
        export_adapter(fake_module("new"), OmegaConf.create({"version": "new"}), directory)
    except Crash:
        assert exported_version(directory) in ("old", "new"), f"no adapter after a crash at {steps[-1]}"
    else:
        assert exported_version(directory) == "new"


def test_export_never_replaces_a_folder_that_is_not_an_adapter(tmp_path):
    """export_dir=. or a data folder by mistake must not delete it."""
    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "cat.jpg").write_bytes(b"jpeg")
    with pytest.raises(AdapterError, match=f"export_dir '{precious}' exists and is not an adapter folder"):
        export_adapter(fake_module("new"), OmegaConf.create({"version": "new"}), precious)
    assert (precious / "cat.jpg").read_bytes() == b"jpeg"
    export_adapter(fake_module("new"), OmegaConf.create({"version": "new"}), tmp_path / "empty")  # a new folder is fine
    assert exported_version(tmp_path / "empty") == "new"


def test_a_full_disk_during_export_is_said_plainly_and_keeps_the_old_adapter(tmp_path):
    directory = tmp_path / "adapter"
    export_adapter(fake_module("old"), OmegaConf.create({"version": "old"}), directory)
    full = fake_module("new")

    def save_onto_a_full_disk(adapted, staging):
        # as safetensors' writer reports it
        raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')

    full.method.save = save_onto_a_full_disk
    with pytest.raises(OSError, match=f"no space left on device while writing {directory}"):
        export_adapter(full, OmegaConf.create({"version": "new"}), directory)
    assert exported_version(directory) == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no half-written copy left
