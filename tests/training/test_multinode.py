"""Data parallel as a cluster launches it: torchrun processes (one per "node" here, on this
machine, gloo), each running the whole command. One run dir, one adapter, identical replicas,
exact resume mid-epoch on every rank."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.training_runs import FAST
from lightning.pytorch.utilities import rank_zero_only
from support.wandb_files import wandb_records

from conftrl.config.launch import RUN_TIME_VARIABLE, launch_time, on_rank_zero, rank_zero_file
from conftrl.training.adapter import load_adapter
from conftrl.training.loggers import logged_metrics

PROBES = str(Path(__file__).parent)  # replicas.py, importable by every rank
SHORT = [o for o in FAST if not o.startswith(("logger=", "trainer.max_steps", "trainer.val_check"))]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(nodes: int, per_node: int, *command: str, cwd: Path, **env: str) -> list[subprocess.CompletedProcess]:
    """`torchrun --nnodes nodes --nproc-per-node per_node --node-rank R ... command` for every R,
    all at once as on `nodes` machines; each must exit 0."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": PROBES, **env}  # fmt: skip
    port = str(free_port())
    launches = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc-per-node", str(per_node),
             "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", port, *command],
            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        for rank in range(nodes)
    ]
    done = []
    for launch in launches:
        output, _ = launch.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(launch.args, launch.returncode, output))
    for node, result in enumerate(done):
        assert result.returncode == 0, f"node {node}:\n{result.stdout[-4000:]}"
    return done


def train_command(tiny_base: Path, *overrides: str) -> list[str]:
    return ["-m", "conftrl.train", "experiment=canny_coft", "trainer=ddp", "trainer.accelerator=cpu",
            f"model.path={tiny_base}", *SHORT, *overrides]  # fmt: skip


def test_torchrun_ranks_share_rank_zeros_run_time(tmp_path):
    """Without sharing, two processes formatting the time to the microsecond never agree."""
    show = "from conftrl.config.launch import launch_time; print('time', launch_time('%H:%M:%S.%f'))"
    done = torchrun(2, 1, "--no-python", sys.executable, "-c", show, cwd=tmp_path)
    times = {line for result in done for line in result.stdout.splitlines() if line.startswith("time")}
    assert len(times) == 1, times


def test_a_launch_names_its_run_by_the_time_it_is_given_or_by_its_slurm_job(monkeypatch):
    for name in ("WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_JOB_ID", RUN_TIME_VARIABLE):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert launch_time("%Y") == "slurm-4242"
    monkeypatch.setenv(RUN_TIME_VARIABLE, "2026-01-02_03-04-05")  # what the batch file sets for all tasks
    assert launch_time("%Y") == "2026-01-02_03-04-05"


@pytest.mark.parametrize("rank", [0, 1])
def test_only_rank_zero_writes_hydras_files(monkeypatch, rank):
    monkeypatch.setattr(rank_zero_only, "rank", rank)
    assert on_rank_zero(".hydra") == (".hydra" if rank == 0 else None)
    assert rank_zero_file("run/train.log") == ("run/train.log" if rank == 0 else os.devnull)


@pytest.mark.slow
def test_two_nodes_train_identical_replicas_into_one_run_dir(tiny_base, tmp_path):
    probes = tmp_path / "probes"
    torchrun(
        2, 1, *train_command(tiny_base, "trainer.num_nodes=2", "trainer.devices=1", "trainer.max_steps=3",
                             "trainer.val_check_interval=3", "data.num_train=8", "logger=many",
                             "+callbacks.replicas._target_=replicas.SaveTrainableState",
                             f"+callbacks.replicas.directory={probes}"),
        cwd=tmp_path,
    )  # fmt: skip
    ranks = [torch.load(probes / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["step"] for r in ranks] == [3, 3]
    first, second = (r["state"] for r in ranks)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert first["control.encoder.out.weight"].abs().sum() > 0  # it trained (the zero conv moved)

    (run_dir,) = (tmp_path / "outputs").glob("*/runs/*")  # one run dir for both processes
    encoder = load_adapter(run_dir / "adapter").control.encoder.state_dict()
    assert all(torch.equal(encoder[k], first[f"control.encoder.{k}"]) for k in encoder)  # exported = rank 0
    assert len(wandb_records(run_dir)) == 1 and len(list(run_dir.glob("csv/version_*"))) == 1
    # Rank 1 logged the same line, but only into its console: rank 0 alone writes the run's log.
    assert (run_dir / "canny_coft.log").read_text().count("trainable parameters") == 1
    assert {s["step"] for s in logged_metrics(run_dir) if "train/loss" in s} == {0, 1, 2}


@pytest.mark.slow
def test_two_ranks_killed_mid_epoch_resume_to_the_uninterrupted_run(tiny_base, tmp_path):
    """12 samples over 2 ranks in batches of 2: 3 steps an epoch; the checkpoints at steps 2 and 4
    fall inside epochs 0 and 1. Resumed at each, every rank must take the rest of that epoch's
    pass (not epoch 0's), and the second resume must start at step 4, not at the first's step 2."""
    common = ["trainer.devices=2", "data.num_train=12", "trainer.val_check_interval=2",
              "callbacks.model_checkpoint.every_n_train_steps=2", "+callbacks.batches._target_=replicas.RecordBatches"]  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    torchrun(1, 2, *train_command(tiny_base, *common, "trainer.max_steps=6", f"hydra.run.dir={straight}",
                                  f"+callbacks.batches.directory={straight}"), cwd=tmp_path)  # fmt: skip
    for steps, resume in ((2, []), (4, ["ckpt_path=last"]), (6, ["ckpt_path=last"])):
        torchrun(1, 2, *train_command(tiny_base, *common, f"trainer.max_steps={steps}", *resume,
                                      f"hydra.run.dir={resumed}", f"+callbacks.batches.directory={resumed}"),
                 cwd=tmp_path)  # fmt: skip

    for rank in (0, 1):
        expected, got = (
            [json.loads(line) for line in (run / f"batches_rank{rank}.jsonl").read_text().splitlines()]
            for run in (straight, resumed)
        )
        assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]  # the step each batch completed
        assert [r["keys"] for r in got] == [r["keys"] for r in expected]
        assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in expected], rel=1e-6, abs=1e-7)
    first_rank, second_rank = ([json.loads(line)["keys"] for line in (straight / f"batches_rank{r}.jsonl").open()]
                               for r in (0, 1))  # fmt: skip
    epoch0 = [k for keys in first_rank[:3] + second_rank[:3] for k in keys]
    assert len(set(epoch0)) == 12  # the ranks shared the epoch out, without repeats
