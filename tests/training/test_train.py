"""End-to-end runs of the training entry point on the tiny base (in-process, composed configs)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from conftrl.cli.train import train
from conftrl.diffusion import load_base
from conftrl.training.adapter import load_adapter
from conftrl.training.checkpoints import CheckpointError
from conftrl.training.loggers import logged_metrics
from conftrl.training.module import CheckpointMismatchError, ControlModule, NonFiniteLossError
from support.config_groups import shipped_options

EXPERIMENTS = shipped_options("experiment")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_fast_dev_run_of_every_experiment(make_config, experiment):
    cfg = make_config(f"experiment={experiment}", "debug=fdr")
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    fidelity = {"edge_f1", "seg_miou", "depth_rmse"} & {k.removeprefix("val/") for k in metrics}
    assert len(fidelity) == 1
    adapter = load_adapter(cfg.export_dir)
    assert adapter.method.name == cfg.method.name


def test_a_control_encoder_that_sees_the_latent_trains_exports_and_samples(make_config):
    cfg = make_config("experiment=canny_oft", "method.control_sees_latent=true", "trainer.max_steps=3")
    train(cfg)
    adapter = load_adapter(cfg.export_dir)
    encoder = adapter.control.encoder
    assert encoder.sees_latent and adapter.config.method.control_sees_latent
    control, latents = torch.rand(1, 3, 32, 32), torch.randn(2, 1, 4, 8, 8)
    with torch.no_grad():  # trained, exported and loaded, the control features follow the latent
        first, second = (encoder(control, latent)[0] for latent in latents)
    assert (first - second).abs().max() > 0
    images = adapter.sample(["a red circle"], control, [0], steps=2)
    assert images.shape == (1, 32, 32, 3)


def test_the_control_encoder_alone_trains_and_leaves_the_unet_as_the_base(make_config):
    """`method=control_only`: the encoder learns, the exported adapter holds nothing else."""
    cfg = make_config("experiment=canny_oft", "method=control_only", "trainer.max_steps=3")
    train(cfg)
    adapter = load_adapter(cfg.export_dir)
    assert adapter.method.name == "control_only" and adapter.adapted == {}
    assert sorted(p.name for p in Path(cfg.export_dir).iterdir()) == ["conftrl.yaml", "control_encoder"]
    trained, base = adapter.base.unet.state_dict(), load_base(cfg.model.path).unet.state_dict()
    for name, weight in base.items():
        assert torch.equal(trained[name], weight), name
    assert adapter.control.encoder.out.weight.abs().max() > 0  # zero at the start, trained
    images = adapter.sample(["a red circle"], torch.rand(1, 3, 32, 32), [0], steps=2)
    assert images.shape == (1, 32, 32, 3)


def test_every_encoder_experiment_uses_the_same_control_path(compose_train, tmp_path):
    """Table 2 compares methods, not control paths: all but ControlNet feed the UNet alike."""
    paths = {name: compose_train([f"experiment={name}"], tmp_path).method.control_path for name in EXPERIMENTS}
    encoder_paths = {name: path for name, path in paths.items() if path != "controlnet"}
    assert set(encoder_paths.values()) == {"multiscale"}, encoder_paths


def test_the_long_cpu_run_is_the_default_run_continued(compose_train, tmp_path):
    """trainer=cpu_long changes only how long the default run goes and how often it validates,
    so its first validations repeat the default run's (docs/results.md compares the two)."""
    default = compose_train(["experiment=canny_coft"], tmp_path)
    long = compose_train(["experiment=canny_coft", "trainer=cpu_long"], tmp_path)
    assert long.trainer.max_steps > default.trainer.max_steps
    assert long.trainer.val_check_interval % default.trainer.val_check_interval == 0
    for key in ("max_steps", "val_check_interval"):
        long.trainer[key] = default.trainer[key]
    assert long == default


def losses(output_dir: Path) -> dict[int, float]:
    return {row["step"]: row["train/loss"] for row in logged_metrics(output_dir) if "train/loss" in row}


@pytest.mark.parametrize("num_train", [4, 6], ids=["at-epoch-end", "mid-epoch"])
def test_resuming_twice_from_the_last_checkpoint_reproduces_the_uninterrupted_run(make_config, tmp_path, num_train):
    """Batches of 2: with 6 samples the checkpoint at step 2 falls inside the first epoch, so
    the resumed run must finish that epoch (step 2) and then start the next (step 3). The second
    resume is the one that went wrong: it started again from the first call's last checkpoint."""
    common = ["experiment=canny_coft", "trainer.log_every_n_steps=1", "callbacks.model_checkpoint.every_n_train_steps=2",
              "trainer.val_check_interval=2", f"data.num_train={num_train}"]
    straight = make_config(*common, "trainer.max_steps=6", output_dir=tmp_path / "straight")
    train(straight)
    for steps in (2, 4, 6):
        resume = ["ckpt_path=last"] if steps > 2 else []
        train(make_config(*common, f"trainer.max_steps={steps}", *resume, output_dir=tmp_path / "resumed"))
        last = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
        assert torch.load(last, weights_only=True)["global_step"] == steps
    checkpoint = torch.load(last, weights_only=True)
    assert all("oft_R" in k or k.startswith("control.") for k in checkpoint["state_dict"])
    trained = [row["step"] for row in logged_metrics(tmp_path / "resumed") if "train/loss" in row]
    assert sorted(trained) == list(range(6))  # every step trained once, in the three calls together
    first, second = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    for step in range(2, 6):  # steps after a resume
        assert second[step] == pytest.approx(first[step], rel=1e-6, abs=1e-7)


def test_checkpoint_of_another_method_is_refused(make_config, tmp_path):
    train(make_config("experiment=canny_coft", "callbacks.model_checkpoint.every_n_train_steps=2", output_dir=tmp_path / "a"))
    lora = make_config("experiment=canny_lora", f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}",
                       "trainer.max_steps=4", output_dir=tmp_path / "b")
    with pytest.raises(CheckpointMismatchError, match="method='coft'.*'lora'"):
        train(lora)


def test_corrupt_checkpoint_is_refused(make_config, tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x80\x02 truncated")
    with pytest.raises(CheckpointError, match=f"checkpoint {bad} is damaged"):
        train(make_config("experiment=canny_coft", f"ckpt_path={bad}"))


@pytest.mark.parametrize("leftover", ["nothing", "dangling last.ckpt"])
def test_resume_with_nothing_to_resume_fails_and_says_where_it_looked(make_config, tmp_path, leftover):
    """Lightning would warn and train from step 0; a forgotten hydra.run.dir looks just like that."""
    if leftover == "dangling last.ckpt":
        (tmp_path / "checkpoints").mkdir()
        (tmp_path / "checkpoints" / "last.ckpt").symlink_to("step_000002.ckpt")
    with pytest.raises(CheckpointError, match=f"ckpt_path=last: .*{tmp_path / 'checkpoints'}"):
        train(make_config("experiment=canny_coft", "ckpt_path=last"))
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize("trainer", ["cpu", "cpu_long", "gpu", "ddp"])
def test_a_killed_default_run_has_a_checkpoint_to_resume(compose_train, tmp_path, trainer):
    """A checkpoint before the run's end: the first must not fall on its last step."""
    cfg = compose_train(["experiment=canny_coft", f"trainer={trainer}"], tmp_path)
    cadence = cfg.callbacks.model_checkpoint.every_n_train_steps
    assert 0 < cadence < cfg.trainer.max_steps
    assert cfg.callbacks.model_checkpoint.save_top_k >= 2  # one from before a divergence survives


@pytest.mark.parametrize("setting", ["trainer.max_epochs=0", "+trainer.limit_train_batches=0"])
def test_zero_training_steps_is_an_error(make_config, tmp_path, setting):
    with pytest.raises(RuntimeError, match=f"trained 0 steps .*{setting.lstrip('+').removeprefix('trainer.')}"):
        train(make_config("experiment=canny_coft", "trainer.max_steps=-1", setting))
    assert not (tmp_path / "adapter").exists()


def test_divergence_names_a_checkpoint_that_trains_on(make_config, tmp_path):
    """At lr 1e8 the weights after step k are finite but give a NaN loss at step k: the
    checkpoint saved at step k holds them. The named one must train on without NaN."""
    diverging = ["experiment=canny_coft", "module.optimizer.lr=1e8", "callbacks.model_checkpoint.every_n_train_steps=1", "trainer.max_steps=8"]
    with pytest.raises(NonFiniteLossError, match=r"at step (\d+)") as raised:
        train(make_config(*diverging))
    failing_step = int(re.search(r"at step (\d+)", str(raised.value)).group(1))
    named = re.search(r"Last good checkpoint: (\S+?\.ckpt)", str(raised.value))
    assert named, raised.value
    path = Path(named.group(1))
    step = torch.load(path, weights_only=True)["global_step"]
    assert step < failing_step and f"(step {step})" in str(raised.value)
    # One more step from the named checkpoint computes the loss of its weights: finite.
    train(make_config(*diverging, f"ckpt_path={path}", f"trainer.max_steps={step + 1}", output_dir=tmp_path / "resumed"))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(make_config, tmp_path, monkeypatch):
    real_loss = ControlModule.diffusion_loss

    def loss_that_explodes_at_step_3(self, batch, generator):
        loss = real_loss(self, batch, generator)
        return loss * float("nan") if self.training and self.global_step == 3 else loss

    monkeypatch.setattr(ControlModule, "diffusion_loss", loss_that_explodes_at_step_3)
    cfg = make_config("experiment=canny_coft", "callbacks.model_checkpoint.every_n_train_steps=2", "trainer.max_steps=6")
    with pytest.raises(NonFiniteLossError, match="step 3.*step_000002.ckpt"):
        train(cfg)
    kept = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert kept["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in kept["state_dict"].values())


def test_a_two_image_folder_trains_and_validates(tiny_base, tmp_path):
    """2 images at val_fraction=0.9 both hash into validation: the run used to take 0 steps,
    exit 0 and export the untrained adapter. Now one trains, one validates."""
    import cv2
    import numpy as np
    from support.training_runs import FAST, compose_config

    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        image = np.zeros((32, 32, 3), np.uint8)
        cv2.circle(image, (16, 16), 6 + 4 * i, (255, 255, 255), -1)
        cv2.imwrite(str(data / f"{i}.png"), image)
        (data / f"{i}.txt").write_text(f"circle {i}")
    fast = [o for o in FAST if not o.startswith("data.num_")]
    overrides = [f"model.path={tiny_base}", *fast, "experiment=canny_coft", "data=folder", f"data.root={data}",
                 "data.val_fraction=0.9", "data.num_workers=0", "data.batch_size=1"]
    metrics = train(compose_config("train", overrides, tmp_path / "run"))
    assert "val/loss" in metrics
    assert sorted(losses(tmp_path / "run")) == [0, 1]  # max_steps=2 taken on the one training image
    assert load_adapter(tmp_path / "run" / "adapter").method.name == "coft"
