"""The OFT paper's Table 2 (Qiu et al., NeurIPS 2023) at small scale, every method trained until
its validation fidelity stops improving, each at the learning rate of its own short sweep.

    python benchmarks/table2.py [--tasks canny seg depth] [--methods base controlnet lora ...] \\
        [--out outputs/table2] [schedule options] [-- hydra overrides ...]
    python benchmarks/table2.py --render --out outputs/table2   # tabulate what has landed, train nothing

Methods (each `<task>_<method>` experiment, with the same data, seed and overrides): ControlNet
(diffusers), LoRA (peft) at r = 16 (`lora`) and at the rank whose trainable parameters match
OFT's (`lora_matched`, alpha = r so the update's scale is the r = 16 LoRA's), OFT, COFT, full
finetuning, and the no-control base (see `Run`). Tasks: canny (`canny_*`), segmentation
(`seg_*`); depth, not in the paper, only when asked for.

For every task, in `--methods` order:

1. The base: one validation of the untrained model.
2. The learning-rate sweep: each method trains `--sweep-steps` steps at every rate of its grid
   (`LR_GRIDS`, or `--lr-grid METHOD=V,V,V`); the rate whose run ends with the highest primary
   score (canny: strict edge F1; seg: mIoU; depth: order accuracy) is the method's.
3. The long runs: the chosen rate's sweep run continues, `--chunk` steps per training call, all
   unfinished methods in turn, until the stopping rule holds (`stop_reason`): the primary
   score, validated every `--val-every` steps, has not risen by more than `--min-delta` above
   its best before the last `--patience` validations, once the run has `--min-steps`; or the
   run has `--max-steps`.

Every training is a `python -m conftrl.train -m` job with its own directory
(`<out>/runs/<task>_<method>_lr<lr>`), config, log, CSV log and W&B run (the runs of one `--out`
share a W&B group named after it). Each call resumes its run's last checkpoint (written at every
validation), so an interrupted run, sweep or table continues where it stopped when the command
is repeated: `<out>/plan.json` records the schedule, grids and overrides of the first call, and a
later call must agree with it (options left out are taken from it). Hydra overrides after `--`
go to every run and must be single values.

The rendered table is also the memory of runs whose directories are gone (`Record`): a folder
with only `plan.json`, `table2.json` and the pictures (a published `benchmarks/results/<name>/`
on a fresh clone, whose `runs/` git ignores) continues from it. Its chosen rates stand for the
sweeps and its finished rows for their runs, none trained again; a run it records as still
training starts again from step 0 at its chosen rate.

The table (`<out>/table2.md`, `<out>/table2.json`, rewritten after every round of training) has,
per task and method: the learning rate, the trainable parameters, the steps and why the run
stopped, the scores of the final validation as the control_fidelity callback logged them and as
a percentage of their ceiling (the same scores of the real validation images after the base
VAE's round trip), the steps after which the primary score first reached 90 % of the best
method's final one (to the resolution of `--val-every`), `he/rel_change_total` (the relative
change of the UNet's hyperspherical energy against the base), and the wall time per training
step (the calls' wall time over the steps they trained: validations, loading and checkpoints
included). Next to it: `<task>_curves.png`, the primary score against steps, one line per
method, and `<task>_<method>.png`, each method's last sample grid.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig

from conftrl.config import config_dir, register_resolvers
from conftrl.diffusion import load_base
from conftrl.evaluation.measure import fidelity_ceiling, first_items
from conftrl.evaluation.report import fidelity_table
from conftrl.evaluation.report import format_number as number
from conftrl.evaluation.scorers import estimator_of, fidelity_scorer
from conftrl.training.adapter import CONFIG_FILE, FORMER_OPTIMISER_KEYS, read_adapter_config
from conftrl.training.checkpoints import saved_step
from conftrl.training.loggers import logged_metrics
from conftrl.training.module import ControlModule

from learning_curves import plot_curves, save_figure
from measure import machine

PAPER_TASKS = ("canny", "seg")  # the paper's Table 2 has canny, segmentation and landmarks
TASKS = (*PAPER_TASKS, "depth")
# The score a task is ranked, swept and stopped by: the first of its scores that grows with
# fidelity (canny: the strict edge F1 the paper reports; depth: the order accuracy, as a
# "90 % of the best" means nothing for an RMSE).
PRIMARY = {"canny": "edge_f1", "seg": "seg_miou", "depth": "depth_order"}
BASE = "base"
METHODS = (BASE, "controlnet", "lora", "lora_matched", "oft", "coft", "full")
EXPERIMENT = {BASE: "oft", "lora_matched": "lora"}  # a method's experiment, where not its own name
# Three rates half a decade apart around each method's default on the embedded base. ControlNet's
# default (1e-4) is its lowest: at 250 steps its zero convolutions had not let control through at
# that rate, so a smaller one cannot win a short sweep.
ADAPTER_LRS = (3e-4, 1e-3, 3e-3)
LR_GRIDS = {
    "controlnet": (1e-4, 3e-4, 1e-3), "lora": ADAPTER_LRS, "lora_matched": ADAPTER_LRS, "oft": ADAPTER_LRS,
    "coft": ADAPTER_LRS, "full": (3e-5, 1e-4, 3e-4),
}
REACHED = 0.9
ENERGY_CHANGE = "he/rel_change_total"
PLAN_FILE = "plan.json"
TABLE_FILE = "table2.json"  # as rendered; also what a later call remembers (`Record`)
WALL_TIME_FILE = "wall_time.json"  # in a run's directory: each finished training call's steps and seconds
FAILED_FILE = "failed.json"  # in a run's directory: its training call that failed (a diverged loss), not retried


@dataclass(frozen=True)
class Schedule:
    """How long each run trains, in steps; every length is a whole number of validations, so that
    every training call ends on one (and `validation_curve` can tell the validations apart)."""

    sweep_steps: int = 250  # 0: no sweep, every method at its experiment's rate
    val_every: int = 250
    chunk: int = 500  # steps per training call of a long run; the stopping rule is checked between calls
    min_steps: int = 2000  # ControlNet's zero convolutions open late: no plateau counts before this
    max_steps: int = 4000
    patience: int = 4  # validations
    min_delta: float = 0.01  # of the primary score: about its validation noise on 16 images

    def __post_init__(self) -> None:
        if self.val_every < 2:
            raise ValueError(f"--val-every={self.val_every}: expected at least 2 steps between validations")
        for name in ("sweep_steps", "chunk", "min_steps", "max_steps"):
            if getattr(self, name) % self.val_every:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)}: expected a multiple of "
                                 f"--val-every={self.val_every}, so that every training call ends on a validation")
        if self.chunk <= 0 or not self.sweep_steps <= self.min_steps <= self.max_steps:
            raise ValueError(f"expected --chunk > 0 and --sweep-steps <= --min-steps <= --max-steps, got {self}")
        if self.patience < 1 or self.min_delta < 0:
            raise ValueError(f"expected --patience >= 1 and --min-delta >= 0, got {self}")


@dataclass(frozen=True)
class Plan:
    """What a table's runs share, fixed by the first call of an `--out`."""

    schedule: Schedule = field(default_factory=Schedule)
    lr_grids: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(LR_GRIDS))
    lora_matched_rank: int | None = None  # counted when a call first asks for LoRA matched
    overrides: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {**asdict(self), "lr_grids": {method: list(lrs) for method, lrs in self.lr_grids.items()},
                "overrides": list(self.overrides)}

    @classmethod
    def from_json(cls, data: dict) -> Plan:
        return cls(Schedule(**data["schedule"]), {m: tuple(lrs) for m, lrs in data["lr_grids"].items()},
                   data["lora_matched_rank"], tuple(data["overrides"]))


@dataclass(frozen=True)
class Run:
    """One training of the table: a task's method at one learning rate (None: its experiment's).

    The no-control base is the task's OFT experiment trained for zero steps. Every method is
    the identity at initialisation (OFT's R = I, the zero-initialised output of the control
    encoder, ControlNet's zero convolutions, LoRA's B = 0), so that run's final validation
    samples exactly the base, through the same pipeline, validation items, seeds and sampler
    as every other row, and its energy monitor compares the base with itself (ΔHE = 0 by
    construction). A training run has no step-0 validation to use instead: Lightning validates
    every `val_check_interval` steps, and the callbacks skip the sanity check.
    """

    task: str
    method: str
    lr: float | None = None

    @property
    def is_base(self) -> bool:
        return self.method == BASE

    @property
    def experiment(self) -> str:
        return f"{self.task}_{EXPERIMENT.get(self.method, self.method)}"

    @property
    def name(self) -> str:
        return f"{self.task}_{self.method}" + ("" if self.lr is None else f"_lr{self.lr:g}")

    def directory(self, out: Path) -> Path:
        return out / "runs" / self.name

    def has_adapter(self, out: Path) -> bool:
        """`export_adapter` renames the adapter folder into place last: it exists only complete."""
        return (self.directory(out) / "adapter" / CONFIG_FILE).is_file()

    @property
    def sample_grid_name(self) -> str:
        return f"{self.task}_{self.method}.png"


@dataclass(frozen=True)
class Record:
    """The table an earlier call rendered into `<out>` (its `table2.json`), as the memory of runs
    whose directories are gone: a published results folder on a fresh clone has the table, the
    curves and the sample grids, but not the runs' checkpoints and logs. Its finished rows and its
    sweeps' chosen rates stand for those runs, so continuing a table trains only what had not
    finished; a run it records as still training starts again at its chosen rate."""

    tasks: dict = field(default_factory=dict)

    @classmethod
    def read(cls, out: Path) -> Record:
        path = Path(out) / TABLE_FILE
        return cls(json.loads(path.read_text())["tasks"] if path.is_file() else {})

    def sweep(self, task: str, method: str) -> dict | None:
        return self.tasks.get(task, {}).get("sweeps", {}).get(method)

    def chosen_lr(self, task: str, method: str) -> float | None:
        """The rate the method's finished sweep chose (None: not recorded, or unfinished)."""
        return (self.sweep(task, method) or {}).get("chosen_lr")

    def finished_row(self, run: Run) -> dict | None:
        """The run's row, where the table recorded it finished (base, plateau, max_steps or failed)."""
        row = self.tasks.get(run.task, {}).get("methods", {}).get(run.method)
        if row is None or row["stopped"] is None:
            return None
        return row if run.lr is None or row["lr"] == run.lr else None


# --- what a run has logged ----------------------------------------------------------------


def validation_curve(rows: list[dict], name: str, val_every: int) -> dict[int, float]:
    """Training steps taken → the logged score `name`, over every training call of a run.

    Inside `fit` Lightning logs a validation at the index of the step just taken (steps − 1),
    at multiples of `val_every`. `train`'s validation after `fit` is logged at the step count
    itself (a multiple of `val_every`, as every call ends on a validation, so never one less than
    one) and repeats the last one inside `fit`: it is read only for a run that validated nowhere
    else (the base, at step 0). Later rows (of a resumed call) replace earlier ones of their step."""
    logged = [(row["step"], row[name]) for row in rows if name in row]
    in_fit = {step + 1: value for step, value in logged if (step + 1) % val_every == 0}
    return in_fit or dict(logged)


def run_rows(run: Run, out: Path) -> list[dict]:
    return logged_metrics(run.directory(out)) if any(run.directory(out).glob("csv/version_*/metrics.csv")) else []


def primary_curve(run: Run, out: Path, schedule: Schedule) -> dict[int, float]:
    return validation_curve(run_rows(run, out), f"val/{PRIMARY[run.task]}", schedule.val_every)


def trained_steps(run: Run, out: Path, schedule: Schedule) -> int:
    """The steps of the run's last validation (0 before its first)."""
    return max(primary_curve(run, out, schedule), default=0)


def last_checkpoint(run: Run, out: Path) -> Path:
    """What the run's next training call resumes from (`ckpt_path=last`), where it exists."""
    return run.directory(out) / "checkpoints" / "last.ckpt"


def resumed_step(run: Run, out: Path) -> int:
    """The step the run's next training call starts from, so that its wall time is divided by
    the steps it trains, wherever its last checkpoint is."""
    return saved_step(last_checkpoint(run, out)) or 0  # None: no (readable) checkpoint


def stop_reason(curve: dict[int, float], schedule: Schedule) -> str | None:
    """Why a long run with this validation curve of its primary score is finished, or None.

    "plateau": it has `min_steps`, and the best of its last `patience` validations is not more
    than `min_delta` above the best of those before. "max_steps": it has `max_steps`."""
    steps = max(curve, default=0)
    if steps >= schedule.max_steps:
        return "max_steps"
    values = [curve[step] for step in sorted(curve)]
    recent, before = values[-schedule.patience:], values[: -schedule.patience]
    if steps >= schedule.min_steps and before and max(recent) <= max(before) + schedule.min_delta:
        return "plateau"
    return None


def pace(run: Run, out: Path) -> dict:
    """The wall time of the run's finished training calls over the steps they trained, and the
    OMP_NUM_THREADS each call's process was given (None: torch's default)."""
    path = run.directory(out) / WALL_TIME_FILE
    calls = [call for call in (json.loads(path.read_text()) if path.is_file() else []) if call["to"] > call["from"]]
    steps = sum(call["to"] - call["from"] for call in calls)
    return {
        "seconds_per_step": sum(call["seconds"] for call in calls) / steps if steps else None,
        "threads": sorted({str(call["threads"]) for call in calls}),
    }


def write_atomically(path: Path, text: str) -> None:
    """Write through a file of this process's own, renamed into place: the jobs of one `--out`
    read each other's tables (`Record`) and wall times, so none may see a half-written file."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(text)
    partial.replace(path)


# --- training ----------------------------------------------------------------------------------


def adapter_parameters(experiment: str, overrides: list[str]) -> int:
    """Trainable parameters of an experiment's method outside its control path."""
    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        config = compose("train", overrides=[f"experiment={experiment}", *overrides])
    module = ControlModule(load_base(config.model.path), instantiate(config.method))
    control = sum(p.numel() for p in module.control.parameters() if p.requires_grad)
    return module.num_trainable_parameters - control


def matching_lora_rank(task: str, overrides: list[str]) -> int:
    """The LoRA rank whose adapter is nearest OFT's in size (LoRA grows by a fixed count per rank)."""
    oft = adapter_parameters(f"{task}_oft", overrides)
    per_rank = adapter_parameters(f"{task}_lora", [*overrides, "method.r=1"])
    return max(1, round(oft / per_rank))


def method_overrides(run: Run, plan: Plan) -> list[str]:
    rank = plan.lora_matched_rank
    return [
        *([f"method.r={rank}", f"method.alpha={rank}"] if run.method == "lora_matched" else []),
        *([] if run.lr is None else [f"module.optimizer.lr={run.lr!r}"]),
    ]


def train_command(run: Run, out: Path, plan: Plan, steps: int) -> list[str]:
    """A `conftrl.train` multirun of one job that trains `run` to `steps`, from its last
    checkpoint if it has one (`ckpt_path=last`, which fails where there is nothing to resume),
    validating and checkpointing every `val_every`."""
    every = plan.schedule.val_every
    return [
        sys.executable, "-m", "conftrl.train", "-m", f"experiment={run.experiment}",
        *plan.overrides, *method_overrides(run, plan),
        f"trainer.max_steps={steps}", f"trainer.val_check_interval={every}",
        f"callbacks.model_checkpoint.every_n_train_steps={every}",
        f"hydra.sweep.dir={out}", f"hydra.sweep.subdir=runs/{run.name}",
        *(["ckpt_path=last"] if last_checkpoint(run, out).exists() else []),
    ]


def failure(run: Run, out: Path) -> dict | None:
    path = run.directory(out) / FAILED_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def train(run: Run, out: Path, plan: Plan, steps: int) -> None:
    """Train `run` to `steps` and record the call's wall time (written atomically). A call that
    exits with an error (`conftrl.train` stops on a non-finite loss) marks the run failed, and the
    table goes on without it; one killed by a signal stops the table (a rerun resumes it)."""
    start_steps, started = resumed_step(run, out), time.monotonic()
    called = subprocess.run(train_command(run, out, plan, steps))
    if called.returncode < 0:
        raise subprocess.CalledProcessError(called.returncode, called.args)
    if called.returncode > 0:
        marker = run.directory(out) / FAILED_FILE
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"from": start_steps, "to": steps, "returncode": called.returncode}) + "\n")
        print(f"table2: training {run.name} to {steps} steps failed (exit {called.returncode}; its log is in "
              f"{run.directory(out)}); delete {marker} to try again", file=sys.stderr)
        return
    path = run.directory(out) / WALL_TIME_FILE
    calls = json.loads(path.read_text()) if path.is_file() else []
    seconds = round(time.monotonic() - started, 1)
    calls.append({"from": start_steps, "to": steps, "seconds": seconds, "threads": os.environ.get("OMP_NUM_THREADS")})
    write_atomically(path, json.dumps(calls, indent=1) + "\n")


def sweep_runs(task: str, method: str, plan: Plan) -> list[Run]:
    if plan.schedule.sweep_steps == 0:
        return []
    return [Run(task, method, lr) for lr in plan.lr_grids[method]]


def sweep_pending(run: Run, out: Path, plan: Plan) -> bool:
    return trained_steps(run, out, plan.schedule) < plan.schedule.sweep_steps and failure(run, out) is None


def sweep_scores(task: str, method: str, out: Path, plan: Plan) -> dict[float, float | None]:
    """Each rate of the sweep → its run's primary score at the end of the sweep (None: not yet, or failed)."""
    steps = plan.schedule.sweep_steps
    return {run.lr: primary_curve(run, out, plan.schedule).get(steps) for run in sweep_runs(task, method, plan)}


def long_run(task: str, method: str, out: Path, plan: Plan, record: Record) -> Run | None:
    """The run that continues the best rate of the method's sweep, as found in `out` or recorded
    (None while the sweep is unfinished or if all its rates failed); without a sweep, the method at
    its experiment's rate."""
    if method == BASE:
        return Run(task, BASE)
    runs = sweep_runs(task, method, plan)
    if not runs:
        return Run(task, method)
    if (recorded := record.chosen_lr(task, method)) is not None:
        return Run(task, method, recorded)
    if any(sweep_pending(run, out, plan) for run in runs):
        return None
    scores = {lr: score for lr, score in sweep_scores(task, method, out, plan).items() if score is not None}
    return Run(task, method, max(scores, key=scores.get)) if scores else None


def finished(run: Run, out: Path, schedule: Schedule, record: Record) -> bool:
    """Failed, stopped by the rule, or recorded finished by a table whose run directory is gone."""
    if not run.directory(out).is_dir():
        return record.finished_row(run) is not None
    return failure(run, out) is not None or stop_reason(primary_curve(run, out, schedule), schedule) is not None


def experiment_exists(run: Run) -> bool:
    return (Path(config_dir()) / "experiment" / f"{run.experiment}.yaml").is_file()


def replicate(out: Path, tasks: list[str], methods: list[str], plan: Plan) -> dict:
    """Train what is missing, task by task: the base, every method's sweep, then the long runs
    a chunk at a time in turn; the table is rewritten after every round of chunks. What `out`'s
    table records finished (`Record`) is not trained again."""
    out = Path(out).resolve()
    record = Record.read(out)
    missing = [run.experiment for run in (Run(t, m) for t in tasks for m in methods) if not experiment_exists(run)]
    if missing:
        raise ValueError(f"no experiment config {', '.join(missing)} in {config_dir()}/experiment: leave those "
                         "methods or tasks out")
    for task in tasks:
        base = Run(task, BASE)
        if BASE in methods and not base.has_adapter(out) and record.finished_row(base) is None:
            train(base, out, plan, 0)
        trained = [method for method in methods if method != BASE]
        unswept = [method for method in trained if record.chosen_lr(task, method) is None]
        for method in unswept:
            for run in sweep_runs(task, method, plan):
                if sweep_pending(run, out, plan):
                    train(run, out, plan, plan.schedule.sweep_steps)
        runs = [run for method in trained if (run := long_run(task, method, out, plan, record)) is not None]
        while pending := [run for run in runs if not finished(run, out, plan.schedule, record)]:
            for run in pending:
                done = trained_steps(run, out, plan.schedule)
                train(run, out, plan, min(plan.schedule.max_steps, done + plan.schedule.chunk))
            render(out, plan)
    return render(out, plan)


# --- the table -----------------------------------------------------------------------------


def run_config(run: Run, out: Path) -> DictConfig:
    """The resolved config of the run's last training call, as its adapter folder records it;
    its data is instantiated, so it may name only the classes an adapter may (`check_targets`)."""
    return read_adapter_config(run.directory(out) / "adapter" / CONFIG_FILE)


def fidelity_ceilings(config: DictConfig) -> dict[str, float]:
    """The control_fidelity callback's scores of the real images of the items it samples for
    (the first `num_images` validation items of the run's data), through the base's VAE."""
    callback = config.callbacks.control_fidelity
    datamodule = instantiate(config.data)
    datamodule.setup("validate")
    items = first_items(datamodule.val_dataloader(), callback.num_images)
    vae = load_base(config.model.path).vae
    score = fidelity_scorer(callback.metric, items, estimator_of(datamodule))
    return fidelity_ceiling(items, score, callback.batch_size, vae)


def first_step_reaching(curve: dict[int, float], target: float) -> int | None:
    return next((step for step in sorted(curve) if curve[step] >= target), None)


def last_logged(rows: list[dict], name: str) -> float | None:
    values = [row[name] for row in rows if name in row]
    return values[-1] if values else None


def copy_last_sample_grid(run: Run, out: Path) -> str | None:
    """`samples/step_<N>.png` of the run's last validation, as `<out>/<task>_<method>.png`."""
    grids = (run.directory(out) / "samples").glob("step_*.png")
    last = max(grids, key=lambda path: int(path.stem.removeprefix("step_")), default=None)
    if last is None:
        return None
    shutil.copyfile(last, out / run.sample_grid_name)
    return run.sample_grid_name


def method_row(run: Run, out: Path, ceilings: dict[str, float], schedule: Schedule) -> dict:
    """The table's row of a run that has trained at least one call, without its steps-to-target."""
    rows = run_rows(run, out)
    curves = {name: validation_curve(rows, f"val/{name}", schedule.val_every) for name in ceilings}
    primary = curves[PRIMARY[run.task]]
    steps = max(primary)
    return {
        "run_dir": str(run.directory(out).relative_to(out)),
        "lr": None if run.is_base else run.lr if run.lr is not None else float(run_config(run, out).module.optimizer.lr),
        "steps": steps,
        "stopped": "base" if run.is_base else "failed" if failure(run, out) else stop_reason(primary, schedule),
        "trainable_parameters": 0 if run.is_base else int(run_config(run, out).trainable_parameters),
        "fidelity": fidelity_table({name: curve[steps] for name, curve in curves.items()}, ceilings),
        "he_rel_change_total": last_logged(rows, ENERGY_CHANGE),
        **pace(run, out),
        "sample_grid": copy_last_sample_grid(run, out),
        "curve": [[step, primary[step]] for step in sorted(primary)],
    }


def sweep_report(task: str, method: str, out: Path, plan: Plan, record: Record) -> dict | None:
    """The method's sweep: its scores by rate, the rates that failed and the chosen one, as
    recorded once finished, else as far as its runs in `out` have come (None: none has an adapter)."""
    if record.chosen_lr(task, method) is not None:
        return record.sweep(task, method)
    runs = sweep_runs(task, method, plan)
    if not any(run.has_adapter(out) for run in runs):
        return None
    chosen = long_run(task, method, out, plan, record)
    return {"scores": {f"{lr:g}": score for lr, score in sweep_scores(task, method, out, plan).items()},
            "failed": [f"{run.lr:g}" for run in runs if failure(run, out)],
            "chosen_lr": None if chosen is None else chosen.lr}


def task_report(task: str, out: Path, plan: Plan, record: Record) -> dict | None:
    """Every method's sweep and row of one task so far: from its run where `out` has one with an
    adapter, else as `record`ed finished (None if no method has either)."""
    runs = {method: run for method in METHODS if (run := long_run(task, method, out, plan, record)) is not None}
    landed = {method: run for method, run in runs.items() if run.has_adapter(out)}
    kept = {method: row for method, run in runs.items()
            if method not in landed and (row := record.finished_row(run)) is not None}
    if not landed and not kept:
        return None
    if landed:
        config = run_config(next(iter(landed.values())), out)  # the same data for every method
        ceilings, num_images = fidelity_ceilings(config), int(config.callbacks.control_fidelity.num_images)
    else:
        ceilings, num_images = record.tasks[task]["ceilings"], record.tasks[task]["num_images"]
    primary = PRIMARY[task]
    rows = {method: method_row(landed[method], out, ceilings, plan.schedule) if method in landed else kept[method]
            for method in runs if method in landed or method in kept}
    finals = {method: row["fidelity"][primary]["value"] for method, row in rows.items() if method != BASE}
    best = max(finals, key=finals.get, default=None)
    target = None if best is None else REACHED * finals[best]
    for method, row in rows.items():
        curve = dict(row["curve"])
        row[f"steps_to_{REACHED:.0%}_of_best"] = None if target is None else first_step_reaching(curve, target)
    sweeps = {method: sweep for method in METHODS
              if method != BASE and (sweep := sweep_report(task, method, out, plan, record)) is not None}
    return {
        "primary_metric": primary, "ceilings": ceilings, "num_images": num_images,
        "best": None if best is None else {"method": best, "final": finals[best], "target": target},
        "sweeps": sweeps, "methods": rows,
    }


def render(out: Path, plan: Plan) -> dict:
    """The table (Markdown and JSON), the learning curves and the sample grids of what has landed,
    with what the previous table recorded finished where its runs are gone."""
    out = Path(out).resolve()
    record = Record.read(out)
    tasks = {task: report for task in TASKS if (report := task_report(task, out, plan, record)) is not None}
    report = {"plan": plan.to_json(), "machine": machine(), "tasks": tasks}
    for task, table in tasks.items():
        curves = {method: dict(row["curve"]) for method, row in table["methods"].items()}
        primary = table["primary_metric"]
        title = f"{task}: validation {primary} ({table['num_images']} images)"
        figure = plot_curves(curves, title, primary, table["ceilings"][primary])
        save_figure(figure, out / f"{task}_curves.png")
    write_atomically(out / TABLE_FILE, json.dumps(report, indent=2) + "\n")
    write_atomically(out / "table2.md", to_markdown(report))
    return report


def steps_text(steps: int | None) -> str:
    return "not reached" if steps is None else f"{steps:,}"


def sweep_table(task: str, table: dict, plan: Plan) -> list[str]:
    """The sweep's scores: a row per method, a column per rate of its grid."""
    if not table["sweeps"]:
        return []
    lines = [f"Learning-rate sweep: {table['primary_metric']} after {plan.schedule.sweep_steps:,} steps.", "",
             "| method | scores by learning rate | chosen |", "|---|---|---|"]
    for method, sweep in table["sweeps"].items():
        scores = ", ".join(f"{lr}: {'failed' if lr in sweep['failed'] else number(score)}"
                           for lr, score in sweep["scores"].items())
        chosen = (f"{sweep['chosen_lr']:g}" if sweep["chosen_lr"] is not None
                  else "every rate failed" if len(sweep["failed"]) == len(sweep["scores"]) else "sweep unfinished")
        lines.append(f"| {method} | {scores} | {chosen} |")
    return [*lines, ""]


def task_table(task: str, table: dict, plan: Plan) -> list[str]:
    """The sweep, then a row per method with a pair of columns (score, % of ceiling) per score."""
    names, primary, best = list(table["ceilings"]), table["primary_metric"], table["best"]
    ceilings = ", ".join(f"{name} {number(value)}" for name, value in table["ceilings"].items())
    best_text = "–" if best is None else f"{best['method']}, {number(best['final'])}"
    reached = f"steps_to_{REACHED:.0%}_of_best"
    lines = [
        f"## {task}", "",
        f"Ceiling (the same scores of the real validation images through the base's VAE): {ceilings}. "
        f"Best final {primary}: {best_text}.", "",
        *sweep_table(task, table, plan),
        "| method | lr | trainable parameters | steps | stopped | "
        + " | ".join(f"{name} | % of ceiling" for name in names)
        + f" | steps to {REACHED:.0%} of the best {primary} | ΔHE vs base | s / step | samples |",
        "|---" * (9 + 2 * len(names)) + "|",
    ]
    for method, row in table["methods"].items():
        scores = " | ".join(
            f"{number(row['fidelity'][name]['value'])} | {number(row['fidelity'][name]['percent_of_ceiling'], 3)}"
            for name in names
        )
        energy = "–" if row["he_rel_change_total"] is None else f"{row['he_rel_change_total']:+.2e}"
        threads = ", ".join(row["threads"])
        speed = "–" if row["seconds_per_step"] is None else f"{row['seconds_per_step']:.2f} ({threads} thr.)"
        grid = "–" if row["sample_grid"] is None else f"[{row['sample_grid']}]({row['sample_grid']})"
        stopped = row["stopped"] or "training"
        lr = "–" if row["lr"] is None else f"{row['lr']:g}"
        head = f"| {method} | {lr} | {row['trainable_parameters']:,} | {row['steps']:,} | {stopped}"
        steps_to = "–" if best is None else steps_text(row[reached])
        lines.append(f"{head} | {scores} | {steps_to} | {energy} | {speed} | {grid} |")
    return [*lines, "", f"![{task} learning curves]({task}_curves.png)"]


def to_markdown(report: dict) -> str:
    """The plan in words, then one section per task."""
    plan = Plan.from_json(report["plan"])
    s, where = plan.schedule, report["machine"]
    overrides = " ".join(f"`{o}`" for o in plan.overrides) or "none"
    lines = [
        "# OFT paper, Table 2 at small scale, to convergence", "",
        f"Every method trains with the same data and seed; overrides: {overrides}. Learning rate: the best of "
        f"a {s.sweep_steps:,}-step sweep. Then each run continues in calls of {s.chunk:,} steps, validated every "
        f"{s.val_every:,}, until its primary score has not risen by more than {s.min_delta:g} above its best "
        f"before its last {s.patience} validations, once it has {s.min_steps:,} steps (stopped: plateau), "
        f"or at {s.max_steps:,} steps (stopped: max_steps); \"training\": not finished yet. "
        + ("" if plan.lora_matched_rank is None else
           f"LoRA matched: r = {plan.lora_matched_rank}, the rank nearest OFT's adapter size. ")
        + "Scores are those of the last "
        f"validation; ΔHE is `{ENERGY_CHANGE}`, the relative change of the UNet's hyperspherical energy against "
        "the base. The base is the untrained model (every adapter is the identity at initialisation). Steps "
        f"to {REACHED:.0%}: the first validation at which the primary score reaches {REACHED:.0%} of the best "
        "method's final one. s / step: the training calls' wall time over their steps, validations, loading "
        f"and checkpoints included, with the OMP_NUM_THREADS the calls were given (None: torch's default); "
        f"{where['cpu']}, {where['cores']} cores, torch {where['torch']}.", "",
    ]
    for task, table in report["tasks"].items():
        lines += [*task_table(task, table, plan), ""]
    return "\n".join(lines)


# --- the command line --------------------------------------------------------------------------


def lr_grid(text: str) -> tuple[str, tuple[float, ...]]:
    """`METHOD=V,V,...` → (method, rates)."""
    method, _, values = text.partition("=")
    if method not in LR_GRIDS or not values:
        raise argparse.ArgumentTypeError(f"--lr-grid {text!r}: expected METHOD=V,V,... with METHOD one of "
                                         f"{', '.join(LR_GRIDS)}")
    try:
        return method, tuple(float(value) for value in values.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lr-grid {text!r}: the rates must be numbers") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(PAPER_TASKS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--out", type=Path, default=Path("outputs/table2"))
    parser.add_argument("--render", action="store_true",
                        help="write the table and plots of what has landed; train nothing")
    defaults = Schedule()
    for name in asdict(defaults):
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(getattr(defaults, name)),
                            help=f"default {getattr(defaults, name)} (see Schedule)")
    parser.add_argument("--lr-grid", type=lr_grid, action="append", default=[], help="METHOD=V,V,... (repeatable)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    return parser.parse_args(argv)


def requested_plan(args: argparse.Namespace) -> dict:
    """The plan options given on the command line, as `Plan.to_json` would write them."""
    schedule = {name: getattr(args, name) for name in asdict(Schedule()) if getattr(args, name) is not None}
    return {
        **({"schedule": schedule} if schedule else {}),
        **({"lr_grids": {method: list(lrs) for method, lrs in args.lr_grid}} if args.lr_grid else {}),
        **({"overrides": [current_override(o) for o in args.overrides]} if args.overrides else {}),
    }


def current_override(override: str) -> str:
    """A Hydra override in today's keys: plans written before the optimiser became the module's
    set its learning rate as `method.lr` (and its kin), today `module.optimizer.lr`."""
    key, is_set, value = override.partition("=")
    former = key.removeprefix("method.")
    if key.startswith("method.") and former in FORMER_OPTIMISER_KEYS:
        return f"module.{FORMER_OPTIMISER_KEYS[former]}{is_set}{value}"
    return override


def conflicts(stored: dict, requested: dict, prefix: str = "") -> list[str]:
    """The requested settings that differ from the stored ones, as `key: stored -> requested`."""
    found = []
    for key, value in requested.items():
        if isinstance(value, dict) and isinstance(stored.get(key), dict):
            found += conflicts(stored[key], value, f"{prefix}{key}.")
        elif stored.get(key) != value:
            found.append(f"{prefix}{key}: {stored.get(key)!r} -> {value!r}")
    return found


def load_plan(out: Path, requested: dict, tasks: list[str], methods: list[str]) -> Plan:
    """The plan of `out`: the stored one, which the requested options must agree with, or a new
    one from them (then stored). The matched LoRA rank is counted on the first task's base by the
    first call whose `methods` need it: an ablation's overrides may not apply to LoRA at all."""
    path = Path(out) / PLAN_FILE
    if path.is_file():
        stored = json.loads(path.read_text())
        stored["overrides"] = [current_override(o) for o in stored["overrides"]]
        if found := conflicts(stored, requested):
            raise SystemExit(f"{path} was planned with other settings ({'; '.join(found)}): repeat the first "
                             "call's options or leave them out, or use another --out")
        plan = Plan.from_json(stored)
    else:
        schedule = Schedule(**requested.get("schedule", {}))
        grids = {**LR_GRIDS, **{m: tuple(lrs) for m, lrs in requested.get("lr_grids", {}).items()}}
        plan = Plan(schedule, grids, None, tuple(requested.get("overrides", ())))
    counts_rank = plan.lora_matched_rank is None and "lora_matched" in methods
    if counts_rank:
        plan = replace(plan, lora_matched_rank=matching_lora_rank(tasks[0], list(plan.overrides)))
    if counts_rank or not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(plan.to_json(), indent=2) + "\n")
    return plan


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    plan = load_plan(args.out, requested_plan(args), args.tasks, [] if args.render else args.methods)
    if args.render:
        render(args.out, plan)
    else:
        replicate(args.out, args.tasks, args.methods, plan)
    print((args.out / "table2.md").read_text())


if __name__ == "__main__":
    main()
