"""The embedded base shipped in the package (`model=tiny`): it loads like SD 1.5, offline, was
made by `python -m conftrl.pretrain` on the world the control stage trains on, and knows it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from omegaconf import OmegaConf

from conftrl.config import ASSETS, config_dir
from conftrl.diffusion import load_base
from conftrl.metrics.scene import SceneScorer
from conftrl.pretraining.data import held_out
from conftrl.pretraining.evaluation import generate, scene_quality
from datamodules.shapesworld import COLORS, WorldSpec

BASE = ASSETS / "tiny-sd"
RECORD = json.loads((ASSETS / "pretrain_record.json").read_text())


def test_is_small_enough_to_ship():
    size = sum(path.stat().st_size for path in BASE.rglob("*") if path.is_file())
    assert size <= 25 * 2**20, f"{size / 2**20:.1f} MiB"


def test_loads_offline_through_the_sd_code_path_and_generates(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = load_base(BASE).pipeline()
    assert pipe.vae.config.scaling_factor == pytest.approx(RECORD["scaling_factor"])
    images = generate(pipe, ["a red circle on a gray background"] * 2, [0, 1], steps=4, cfg_scale=4.0)
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8
    assert images.std() > 10  # a picture, not a flat colour
    assert not np.array_equal(images[0], images[1])


def test_record_says_how_it_was_made():
    assert RECORD["complete"] and RECORD["stage"] == "done"
    config = RECORD["config"]
    assert RECORD["steps_done"] == {"vae": config["vae"]["steps"], "text_to_image": config["text_to_image"]["steps"]}
    assert RECORD["seed"] == config["seed"]
    assert {"psnr_db", "edge_f1_ceiling_strict", "edge_f1_ceiling_1px"} <= set(RECORD["metrics"]["vae"])
    assert {"background_correct", "colors_present"} <= set(RECORD["metrics"]["scene"])
    assert "output_dir" not in config  # where a run wrote is not part of the recipe


def test_base_learned_the_world_the_control_stage_trains_on():
    data = OmegaConf.load(f"{config_dir()}/data/shapesworld.yaml")
    for knob, value in RECORD["config"]["world"].items():
        assert data[knob] == value, f"conf/data/shapesworld.yaml {knob}={data[knob]} but the base saw {value}"
    assert data.resolution == RECORD["config"]["model"]["resolution"]


def test_generated_scenes_follow_held_out_captions():
    """Re-scores the shipped base on 32 held-out captions with the record's sampling settings."""
    config = RECORD["config"]
    samples = held_out(WorldSpec(**config["world"]), config["model"]["resolution"], 32, config["seed"], "test")
    scorer, settings = SceneScorer(COLORS, config["world"]["shape_colors"]), config["evaluation"]
    scores = scene_quality(load_base(BASE).pipeline(), samples, scorer, settings["sampling_steps"], settings["cfg_scale"])
    assert scores["background_correct"] >= 0.8, scores
    assert scores["colors_present"] >= 0.7, scores
    assert scores["colors_absent"] >= 0.7, scores  # present by following the caption, not by painting every colour
