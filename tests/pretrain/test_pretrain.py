"""`python -m conftrl.pretrain` end to end on a tiny budget: the folder it writes loads and
generates offline, and an interrupted run resumes to exactly the weights of an uninterrupted one."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from conftrl.diffusion import load_base
from conftrl.pretraining.run import ResumeMismatchError, pretrain


def weights(folder) -> dict[str, torch.Tensor]:
    return {f"{f.parent.name}/{k}": v for f in sorted(folder.glob("*/*.safetensors")) for k, v in load_file(f).items()}


def test_run_writes_a_loadable_pipeline_and_a_record(finished_run):
    out, record = finished_run
    assert record["complete"] and record["steps_done"] == {"vae": 3, "text_to_image": 3}
    assert json.loads((out / "pretrain_record.json").read_text()) == json.loads(json.dumps(record))
    assert set(record["wall_seconds"]) == {"vae", "text_to_image"}
    assert {"psnr_db", "edge_f1_ceiling_strict", "edge_f1_ceiling_1px"} <= set(record["metrics"]["vae"])
    assert {"background_correct", "colors_present"} <= set(record["metrics"]["scene"])
    assert record["config"]["seed"] == 0 and record["history"][-1]["step"] == 3

    pipe = StableDiffusionPipeline.from_pretrained(out / "tiny-sd", local_files_only=True)
    assert pipe.vae.config.scaling_factor == pytest.approx(record["scaling_factor"])
    assert record["scaling_factor"] != 0.18215  # measured from latents, not SD's constant
    images = pipe(
        "a red circle on a gray background", num_inference_steps=2,
        generator=torch.Generator().manual_seed(0), output_type="np",
    ).images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    assert load_base(out / "tiny-sd").vae_scale_factor == 2  # the control stage's loader too


def test_interrupted_run_resumes_to_the_same_weights(finished_run, pretrain_config, tmp_path):
    out, record = finished_run
    # Stop after 2 steps of each invocation: inside the VAE stage, across the stage boundary
    # and inside the text-to-image stage, each time from a fresh process state.
    records = [pretrain(pretrain_config(tmp_path, "max_steps_per_run=2")) for _ in range(3)]
    assert [r["complete"] for r in records] == [False, False, True]
    assert records[0]["stage"] == "vae" and records[1]["stage"] == "text_to_image"
    resumed, uninterrupted = weights(tmp_path / "tiny-sd"), weights(out / "tiny-sd")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    assert records[-1]["metrics"] == record["metrics"]


def test_rerunning_a_finished_run_changes_nothing(finished_run, pretrain_config):
    out, record = finished_run
    before = weights(out / "tiny-sd")
    again = pretrain(pretrain_config(out))
    assert again["complete"] and again["steps_done"] == record["steps_done"]
    after = weights(out / "tiny-sd")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resume_refuses_a_checkpoint_of_another_model(pretrain_config, tmp_path):
    pretrain(pretrain_config(tmp_path, "max_steps_per_run=1"))
    with pytest.raises(ResumeMismatchError, match="run_name"):
        pretrain(pretrain_config(tmp_path, "model.latent_channels=8"))



@pytest.mark.slow
def test_killed_command_resumes_to_the_same_weights(finished_run, tiny_overrides, tmp_path):
    """The real thing: `python -m conftrl.pretrain` SIGKILLed inside the text-to-image stage
    (possibly mid-write), then the same command again."""
    out, _ = finished_run
    command = [sys.executable, "-m", "conftrl.pretrain", *tiny_overrides, f"output_dir={tmp_path}"]
    record = tmp_path / "pretrain_record.json"
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if record.exists() and json.loads(record.read_text())["stage"] == "text_to_image":
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not json.loads(record.read_text())["complete"]

    subprocess.run(command, check=True, capture_output=True, timeout=300)
    resumed, uninterrupted = weights(tmp_path / "tiny-sd"), weights(out / "tiny-sd")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
