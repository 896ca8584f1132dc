"""Data parallel on CPU with spawned processes (gloo): training in one Hydra job, validation
metrics shared out over the ranks; and what spawning needs."""

from __future__ import annotations

import pickle
from pathlib import Path

import lightning as L
import pytest
import torch
from support.data_sets import write_photo_folder
from support.training_runs import FAST, run_command
from hydra.utils import instantiate
from support.wandb_files import wandb_records

from conftrl.diffusion import load_base
from conftrl.diffusion.conditioning import Conditioning
from conftrl.metrics import layer_energies
from conftrl.training.adapter import load_adapter
from conftrl.training.callbacks import EnergyMonitor
from conftrl.training.loggers import logged_metrics
from conftrl.training.module import ControlModule


@pytest.mark.slow
def test_two_process_ddp_keeps_the_replicas_identical(tiny_base, tmp_path):
    run_dir, probes = tmp_path / "run", tmp_path / "replicas"
    overrides = [o for o in FAST if not o.startswith(("logger=", "trainer.max_steps", "trainer.val_check"))]
    run_command(
        "conftrl.train", "experiment=canny_coft", "trainer=ddp_spawn", "trainer.accelerator=cpu", "trainer.devices=2",
        f"model.path={tiny_base}", *overrides, "trainer.max_steps=3", "trainer.val_check_interval=3",
        "data.num_train=8", "logger=wandb", f"hydra.run.dir={run_dir}",
        "+callbacks.replicas._target_=replicas.SaveTrainableState", f"+callbacks.replicas.directory={probes}",
        cwd=tmp_path, PYTHONPATH=str(Path(__file__).parent),
    )
    ranks = [torch.load(probes / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["step"] for r in ranks] == [3, 3]
    first, second = (r["state"] for r in ranks)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert first["control.encoder.out.weight"].abs().sum() > 0  # it trained (the zero conv moved)

    encoder = load_adapter(run_dir / "adapter").control.encoder.state_dict()
    assert all(torch.equal(encoder[k], first[f"control.encoder.{k}"]) for k in encoder)  # exported = rank 0

    assert sorted(p.name for p in tmp_path.iterdir()) == ["replicas", "run"]  # one output dir
    runs = wandb_records(run_dir)
    assert len(runs) == 1  # one W&B run, which the workers logged into
    (records,) = runs.values()
    assert any(r.WhichOneof("record_type") == "history" for r in records)


@pytest.mark.slow
def test_spawned_ranks_without_a_validation_split_train_and_export(tiny_base, tmp_path):
    """`data.val_fraction=0` asks for no validation. Under ddp_spawn the final validation runs
    in new processes whose datamodule never set up fit: it must find no validation there
    either, and the run end with its adapter."""
    photos, run_dir = write_photo_folder(tmp_path / "photos"), tmp_path / "run"
    overrides = [o for o in FAST if not o.startswith(("data.num_", "trainer.val_check", "logger="))]
    run_command(
        "conftrl.train", "experiment=canny_coft", "trainer=ddp_spawn", "trainer.accelerator=cpu", "trainer.devices=2",
        f"model.path={tiny_base}", *overrides, "data=folder", f"data.root={photos}", "data.val_fraction=0",
        "data.num_workers=0", "data.batch_size=1", "logger=csv", f"hydra.run.dir={run_dir}", cwd=tmp_path,
    )
    rows = logged_metrics(run_dir)
    assert sorted(row["step"] for row in rows if "train/loss" in row) == [0, 1]
    assert not any(key.startswith("val/") for row in rows for key in row)  # nothing was validated
    assert load_adapter(run_dir / "adapter").control.encoder.out.weight.abs().sum() > 0  # trained, exported


@pytest.mark.parametrize("method", ["coft", "lora", "full", "controlnet"])
def test_every_method_pickles_for_spawned_workers(make_config, tiny_base, method):
    module = ControlModule(load_base(tiny_base), instantiate(make_config(f"method={method}").method))
    for parameter in module.control.parameters():
        torch.nn.init.normal_(parameter, std=0.05)  # so that control visibly changes the output
    clone = pickle.loads(pickle.dumps(module))
    noisy, t, text, control = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 16, 32), torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        expected = module.control.predict(module.unet, noisy, t, Conditioning(text), control)
        torch.testing.assert_close(clone.control.predict(clone.unet, noisy, t, Conditioning(text), control), expected)


class SeedRecordingModule(ControlModule):
    """Appends the seeds each rank samples to `seeds_rank<global rank>.txt` in `probe_dir`."""

    probe_dir: Path

    def sample(self, prompts, control, seeds, **sampling):
        with open(self.probe_dir / f"seeds_rank{self.global_rank}.txt", "a") as file:
            file.write(" ".join(map(str, seeds)) + "\n")
        return super().sample(prompts, control, seeds, **sampling)


@pytest.mark.slow
def test_validation_metrics_over_two_ranks_equal_one_process(make_config, tiny_base, tmp_path):
    """Each of 2 ranks samples and scores half of the fidelity images and measures half of the
    layers' energies; the pooled numbers are those of one process doing all of it."""
    cfg = make_config("experiment=canny_coft", "method.init_weights=false",
                      "callbacks.control_fidelity.num_images=4", "callbacks.control_fidelity.batch_size=2")  # fmt: skip
    module = SeedRecordingModule(load_base(tiny_base), instantiate(cfg.method))
    torch.manual_seed(0)
    for parameter in module.control.parameters():
        torch.nn.init.normal_(parameter, std=0.05)  # so that the control shapes the samples
    reference = {name: 1.1 * energy for name, energy in layer_energies(module.unet).items()}

    def validate(devices: int) -> dict[str, float]:
        module.probe_dir = tmp_path / f"devices{devices}"
        module.probe_dir.mkdir()
        energy = EnergyMonitor()
        energy.reference = reference
        trainer = L.Trainer(
            accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto", logger=False,
            callbacks=[instantiate(cfg.callbacks.control_fidelity), energy], limit_val_batches=1,
            enable_progress_bar=False, enable_model_summary=False,
        )
        trainer.validate(module, datamodule=instantiate(cfg.data))
        return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/edge", "he/"))}

    alone, shared = validate(1), validate(2)
    seeds = {str(p.relative_to(tmp_path)): p.read_text().split() for p in tmp_path.glob("devices*/seeds_rank*.txt")}
    assert seeds == {  # one process samples all 4 images; each of 2 ranks its half
        "devices1/seeds_rank0.txt": ["0", "1", "2", "3"],
        "devices2/seeds_rank0.txt": ["0", "1"],
        "devices2/seeds_rank1.txt": ["2", "3"],
    }
    assert {"val/edge_f1", "he/total", "he/rel_change_total"} <= alone.keys() and alone.keys() == shared.keys()
    assert shared == pytest.approx(alone, rel=1e-6, abs=1e-9)
    assert alone["he/rel_change_total"] == pytest.approx(1 / 1.1 - 1)  # against the reference given
