"""`conftrl.evaluate` on a trained run: metrics JSON + Markdown and a sample grid."""

from __future__ import annotations

import json
import math

import cv2
import pytest
from conftest import compose_config

from conftrl.evaluate import evaluate


@pytest.fixture(scope="module")
def evaluated(trained_run, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("evaluation")
    overrides = [f"adapter={trained_run / 'adapter'}", "split=test", "num_images=3", "batch_size=2",
                 "grid_rows=2", "grid_seeds=[0,1]", "steps=2"]
    return evaluate(compose_config("cli/evaluate", overrides, output_dir)), output_dir


def test_metrics_json_holds_fidelity_energy_and_size(evaluated):
    report, output_dir = evaluated
    assert json.loads((output_dir / "metrics.json").read_text()) == report
    assert (report["method"], report["control"], report["split"], report["num_images"]) == ("coft", "CannyAnnotator", "test", 3)
    assert report["sampling"]["steps"] == 2
    assert set(report["fidelity"]) == {"edge_f1", "edge_f1_tol1"}
    for row in report["fidelity"].values():
        assert 0 <= row["value"] <= 1 and math.isfinite(row["percent_of_ceiling"])
        # ShapesWorld's canny control is canny of the real image itself: the ceiling is exact.
        assert row["ceiling"] == 1.0 and row["percent_of_ceiling"] == pytest.approx(100 * row["value"])
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

    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=False)
    assert evaluated[0]["trainable_parameters"] == sum(t.numel() for t in checkpoint["state_dict"].values())
