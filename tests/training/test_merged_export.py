"""`conftrl.export`: an adapter merged into its base as a complete diffusers folder that stock
diffusers pipelines load, and that conftrl loads back to the adapter's own samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.training_runs import run_command
from diffusers import (
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
)

from conftrl.cli.train import train
from conftrl.diffusion import SDXLBase, load_unet
from conftrl.diffusion.conditioning import SizeConditions
from conftrl.training.adapter import AdapterError, load_adapter
from conftrl.training.merged import export_merged

PROMPTS = ["a red circle on a gray background", "a blue square"]
QUICK = ["trainer.max_steps=1", "data.num_train=2", "callbacks.control_fidelity.num_images=1"]


def _control(resolution: int = 32) -> torch.Tensor:
    control = torch.zeros(len(PROMPTS), 3, resolution, resolution)
    control[:, :, 8:24, 8] = control[:, :, 8, 8:24] = 1.0
    return control


def _same_samples(adapter_dir, merged_dir) -> None:
    """The merged export, loaded by conftrl, samples what the adapter on its base samples (up to
    one uint8 level where the merged weights' rounding tips a pixel)."""
    expected = load_adapter(adapter_dir).sample(PROMPTS, _control(), [0, 1], steps=2)
    merged = load_adapter(merged_dir)
    assert merged.base.path == merged_dir
    difference = np.abs(merged.sample(PROMPTS, _control(), [0, 1], steps=2).astype(int) - expected)
    assert difference.max() <= 1 and difference.mean() < 0.05


def _stock_text_to_image(merged_dir, pipeline=StableDiffusionPipeline) -> np.ndarray:
    pipe = pipeline.from_pretrained(merged_dir, local_files_only=True)
    return pipe(PROMPTS[0], num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images  # fmt: skip


def test_a_coft_adapter_merged_loads_in_stock_diffusers_and_back_in_conftrl(trained_run, tmp_path):
    adapter_dir, merged_dir = trained_run / "adapter", tmp_path / "merged"
    export_merged(load_adapter(adapter_dir), merged_dir)
    images = _stock_text_to_image(merged_dir)
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    # The stock UNet is the adapted one: the rotations are in its weights.
    adapted, stock = load_adapter(adapter_dir).base.unet, StableDiffusionPipeline.from_pretrained(merged_dir).unet
    latents, text = torch.randn(1, stock.config.in_channels, 4, 4), torch.randn(1, 3, stock.config.cross_attention_dim)
    plain = load_unet(load_adapter(adapter_dir).config.model.path)
    with torch.no_grad():
        expected = adapted(latents, 5, text).sample
        torch.testing.assert_close(stock(latents, 5, text).sample, expected, rtol=1e-4, atol=1e-5)
        assert (plain(latents, 5, text).sample - expected).abs().max() > 1e-3  # the rotations moved it
    _same_samples(adapter_dir, merged_dir)


@pytest.mark.parametrize("experiment", ["canny_lora", "canny_full", "canny_controlnet"])
def test_other_methods_merge_too(make_config, tmp_path, experiment):
    train(make_config(f"experiment={experiment}", *QUICK))
    merged_dir = tmp_path / "merged"
    export_merged(load_adapter(tmp_path / "adapter"), merged_dir)
    assert np.isfinite(_stock_text_to_image(merged_dir)).all()
    _same_samples(tmp_path / "adapter", merged_dir)
    if experiment == "canny_controlnet":
        pipe = StableDiffusionControlNetPipeline.from_pretrained(merged_dir, local_files_only=True)
        images = pipe(PROMPTS[0], image=_control()[:1], num_inference_steps=2, height=32, width=32, output_type="np")
        assert images.images.shape == (1, 32, 32, 3)


@pytest.mark.parametrize("experiment", ["canny_coft", "canny_lora", "canny_controlnet"])
def test_an_sdxl_adapter_merges_into_a_complete_sdxl_folder(tiny_sdxl, make_config, tmp_path, experiment):
    sdxl = ["model=sdxl", f"model.path={tiny_sdxl}", "model.gradient_checkpointing=false"]
    train(make_config(f"experiment={experiment}", *sdxl, *QUICK))
    adapter_dir, merged_dir = tmp_path / "adapter", tmp_path / "merged"
    export_merged(load_adapter(adapter_dir), merged_dir)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (merged_dir / part).is_dir(), part
    images = _stock_text_to_image(merged_dir, StableDiffusionXLPipeline)
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    # The stock SDXL UNet, given SDXL's added conditioning, is the adapted one.
    adapter, stock = load_adapter(adapter_dir), StableDiffusionXLPipeline.from_pretrained(merged_dir).unet
    conditioning = adapter.base.condition(PROMPTS[:1], SizeConditions(torch.tensor([[32, 48]]), torch.tensor([[0, 8]]), (32, 32)))
    latents = torch.randn(1, stock.config.in_channels, 8, 8)
    with torch.no_grad():
        expected = adapter.base.unet(latents, 5, **conditioning.unet_kwargs()).sample
        torch.testing.assert_close(stock(latents, 5, **conditioning.unet_kwargs()).sample, expected, rtol=1e-4, atol=1e-5)
        plain = load_unet(tiny_sdxl)(latents, 5, **conditioning.unet_kwargs()).sample
    # What was trained is in the UNet's weights; the ControlNet baseline leaves the UNet as it was.
    assert ((plain - expected).abs().max() > 0) == (experiment != "canny_controlnet")
    assert isinstance(load_adapter(merged_dir).base, SDXLBase)
    _same_samples(adapter_dir, merged_dir)
    if experiment == "canny_controlnet":
        pipe = StableDiffusionXLControlNetPipeline.from_pretrained(merged_dir, local_files_only=True)
        images = pipe(PROMPTS[0], image=_control()[:1], num_inference_steps=2, height=32, width=32, output_type="np")
        assert images.images.shape == (1, 32, 32, 3) and np.isfinite(images.images).all()


def test_export_replaces_an_export_and_refuses_any_other_folder(trained_run, tmp_path):
    merged_dir, precious = tmp_path / "merged", tmp_path / "precious"
    export_merged(load_adapter(trained_run / "adapter"), merged_dir)
    (merged_dir / "stale.txt").write_text("from before")
    export_merged(load_adapter(trained_run / "adapter"), merged_dir)
    assert not (merged_dir / "stale.txt").exists() and (merged_dir / "model_index.json").is_file()
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    with pytest.raises(AdapterError, match="merged .*precious.* is not a merged export"):
        export_merged(load_adapter(trained_run / "adapter"), precious)
    assert [p.name for p in precious.iterdir()] == ["notes.txt"]


def test_the_command_writes_the_folder_and_reports_a_refusal_in_one_line(trained_run, tmp_path):
    adapter = f"adapter={trained_run / 'adapter'}"
    run_command("conftrl.export", adapter, f"merged={tmp_path / 'merged'}", cwd=tmp_path)
    assert (tmp_path / "merged" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.txt").write_text("")
    with pytest.raises(AssertionError, match="conftrl.export: merged .*other.* is not a merged export"):
        run_command("conftrl.export", adapter, f"merged={tmp_path / 'other'}", cwd=tmp_path)


def test_evaluating_a_merged_export_measures_the_energy_against_the_base_it_was_merged_into(trained_run, tmp_path):
    from support.training_runs import compose_config

    from conftrl.cli.evaluate import evaluate

    export_merged(load_adapter(trained_run / "adapter"), tmp_path / "merged")
    quick = ["num_images=2", "batch_size=2", "grid_rows=1", "grid_seeds=[0]", "steps=2"]
    reports = [
        evaluate(compose_config("cli/evaluate", [f"adapter={adapter}", *quick], tmp_path / adapter.name))
        for adapter in (trained_run / "adapter", tmp_path / "merged")
    ]
    energies = [report["hyperspherical_energy"]["rel_change_max_abs"] for report in reports]
    # Against itself the merged UNet would show no change at all.
    assert energies[0] > 0 and energies[1] == pytest.approx(energies[0], rel=1e-3, abs=0)
    assert reports[1]["fidelity"].keys() == reports[0]["fidelity"].keys()
