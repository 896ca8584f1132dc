"""benchmarks/table2.py: the stopping rule, the curve reading, the plan and the plot on their own;
then end to end on the tiny random base, a sweep of two rates, a long run continued from the
sweep's winner until the rule stops it, the table, the learning curves and a rerun that trains
nothing (or only what was removed)."""

from __future__ import annotations

import csv
import importlib
import json
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest
from PIL import Image


@pytest.fixture(scope="module")
def learning_curves(table2) -> ModuleType:
    """benchmarks/learning_curves.py, as table2 imported it."""
    return importlib.import_module(table2.plot_curves.__module__)


# --- the pieces, fast ----------------------------------------------------------------------------


def test_stop_reason_waits_for_min_steps_then_stops_on_a_plateau_or_the_cap(table2):
    schedule = table2.Schedule(sweep_steps=2, val_every=2, chunk=2, min_steps=6, max_steps=12, patience=2,
                               min_delta=0.01)
    climbing = {2: 0.10, 4: 0.20, 6: 0.30}
    assert table2.stop_reason({2: 0.1, 4: 0.1}, schedule) is None  # flat, but short of min_steps
    assert table2.stop_reason(climbing, schedule) is None
    assert table2.stop_reason({**climbing, 8: 0.305, 10: 0.309}, schedule) == "plateau"  # +0.009
    assert table2.stop_reason({**climbing, 8: 0.29, 10: 0.315}, schedule) is None  # +0.015 over 0.30
    assert table2.stop_reason({**climbing, 8: 0.40, 10: 0.50, 12: 0.60}, schedule) == "max_steps"
    assert table2.stop_reason({}, schedule) is None


def test_validation_curve_places_each_validation_after_the_steps_it_saw(table2):
    # Two calls, to 4 then 8 steps, validating every 2; each ends with train's own validation.
    rows = [
        {"step": 0, "train/loss": 1.0}, {"step": 1, "val/s": 0.1}, {"step": 3, "val/s": 0.2}, {"step": 4, "val/s": 0.2},
        {"step": 5, "val/s": 0.3}, {"step": 7, "val/s": 0.4}, {"step": 8, "val/s": 0.4},
    ]
    assert table2.validation_curve(rows, "val/s", val_every=2) == {2: 0.1, 4: 0.2, 6: 0.3, 8: 0.4}
    assert table2.validation_curve([{"step": 0, "val/s": 0.05}], "val/s", val_every=2) == {0: 0.05}  # the base
    resumed = [*rows, {"step": 7, "val/s": 0.45}]  # a later call validated step 8 again
    assert table2.validation_curve(resumed, "val/s", val_every=2)[8] == 0.45


@pytest.mark.parametrize(("options", "message"), [
    ({"val_every": 1}, "--val-every=1"),
    ({"chunk": 3}, "--chunk=3: expected a multiple of --val-every=2"),
    ({"min_steps": 2, "sweep_steps": 4}, "--sweep-steps <= --min-steps"),
    ({"max_steps": 2}, "--min-steps <= --max-steps"),
    ({"patience": 0}, "--patience >= 1"),
])
def test_schedule_refuses_lengths_that_do_not_end_on_a_validation_or_do_not_fit(table2, options, message):
    lengths = {"sweep_steps": 2, "val_every": 2, "chunk": 2, "min_steps": 4, "max_steps": 8, **options}
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        table2.Schedule(**lengths)


def test_lr_grid_option_parses_rates_and_names_a_bad_one(table2):
    assert table2.parse_args(["--lr-grid", "oft=1e-4,3e-4"]).lr_grid == [("oft", (1e-4, 3e-4))]
    for bad in ("nope=1e-3", "oft=", "oft=fast"):
        with pytest.raises(SystemExit):
            table2.parse_args(["--lr-grid", bad])


def test_a_later_call_must_agree_with_the_stored_plan(table2, tmp_path):
    stored = table2.Plan(table2.Schedule(), dict(table2.LR_GRIDS), 4, ("logger=csv",))
    (tmp_path / table2.PLAN_FILE).write_text(json.dumps(stored.to_json()))
    assert table2.load_plan(tmp_path, {}, ["canny"], ["oft"]) == stored  # options left out: the stored plan's
    assert table2.load_plan(tmp_path, table2.requested_plan(table2.parse_args(["--chunk", "500"])), ["canny"], ["oft"]) == stored
    with pytest.raises(SystemExit, match=r"plan.json was planned with other settings \(schedule.chunk: 500 -> 750\)"):
        table2.load_plan(tmp_path, table2.requested_plan(table2.parse_args(["--chunk", "750"])), ["canny"], ["oft"])
    with pytest.raises(SystemExit, match="overrides"):
        table2.load_plan(tmp_path, table2.requested_plan(table2.parse_args(["--", "seed=1"])), ["canny"], ["oft"])


def test_the_matched_lora_rank_is_counted_only_when_lora_matched_trains(table2, tmp_path, monkeypatch):
    """An ablation's overrides may not apply to LoRA (`method=control_only` has no `method.r`):
    its plan must not count LoRA's rank. A later call that trains LoRA matched counts it once."""
    counted = []
    monkeypatch.setattr(table2, "matching_lora_rank", lambda task, overrides: counted.append(task) or 3)
    requested = table2.requested_plan(table2.parse_args(["--", "method=control_only"]))
    assert table2.load_plan(tmp_path, requested, ["canny"], ["oft"]).lora_matched_rank is None
    assert table2.load_plan(tmp_path, {}, ["canny"], ["base", "oft"]).lora_matched_rank is None and not counted
    assert table2.load_plan(tmp_path, {}, ["seg"], ["lora_matched"]).lora_matched_rank == 3
    assert table2.load_plan(tmp_path, {}, ["canny"], ["lora_matched"]).lora_matched_rank == 3
    assert counted == ["seg"] and json.loads((tmp_path / table2.PLAN_FILE).read_text())["lora_matched_rank"] == 3


def test_a_plan_that_set_the_learning_rate_as_method_lr_resumes_with_todays_key(table2, tmp_path):
    """Plans written before the optimiser became the module's override `method.lr`, which the
    train command no longer takes; they train on with `module.optimizer.lr`, and a call that
    repeats the override in either spelling agrees with them."""
    former = table2.Plan(table2.Schedule(), dict(table2.LR_GRIDS), 4, ("seed=1", "method.lr=0.001", "method.r=8"))
    (tmp_path / table2.PLAN_FILE).write_text(json.dumps(former.to_json()))
    current = ("seed=1", "module.optimizer.lr=0.001", "method.r=8")
    assert table2.load_plan(tmp_path, {}, ["canny"], ["oft"]).overrides == current
    for spelling in ("method.lr=0.001", "module.optimizer.lr=0.001"):
        requested = table2.requested_plan(table2.parse_args(["--", "seed=1", spelling, "method.r=8"]))
        assert table2.load_plan(tmp_path, requested, ["canny"], ["oft"]).overrides == current


def test_a_method_without_an_experiment_is_refused_before_anything_trains(table2, tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("trained"))
    conf = tmp_path / "conf"  # a config tree whose depth task has OFT's experiment but no full finetuning
    (conf / "experiment").mkdir(parents=True)
    shutil.copy(Path(table2.config_dir()) / "experiment" / "depth_oft.yaml", conf / "experiment")
    monkeypatch.setattr(table2, "config_dir", lambda: str(conf))
    with pytest.raises(ValueError, match="no experiment config depth_full"):
        table2.replicate(tmp_path / "out", ["depth"], ["base", "full"], table2.Plan())


def test_plot_draws_one_line_per_method_and_the_ceiling(learning_curves):
    curves = {"base": {0: 0.04}, "oft": {250: 0.3, 500: 0.45}, "lora": {250: 0.35, 500: 0.4, 750: 0.42},
              "coft": {250: 0.3}}
    axes = learning_curves.plot_curves(curves, "canny", "edge_f1", ceiling=0.84).axes[0]
    lines = {line.get_label(): line for line in axes.get_lines()}
    assert sorted(lines) == sorted([*curves, learning_curves.CEILING_LABEL]) and len(axes.get_lines()) == 5
    assert list(lines["coft"].get_xdata()) == [250]  # one validation so far: a point, not a level
    assert list(lines["oft"].get_xdata()) == [250, 500] and list(lines["lora"].get_ydata()) == [0.35, 0.4, 0.42]
    assert list(lines["base"].get_ydata()) == [0.04, 0.04]
    assert list(lines[learning_curves.CEILING_LABEL].get_ydata()) == [0.84, 0.84]


# --- end to end on the tiny base -----------------------------------------------------------------

CANNY_METHODS = ["base", "controlnet", "lora_matched", "oft", "full"]  # lora and coft: the same code paths


@pytest.fixture(scope="module")
def replication(table2, fast_overrides, tmp_path_factory) -> tuple[Path, dict, object]:
    """Canny: a two-rate sweep for OFT and for LoRA (one rate diverges), one rate for the others,
    2 steps; then every long run continues 2 steps and stops on the plateau rule (nothing rises
    by more than 1). Seg and depth: no sweep, 2 steps at the experiment's rate."""
    out = tmp_path_factory.mktemp("table2")
    schedule = table2.Schedule(sweep_steps=2, val_every=2, chunk=2, min_steps=4, max_steps=8, patience=1, min_delta=1.0)
    grids = {**{method: (1e-3,) for method in table2.LR_GRIDS}, "oft": (1e-3, 3e-3), "lora_matched": (1e-3, 1e30)}
    plan = table2.Plan(schedule, grids, table2.matching_lora_rank("canny", fast_overrides), tuple(fast_overrides))
    fixed = table2.Plan(table2.Schedule(sweep_steps=0, val_every=2, chunk=2, min_steps=2, max_steps=2),
                        overrides=tuple(fast_overrides))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")  # for the training processes
        table2.replicate(out / "fixed", ["seg", "depth"], ["base", "oft"], fixed)
        report = table2.replicate(out, ["canny"], CANNY_METHODS, plan)
    return out, report, plan


def rows(report: dict) -> dict[tuple[str, str], dict]:
    return {(task, method): row for task, table in report["tasks"].items() for method, row in table["methods"].items()}


@pytest.mark.slow  # sixteen trainings, one process each: ~5 min on a busy core
def test_sweep_picks_each_methods_best_rate_and_its_run_continues(table2, replication):
    out, report, plan = replication
    table = report["tasks"]["canny"]
    assert list(table["sweeps"]) == ["controlnet", "lora_matched", "oft", "full"]
    scores = table["sweeps"]["oft"]["scores"]
    assert list(scores) == ["0.001", "0.003"] and None not in scores.values()
    chosen = table["sweeps"]["oft"]["chosen_lr"]
    assert scores[f"{chosen:g}"] == max(scores.values())
    row = table["methods"]["oft"]
    assert row["lr"] == chosen and row["run_dir"] == f"runs/canny_oft_lr{chosen:g}"
    assert row["steps"] == 4 and row["stopped"] == "plateau"  # the sweep's 2 steps, then one chunk
    assert [step for step, _ in row["curve"]] == [2, 4] and row["curve"][0][1] == scores[f"{chosen:g}"]
    calls = json.loads((out / row["run_dir"] / table2.WALL_TIME_FILE).read_text())
    assert [(call["from"], call["to"]) for call in calls] == [(0, 2), (2, 4)] and row["seconds_per_step"] > 0
    continued = sorted((out / row["run_dir"]).glob("csv/version_*/metrics.csv"))[-1]  # the second call's log
    with continued.open(newline="") as file:
        trained = [int(r["step"]) for r in csv.DictReader(file) if r.get("train/loss")]
    assert trained and min(trained) >= 2  # from the sweep's checkpoint at step 2, not from scratch
    other = out / f"runs/canny_oft_lr{3e-3 if chosen == 1e-3 else 1e-3:g}"
    assert max(table2.validation_curve(table2.logged_metrics(other), "val/edge_f1", 2)) == 2  # losers stop


@pytest.mark.slow
def test_a_diverging_rate_is_marked_failed_and_the_method_goes_on_at_another(table2, replication):
    out, report, _ = replication
    sweeps = report["tasks"]["canny"]["sweeps"]
    assert {method: sweep["failed"] for method, sweep in sweeps.items()} == {
        "controlnet": [], "lora_matched": ["1e+30"], "oft": [], "full": []}
    assert sweeps["lora_matched"]["scores"]["1e+30"] is None and sweeps["lora_matched"]["chosen_lr"] == 1e-3
    assert json.loads((out / "runs/canny_lora_matched_lr1e+30" / table2.FAILED_FILE).read_text())["to"] == 2
    assert "| lora_matched | 0.001: " in (out / "table2.md").read_text() and ", 1e+30: failed | 0.001 |" in (
        out / "table2.md").read_text()
    assert report["tasks"]["canny"]["methods"]["lora_matched"]["stopped"] == "plateau"


@pytest.mark.slow
def test_table_has_every_method_with_its_scores_steps_and_parameters(table2, replication):
    out, report, plan = replication
    assert json.loads((out / "table2.json").read_text()) == report
    markdown = (out / "table2.md").read_text()
    table = report["tasks"]["canny"]
    assert list(table["methods"]) == CANNY_METHODS and table["primary_metric"] == "edge_f1"
    count = {method: row["trainable_parameters"] for method, row in table["methods"].items()}
    assert count["base"] == 0 and count["full"] > count["controlnet"] > count["oft"] > 0
    per_rank = table2.adapter_parameters("canny_lora", [*plan.overrides, "method.r=1"])
    assert abs(count["lora_matched"] - count["oft"]) <= per_rank / 2  # the nearest rank's size
    best = max(row["fidelity"]["edge_f1"]["value"] for method, row in table["methods"].items() if method != "base")
    assert table["best"]["final"] == best and table["best"]["target"] == pytest.approx(0.9 * best)
    for method, row in table["methods"].items():
        assert list(row["fidelity"]) == ["edge_f1", "edge_f1_tol1"]
        assert row["steps"] == (0 if method == "base" else 4)
        assert row["fidelity"]["edge_f1"]["value"] == row["curve"][-1][1]
        reached = row["steps_to_90%_of_best"]
        assert reached == next((s for s, v in row["curve"] if v >= table["best"]["target"]), None)
        lr = "–" if row["lr"] is None else f"{row['lr']:g}"
        assert f"| {method} | {lr} | {row['trainable_parameters']:,} | {row['steps']:,} |" in markdown


@pytest.mark.slow
def test_fixed_budget_without_sweep_scores_each_task_its_own_way(table2, replication):
    out, _, _ = replication
    report = json.loads((out / "fixed" / "table2.json").read_text())
    scores = {"seg": ["seg_miou"], "depth": ["depth_rmse", "depth_order"]}
    for task, table in report["tasks"].items():
        assert list(table["ceilings"]) == scores[task] and table["primary_metric"] == table2.PRIMARY[task]
        assert table["sweeps"] == {} and table["methods"]["oft"]["run_dir"] == f"runs/{task}_oft"
        assert table["methods"]["oft"]["steps"] == 2 and table["methods"]["oft"]["stopped"] == "max_steps"
        for row in table["methods"].values():
            for name, score in row["fidelity"].items():
                if name == "depth_rmse":  # an error on the 0-255 scale: no percentage of a ceiling
                    assert 0.0 <= score["value"] <= 255.0 and score["percent_of_ceiling"] is None
                    continue
                assert 0.0 <= score["value"] <= 1.0
                assert score["percent_of_ceiling"] == pytest.approx(100 * score["value"] / score["ceiling"])


@pytest.mark.slow
def test_rotations_keep_the_energy_and_the_base_is_its_own_reference(replication):
    _, report, _ = replication
    for (_, method), row in rows(report).items():
        if method == "base":
            assert row["he_rel_change_total"] == 0.0
        elif method == "oft":
            assert abs(row["he_rel_change_total"]) < 1e-5


@pytest.mark.slow
def test_learning_curves_png_has_one_line_per_method_and_grids_are_copied(table2, learning_curves, replication):
    out, report, _ = replication
    table = report["tasks"]["canny"]
    assert Image.open(out / "canny_curves.png").format == "PNG"
    curves = {method: dict(row["curve"]) for method, row in table["methods"].items()}
    axes = learning_curves.plot_curves(curves, "canny", "edge_f1", table["ceilings"]["edge_f1"]).axes[0]
    method_lines = [line for line in axes.get_lines() if line.get_label() != learning_curves.CEILING_LABEL]
    assert [line.get_label() for line in method_lines] == CANNY_METHODS
    for (task, method), row in rows(report).items():
        assert row["sample_grid"] == f"{task}_{method}.png"
        assert (out / row["sample_grid"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_rerun_trains_only_what_is_missing(table2, replication, monkeypatch):
    out, report, plan = replication
    adapters = sorted(out.glob("runs/*/adapter/conftrl.yaml"))
    written = [path.stat().st_mtime_ns for path in adapters]
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: pytest.fail(f"trained again: {args}"))
    assert table2.replicate(out, ["canny"], CANNY_METHODS, plan) == report
    assert [path.stat().st_mtime_ns for path in adapters] == written

    chosen = report["tasks"]["canny"]["sweeps"]["oft"]["chosen_lr"]
    lost = out / f"runs/canny_oft_lr{3e-3 if chosen == 1e-3 else 1e-3:g}"
    kept = shutil.copytree(lost, lost.parent.parent / "kept")
    shutil.rmtree(lost)  # a sweep run lost while its table records the sweep: nothing trains
    assert table2.replicate(out, ["canny"], CANNY_METHODS, plan) == report
    (out / "table2.json").unlink()  # ... and without the table: it alone trains again
    commands = []

    def training(command, **kwargs):  # as if it trained: the run's directory is back
        commands.append(command)
        shutil.copytree(kept, lost)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(subprocess, "run", training)
    again = table2.replicate(out, ["canny"], CANNY_METHODS, plan)
    assert len(commands) == 1 and f"hydra.sweep.subdir=runs/{lost.name}" in commands[0]
    assert f"module.optimizer.lr={float(lost.name.split('_lr')[1])!r}" in commands[0]
    assert "trainer.max_steps=2" in commands[0] and "ckpt_path=last" not in commands[0]  # nothing to resume
    assert again["tasks"]["canny"]["sweeps"] == report["tasks"]["canny"]["sweeps"]


@pytest.mark.slow
def test_a_published_table_continues_on_a_fresh_clone_training_only_what_had_not_finished(
        table2, replication, monkeypatch, tmp_path):
    out, report, plan = replication
    published = tmp_path / "results"  # what a results folder in git holds: no run directories
    published.mkdir()
    for path in out.glob("*.*"):
        shutil.copyfile(path, published / path.name)
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: pytest.fail(f"trained again: {args}"))
    assert table2.replicate(published, ["canny"], CANNY_METHODS, plan) == report
    assert not (published / "runs").exists()

    table = json.loads((published / "table2.json").read_text())
    table["tasks"]["canny"]["methods"]["oft"]["stopped"] = None  # recorded while it was still training
    (published / "table2.json").write_text(json.dumps(table))
    run_dir = report["tasks"]["canny"]["methods"]["oft"]["run_dir"]
    commands = []

    def training(command, **kwargs):  # as if it trained: the run is as it was in `out`
        commands.append(command)
        shutil.copytree(out / run_dir, published / run_dir)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(subprocess, "run", training)
    again = table2.replicate(published, ["canny"], CANNY_METHODS, plan)
    assert len(commands) == 1 and f"hydra.sweep.subdir={run_dir}" in commands[0]  # the chosen rate's run
    assert "ckpt_path=last" not in commands[0] and "trainer.max_steps=2" in commands[0]  # from the start
    assert sorted(path.name for path in (published / "runs").iterdir()) == [Path(run_dir).name]
    pace = ("seconds_per_step", "threads")  # the fake call added its own wall time
    for method, row in report["tasks"]["canny"]["methods"].items():
        assert {k: v for k, v in again["tasks"]["canny"]["methods"][method].items() if k not in pace} == {
            k: v for k, v in row.items() if k not in pace}
    assert again["tasks"]["canny"]["sweeps"] == report["tasks"]["canny"]["sweeps"]
