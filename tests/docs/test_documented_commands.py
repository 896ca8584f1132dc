"""Every command README.md and docs/*.md show runs as written.

Each document gets a fresh working directory, `PROJECT_ROOT` unset, no network; its commands
run there in the order a reader meets them, so a `generate` after a `train` uses that run's
adapter. The only additions are the quick suffixes docs/training.md documents ("Trying a
command quickly"), and paths a user would have are replaced by stand-ins built here: an
SD-1.5-shaped model with tiny widths (also as one original-layout file, read with its own
configs in place of SD 1.5's), a fill50k-layout folder, a folder of real photos, a parquet
`datasets` set of them, a depth ONNX model, a control image, and the time stamp of the newest
run. A command added to the docs is tested from then on; one that cannot run here must be
listed in NOT_RUN with why.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from support.data_sets import write_parquet_set, write_photo_folder
from support.docs_commands import REPO, Command, documented_commands
from support.original_layout import save_original_checkpoint
from support.wandb_files import wandb_runs

from conftrl.diffusion.tiny import TinySDXLSpec, TinySpec, save_tiny_pipeline

pytestmark = pytest.mark.slow

NOT_RUN = {
    "make test": "the test suite itself (CI runs it)",
    "make test-fast": "the test suite itself, less its slow tests",
    "make train": "installs, then runs `python -m conftrl.train experiment=canny_coft`, which runs here",
    "make demo": "installs, then serves `python -m conftrl.demo`, which runs here",
    "make install": "installs into the repository's .venv, which CI's `make test` does first",
    "wandb sync": "uploads to W&B's servers: needs a network and an account",
    "python -m conftrl.train data=hf data.dataset_name=fusing/fill50k": "downloads a dataset from the Hugging Face hub: needs a network",
    "python benchmarks/table2.py": "hours of training; tests/benchmarks/test_table2.py runs it on a tiny budget",
    "python benchmarks/train_step.py": "builds SD-1.5- and SDXL-sized models; tests/benchmarks/test_train_step.py runs it on tiny ones",
    "python benchmarks/recompute.py": "builds SD-1.5-sized models; tests/benchmarks/test_recompute.py runs it on tiny ones",
    "torchrun": "starts a process per GPU on several machines; tests/training/test_multinode.py runs two torchrun nodes here",
    "sbatch": "needs a SLURM cluster; the batch file runs `conftrl.train trainer=ddp` as test_multinode.py does",
}

# The suffixes docs/training.md documents for trying a command in seconds.
QUICK = {
    "conftrl.train": ["debug=quick"],
    "conftrl.generate": ["steps=2"],
    "conftrl.evaluate": ["num_images=2", "steps=2", "grid_rows=1", "grid_seeds=[0]"],
    "conftrl.pretrain": [
        "vae.steps=2", "text_to_image.steps=2", "evaluation.vae_images=4", "evaluation.num_captions=2",
        "evaluation.sampling_steps=2",
    ],
    "benchmarks/base_quality.py": ["--captions", "2", "--images", "4"],
    "benchmarks/data_throughput.py": ["--batches", "2"],
    "benchmarks/edge_errors.py": ["--num-images", "2", "--batch-size", "2"],
    "benchmarks/energy_cost.py": ["--repeats", "1", "--skip-unet"],
    "benchmarks/oft_layers.py": ["--quick", "--repeats", "1", "--warmup", "0"],
}
OPTUNA_QUICK = ["hydra.sweeper.n_trials=2"]
GPU_ON_CPU = ["trainer.accelerator=cpu"]

# What each command writes (relative to its working directory); a run must write it anew.
WRITES = {
    "conftrl.train": "outputs/*/runs/*/adapter/conftrl.yaml",
    "conftrl.generate": "outputs/generate/*/*_seed0.png",
    "conftrl.evaluate": "outputs/evaluate/*/metrics.json",
    "conftrl.export": "outputs/*merged/model_index.json",
    "conftrl.pretrain": "outputs/pretrain/*/pretrain_record.json",
}
MAIN_COMMAND = ["python", "-m", "conftrl.train", "experiment=canny_coft"]
# Commands that serve until stopped: each must print its URL and answer it.
SERVERS = {"conftrl.demo"}

COMMANDS = documented_commands()


def program(argv: list[str]) -> str:
    """`conftrl.train` for `python -m conftrl.train ...`, the script for `python script.py`."""
    return argv[2] if argv[:2] == ["python", "-m"] else argv[1] if argv[0] == "python" else " ".join(argv[:2])


def not_run_reason(command: Command) -> str | None:
    return next((why for prefix, why in NOT_RUN.items() if command.text.startswith(prefix)), None)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, str | list[str]]:
    """Documented placeholder → the words naming a small stand-in built here."""
    root = tmp_path_factory.mktemp("stand_ins")
    sd15 = save_tiny_pipeline(root / "sd15", TinySpec(
        resolution=64, vae_channels=(8, 8, 8, 8), unet_channels=(16, 16, 32, 32), norm_groups=8, layers_per_block=2,
        text_hidden=32, text_layers=1, max_tokens=16, sd_block_order=True,
    ))
    sdxl = save_tiny_pipeline(root / "sdxl", TinySDXLSpec(
        resolution=64, vae_channels=(8, 8, 8, 8), unet_channels=(16, 32, 32), norm_groups=8, text_hidden=32,
        text_hidden_2=48, text_layers=1, max_tokens=16,
    ))
    single_file = save_original_checkpoint(sd15, root / "sd15.safetensors")
    fill50k = fill50k_folder(root / "fill50k")
    return {
        "model.path=/models/sd15": f"model.path={sd15}",
        "model.path=/models/sdxl": f"model.path={sdxl}",
        # The stand-in's widths are not SD 1.5's: its own configs replace the shipped ones.
        "model.path=/models/sd15.safetensors": [f"model.path={single_file}", f"model.config={sd15}"],
        "model.tokenizer=/models/sd15/tokenizer": f"model.tokenizer={sd15 / 'tokenizer'}",
        "model.path=/models/sdxl.safetensors": [
            f"model.path={save_original_checkpoint(sdxl, root / 'sdxl.safetensors')}", f"model.config={sdxl}",
        ],
        "model.tokenizer=/models/sdxl": f"model.tokenizer={sdxl}",
        "model.path=...": f"model.path={sd15}",
        "data.root=/data/fill50k": f"data.root={fill50k}",
        "data.train_data_dir=/data/fill50k": f"data.train_data_dir={fill50k}",
        "data.root=/photos": f"data.root={write_photo_folder(root / 'photos')}",
        "data.dataset_name=/data/photos-parquet": f"data.dataset_name={write_parquet_set(root / 'photos-parquet')}",
        "annotator.estimator.path=/models/midas.onnx": f"annotator.estimator.path={depth_onnx(root / 'midas.onnx')}",
    }


def fill50k_folder(root: Path, count: int = 24) -> Path:
    """ControlNet's fill50k layout: prompt.json lines naming source (control) and target images."""
    lines = []
    for i in range(count):
        target, source = _circle_scene(i)
        cv2.imwrite(str(_parent(root / "target" / f"{i}.png")), target)
        cv2.imwrite(str(_parent(root / "source" / f"{i}.png")), source)
        lines.append(json.dumps({"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": "a red circle"}))
    (root / "prompt.json").write_text("\n".join(lines) + "\n")
    return root


def depth_onnx(path: Path) -> Path:
    """A one-convolution ONNX "depth" model: the image's mean brightness."""
    net = torch.nn.Conv2d(3, 1, 1, bias=False)
    net.weight.data.fill_(1 / 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, torch.zeros(1, 3, 32, 32), path, dynamo=False, input_names=["image"])
    return path


def _circle_scene(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    center, radius = tuple(int(c) for c in rng.integers(16, 48, 2)), int(rng.integers(6, 14))
    target = np.full((64, 64, 3), 128, np.uint8)
    cv2.circle(target, center, radius, (0, 0, 255), cv2.FILLED)
    source = np.zeros_like(target)
    cv2.circle(source, center, radius, (255, 255, 255), 1)
    return target, source


def _parent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    """One fresh working directory per document, with the control image its commands name."""
    made: dict[str, Path] = {}

    def workdir(document: str) -> Path:
        if document not in made:
            made[document] = tmp_path_factory.mktemp(Path(document).stem)
            edges = np.zeros((64, 64), np.uint8)
            cv2.circle(edges, (32, 32), 14, 255, 1)
            cv2.imwrite(str(made[document] / "edges.png"), edges)
        return made[document]

    return workdir


def user_environment() -> dict[str, str]:
    """The environment of a user with no W&B account and no network (single-threaded: the
    commands here are tiny, and several share two cores)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PROJECT_ROOT", "WANDB_MODE", "WANDB_API_KEY")}
    return env | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}


def process_argv(argv: list[str]) -> list[str]:
    """The documented words as a process to start: this interpreter for `python`, and a
    script's path relative to the repository."""
    argv = [sys.executable if argv[0] == "python" else argv[0], *argv[1:]]
    if argv[1:2] != ["-m"] and argv[1].endswith(".py"):
        argv[1] = str(REPO / argv[1])
    return argv


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    argv = process_argv(argv)
    done = subprocess.run(argv, cwd=cwd, env=user_environment(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(argv)}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def serves_a_page(argv: list[str], cwd: Path, timeout: float = 300) -> bool:
    """Start a server command, wait for the URL it prints, fetch the page, stop the server."""
    server = subprocess.Popen(
        process_argv(argv), cwd=cwd, env=user_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.time() + timeout
        for line in server.stdout:
            if match := re.search(r"(http://127\.0\.0\.1:\d+)", line):
                with urllib.request.urlopen(match.group(1), timeout=60) as page:
                    return page.status == 200 and b"conftrl" in page.read()
            assert time.time() < deadline, "no URL printed in time"
        return False
    finally:
        server.terminate()
        server.wait(timeout=60)


def as_run_here(command: Command, stand_ins: dict[str, str | list[str]], cwd: Path) -> list[str]:
    """The command's words with stand-ins for a user's paths, and its quick suffix."""
    replaced = [stand_ins.get(word, word) for word in command.argv]
    words = [w for word in replaced for w in ([word] if isinstance(word, str) else word)]
    if any("<time>" in word for word in words):
        words = [word.replace("<time>", newest_run(cwd)) for word in words]
    placeholders = [word for word in words if re.search(r"<[^>]*>|\.\.\.|…", word)]
    assert not placeholders, f"{command.id}: no stand-in for {placeholders}; add one to this test"
    name = program(words)
    words += QUICK.get(name, []) if "--help" not in words else []
    if "hparams_search=canny_optuna" in words:
        words += OPTUNA_QUICK
    if "trainer=gpu" in words or "trainer.accelerator=gpu" in words:
        words += GPU_ON_CPU
    return words


def newest_run(cwd: Path) -> str:
    """The time stamp of the newest canny run that wrote an adapter, after the README's main
    command if none did yet."""
    runs = sorted(p.parent.name for p in cwd.glob("outputs/canny_coft/runs/*/adapter"))
    if not runs:
        run([*MAIN_COMMAND, *QUICK["conftrl.train"]], cwd)
        runs = sorted(p.parent.name for p in cwd.glob("outputs/canny_coft/runs/*/adapter"))
    return runs[-1]


@pytest.mark.parametrize("command", COMMANDS, ids=[c.id for c in COMMANDS])
def test_documented_command_runs_as_written(command: Command, stand_ins, workdirs):
    if reason := not_run_reason(command):
        pytest.skip(f"not run: {reason}")
    cwd = workdirs(command.document)
    words = as_run_here(command, stand_ins, cwd)
    started = time.time() - 1
    if program(words) in SERVERS and "--help" not in words:
        assert serves_a_page(words, cwd), f"{command.id} served no page"
        return
    done = run(words, cwd)

    name = program(words)
    if "--help" in words:
        assert name.split(".")[-1] in done.stdout
    elif "-m" in words[3:]:
        check_sweep(words, cwd)
    elif name in WRITES:
        written = [p for p in cwd.glob(WRITES[name]) if p.stat().st_mtime >= started]
        assert written, f"{command.id} wrote no {WRITES[name]}"


def check_sweep(words: list[str], cwd: Path) -> None:
    """Each job its own directory, adapter and W&B run; the sweep's runs one W&B group."""
    sweep = max(cwd.glob("outputs/*/multiruns/*"), key=lambda p: p.stat().st_mtime)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    swept = dict(word.split("=", 1) for word in words if "," in word and "=" in word and "[" not in word)
    expected = 2 if "hparams_search=canny_optuna" in words else int(np.prod([len(v.split(",")) for v in swept.values()]))
    assert len(jobs) == expected
    adapters = [OmegaConf.load(job / "adapter" / "conftrl.yaml") for job in jobs]
    for key, values in swept.items():  # every combination reached its job's adapter
        assert {str(OmegaConf.select(a, key)) for a in adapters} == {str(yaml_value(v)) for v in values.split(",")}
    runs = [run for job in jobs for run in wandb_runs(job)]
    assert len({r.run_id for r in runs}) == len(jobs)
    assert {r.run_group for r in runs} == {sweep.name}


def yaml_value(text: str):
    """A sweep value as Hydra reads it (`1e-3` is a float)."""
    return OmegaConf.create({"v": text}).v if not re.fullmatch(r"[-+.\d]+e[-+]?\d+", text) else float(text)


def test_every_documented_command_is_collected():
    """The collector finds the commands of a fenced block, its continuations and inline spans."""
    texts = [c.text for c in COMMANDS]
    assert "python -m conftrl.train -m experiment=canny_coft method.r=2,4 method.eps=1e-3,5e-3" in texts
    assert any(t.startswith("python -m conftrl.generate ") and "seeds=[0,1,2]" in t for t in texts)  # continued
    assert all(not t.endswith("\\") and "#" not in t for t in texts)
