"""benchmarks/table2.py on the tiny random base: every method of every task trains 2 steps, the
table holds what each run logged, and a rerun trains nothing."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest


pytestmark = pytest.mark.slow  # fifteen trainings in two processes: ~45 s on one core


@pytest.fixture(scope="module")
def replication(table2, fast_overrides, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("table2")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")  # for the training processes
        report = table2.replicate(out, list(table2.TASKS), list(table2.METHODS), steps=2, val_every=2,
                                  overrides=fast_overrides)
    return out, report


def rows(report: dict) -> dict[tuple[str, str], dict]:
    return {(task, method): row for task, table in report["tasks"].items() for method, row in table["methods"].items()}


def test_table_has_a_row_per_task_and_method_with_the_tasks_scores(table2, replication):
    out, report = replication
    assert json.loads((out / "table2.json").read_text()) == report
    assert list(report["tasks"]) == ["canny", "seg", "depth"]
    scores = {"canny": ["edge_f1", "edge_f1_tol1"], "seg": ["seg_miou"], "depth": ["depth_rmse", "depth_order"]}
    primary = {"canny": "edge_f1", "seg": "seg_miou", "depth": "depth_order"}  # depth: not the RMSE
    markdown = (out / "table2.md").read_text()
    for task, table in report["tasks"].items():
        assert list(table["methods"]) == list(table2.METHODS)
        assert list(table["ceilings"]) == scores[task] and table["primary_metric"] == primary[task]
        assert f"## {task}" in markdown
        for method, row in table["methods"].items():
            assert list(row["fidelity"]) == scores[task]
            assert row["steps"] == (0 if method == "base" else 2)
            assert f"| {method} | {row['trainable_parameters']:,} | {row['steps']} |" in markdown


def test_trainable_parameters_are_what_each_method_trains(table2, replication):
    _, report = replication
    for task in table2.TASKS:
        count = {method: row["trainable_parameters"] for (t, method), row in rows(report).items() if t == task}
        assert count["base"] == 0
        assert count["controlnet"] > count["lora"] > 0 and count["controlnet"] > count["oft"] > 0
        assert count["oft"] == count["coft"]


def test_rotations_keep_the_energy_and_the_base_is_its_own_reference(replication):
    _, report = replication
    for (task, method), row in rows(report).items():
        if method == "base":
            assert row["he_rel_change_total"] == 0.0
        elif method in ("oft", "coft"):
            assert abs(row["he_rel_change_total"]) < 1e-5


def test_fidelity_and_ceilings_are_scores_and_oft_reaches_its_own_target(replication):
    _, report = replication
    for table in report["tasks"].values():
        for name, ceiling in table["ceilings"].items():
            assert 0.0 < ceiling <= 1.0 if name != "depth_rmse" else ceiling >= 0.0
        assert table["methods"]["oft"]["steps_to_90pct_of_oft"] is not None
        for row in table["methods"].values():
            for name, score in row["fidelity"].items():
                assert score["ceiling"] == table["ceilings"][name]
                if name == "depth_rmse":  # an error on the 0-255 scale: no percentage of a ceiling
                    assert 0.0 <= score["value"] <= 255.0 and score["percent_of_ceiling"] is None
                    continue
                assert 0.0 <= score["value"] <= 1.0
                assert score["percent_of_ceiling"] == pytest.approx(100 * score["value"] / score["ceiling"])


def test_every_method_has_its_last_sample_grid_next_to_the_table(replication):
    out, report = replication
    for (task, method), row in rows(report).items():
        assert row["sample_grid"] == f"{task}_{method}.png"
        assert (out / row["sample_grid"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_trains_nothing_and_rewrites_the_same_table(table2, replication, fast_overrides, monkeypatch):
    out, report = replication
    adapters = sorted(out.glob("runs/*/adapter/conftrl.yaml"))
    assert len(adapters) == 15
    written = [path.stat().st_mtime_ns for path in adapters]

    def no_training(*args, **kwargs):
        raise AssertionError(f"a finished run was trained again: {args}")

    monkeypatch.setattr(subprocess, "run", no_training)
    again = table2.replicate(out, list(table2.TASKS), list(table2.METHODS), steps=2, val_every=2,
                             overrides=fast_overrides)
    assert again == report
    assert [path.stat().st_mtime_ns for path in adapters] == written
