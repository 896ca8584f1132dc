"""benchmarks/recompute.py on a small SD-shaped UNet: every mode is timed and the two
checkpointing modes give the same adapter gradients."""

from __future__ import annotations

import json


def test_modes_are_timed_and_keeping_the_blocks_changes_no_gradient(recompute, tmp_path):
    out = tmp_path / "recompute.json"
    report = recompute.main(["--model", "small", "--batch", "1", "--repeats", "1", "--threads", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    assert set(report["median_s"]) == {"off", "recompute", "keep"}
    assert all(seconds > 0 for seconds in report["median_s"].values())
    assert report["ratio_to_recompute"]["recompute"] == 1.0
    assert report["oft_layers"] > 0 and report["cayley_all_layers_s"] > 0
    assert report["max_gradient"] > 0 and report["max_gradient_difference"] <= 1e-6 * report["max_gradient"]
