"""`conftrl.evaluate` on a trained run: metrics JSON + Markdown and a sample grid."""

from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import cv2
import pytest
import torch
import torch.nn.functional as F
from support.training_runs import compose_config
from omegaconf import OmegaConf

from conftrl.cli.evaluate import evaluate
from conftrl.evaluation.measure import fidelity_ceiling
from conftrl.evaluation.scorers import FIDELITY_SCORERS
from datamodules import EmptySplitError


@pytest.fixture(scope="module")
def evaluated(trained_run, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("evaluation")
    overrides = [f"adapter={trained_run / 'adapter'}", "split=test", "num_images=3", "batch_size=2",
                 "grid_rows=2", "grid_seeds=[0,1]", "steps=2"]
    return evaluate(compose_config("cli/evaluate", overrides, output_dir)), output_dir


def test_metrics_json_holds_fidelity_energy_and_size(evaluated):
    report, output_dir = evaluated
    assert json.loads((output_dir / "metrics.json").read_text()) == report
    assert (report["method"], report["annotator"], report["split"], report["num_images"]) == ("coft", "CannyAnnotator", "test", 3)
    assert report["sampling"]["steps"] == 2
    assert set(report["fidelity"]) == {"edge_f1", "edge_f1_tol1"}
    for row in report["fidelity"].values():
        assert 0 <= row["value"] <= 1 and 0 <= row["ceiling"] <= 1
        if row["ceiling"] > 0:  # the real images through the base's VAE
            assert row["percent_of_ceiling"] == pytest.approx(100 * row["value"] / row["ceiling"])
    energy = report["hyperspherical_energy"]
    assert all(math.isfinite(v) for v in energy.values())
    assert abs(energy["rel_change_total"]) < 1e-5  # COFT rotates: the energy stays
    assert report["trainable_parameters"] > 0


def test_markdown_table_and_sample_grid(evaluated):
    report, output_dir = evaluated
    markdown = (output_dir / "metrics.md").read_text()
    assert "| edge_f1 |" in markdown and f"{report['trainable_parameters']:,}" in markdown
    grid = cv2.imread(str(output_dir / "samples.png"))
    assert grid.shape == (2 * 32 + 2, 3 * 32 + 2 * 2, 3)  # 2 rows: control + 2 seeds, 2 px gaps


def test_trainable_parameters_match_the_trained_module(trained_run, evaluated):
    import torch

    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert evaluated[0]["trainable_parameters"] == sum(t.numel() for t in checkpoint["state_dict"].values())



class FakeVAE(torch.nn.Module):
    """AutoencoderKL's encode/decode interface; a `blur` > 0 loses detail as a real VAE does."""

    def __init__(self, blur: int = 0):
        super().__init__()
        self.blur, self.anchor = blur, torch.nn.Parameter(torch.zeros(()))  # where inputs are moved to

    def encode(self, images):
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: images))

    def decode(self, latents):
        if self.blur:
            latents = F.avg_pool2d(latents, 2 * self.blur + 1, stride=1, padding=self.blur, count_include_pad=False)
        return SimpleNamespace(sample=latents)


def test_ceiling_is_the_score_of_real_images_through_the_vae(trained_run):
    from conftrl.metrics.fidelity import canny_edges
    from datamodules.shapesworld import ShapesWorld

    world = ShapesWorld("val", 4, 32, seed=0)
    samples = [world[i] for i in range(4)]
    images = torch.stack([torch.from_numpy(s["image"]).permute(2, 0, 1).float() / 127.5 - 1 for s in samples])
    edges = [torch.from_numpy(canny_edges(s["image"])).float() for s in samples]
    control = torch.stack([e.expand(3, -1, -1) for e in edges])
    items = {"image": images, "control": control, "caption": [s["caption"] for s in samples]}
    score = FIDELITY_SCORERS["edge_f1"]
    assert fidelity_ceiling(items, score, 2)["edge_f1"] == 1.0  # the control is Canny of these images
    assert fidelity_ceiling(items, score, 2, FakeVAE())["edge_f1"] == pytest.approx(1.0, abs=1e-3)  # a lossless trip
    blurred = fidelity_ceiling(items, score, 2, FakeVAE(blur=1))
    assert blurred["edge_f1"] < 0.9 and blurred["edge_f1_tol1"] > blurred["edge_f1"]


def test_evaluating_an_empty_split_names_it(trained_run, tmp_path):
    """A run without a test split (a folder's default test_fraction=0): a clear error, not an IndexError."""
    adapter = tmp_path / "adapter"
    shutil.copytree(trained_run / "adapter", adapter)
    config = OmegaConf.load(adapter / "conftrl.yaml")
    config.data.num_test = 0
    OmegaConf.save(config, adapter / "conftrl.yaml")
    cfg = compose_config("cli/evaluate", [f"adapter={adapter}", "split=test", "num_images=2", "steps=1"], tmp_path / "out")
    with pytest.raises(EmptySplitError, match=r"the test split is empty \(num_train=4, num_val=4, num_test=0\)"):
        evaluate(cfg)
