"""SDXL bases: a tiny SDXL-architecture folder (two CLIP text encoders, `text_time` size
conditioning, three down blocks) loads, conditions, trains and samples like an SD base."""

from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest
import torch
from support.training_runs import FAST, compose_config
from diffusers.models.attention import BasicTransformerBlock

from conftrl.cli.evaluate import evaluate
from conftrl.cli.generate import generate
from conftrl.cli.train import train
from conftrl.config.schema import ConfigError, check_method_fits
from conftrl.control import build_control_path
from conftrl.diffusion import DiffusionBase, ModelFolderError, SDXLBase, load_base
from conftrl.diffusion.conditioning import SizeConditions
from conftrl.diffusion.sdxl import SDXL_VAE_SCALING, SizeConditioningError
from conftrl.evaluation.demo import Demo
from conftrl.oft.layer import OFTLayer
from conftrl.training.adapter import load_adapter
from conftrl.training.methods import LoRAMethod, OFTMethod
from conftrl.training.module import ControlModule
from datamodules.dataset import ControlDataset, SampleBuilder, collate
from datamodules.transforms import PairedTransform

PROMPTS = ["a red circle", "two blue squares on a gray background"]


@pytest.fixture(scope="module")
def base(tiny_sdxl) -> SDXLBase:
    return load_base(tiny_sdxl)


def sizes_for(batch_size: int, resolution: int = 32) -> SizeConditions:
    return SizeConditions(
        torch.tensor([[40, 60], [32, 90]])[:batch_size], torch.tensor([[0, 5], [0, 29]])[:batch_size],
        (resolution, resolution),
    )


def test_an_sdxl_folder_loads_with_both_text_encoders_frozen(tiny_sdxl, tiny_base, base):
    assert isinstance(base, SDXLBase) and set(base.text_encoders) == {"text_encoder", "text_encoder_2"}
    assert not any(p.requires_grad for m in base.text_encoders.values() for p in m.parameters())
    assert base.vae.config.scaling_factor == SDXL_VAE_SCALING
    # The folder ships SDXL's Euler scheduler; training reads its noise schedule as DDPM's.
    assert base.noise_scheduler.config.beta_schedule == "scaled_linear"
    assert base.noise_scheduler.config.prediction_type == "epsilon"
    assert type(load_base(tiny_base)) is DiffusionBase  # an SD folder is no SDXL one


def test_an_sdxl_folder_without_its_second_encoder_is_named(tiny_sdxl, tmp_path):
    broken = shutil.copytree(tiny_sdxl, tmp_path / "sdxl")
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(ModelFolderError, match="missing: text_encoder_2/config.json"):
        load_base(broken)


def test_conditioning_is_both_encoders_penultimate_states_and_the_pooled_projection(base):
    conditioning = base.condition(PROMPTS, sizes_for(2))
    hidden = []
    for tokenizer, encoder in ((base.tokenizer, base.text_encoder), (base.tokenizer_2, base.text_encoder_2)):
        ids = tokenizer(PROMPTS, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        output = encoder(ids, output_hidden_states=True)
        hidden.append(output.hidden_states[-2])
    torch.testing.assert_close(conditioning.text, torch.cat(hidden, dim=-1))
    torch.testing.assert_close(conditioning.added["text_embeds"], output.text_embeds)
    expected = [[40, 60, 0, 5, 32, 32], [32, 90, 0, 29, 32, 32]]
    assert conditioning.added["time_ids"].tolist() == expected


def test_a_batch_without_sizes_is_refused_by_name(base):
    with pytest.raises(SizeConditioningError, match="original_size.*crop_top_left"):
        base.condition(PROMPTS)


def coordinate_image(height: int, width: int) -> np.ndarray:
    """Each pixel shows where it is: red = x, green = y (sides under 256)."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8)


def test_the_size_conditioning_is_what_the_crop_did(tiny_sdxl):
    """From the datamodule's samples to the UNet: the time ids of each image are its size
    before the crop and where the crop took it from, read here off the pixels themselves."""
    shapes = [(32, 90), (70, 32), (32, 45), (50, 32)]  # shorter side 32: cropped, not resized
    source = [{"image": coordinate_image(*shape), "caption": "a red circle", "key": str(i)} for i, shape in enumerate(shapes)]
    annotator = type("Identity", (), {"prepare": staticmethod(lambda s: s), "__call__": lambda self, image, *a: image})()
    dataset = ControlDataset(source, SampleBuilder(annotator, PairedTransform(32, "random", flip_probability=0.5), seed=3, train=True))
    items = [dataset[(i, 0)] for i in range(len(shapes))]
    batch = collate(items)

    expected, flips = [], set()
    for (height, width), item in zip(shapes, items):
        pixels = ((item["image"] + 1) * 127.5).round().to(torch.uint8)
        xs, top = pixels[0, 0], int(pixels[1, 0, 0])
        flipped = bool(xs[0] > xs[-1])
        flips.add(flipped)
        left = width - 32 - int(xs.min()) if flipped else int(xs.min())
        expected.append([height, width, top, left, 32, 32])
    assert len({tuple(row) for row in expected}) == len(shapes) and flips == {True, False}  # all kinds of crop

    base, seen = load_base(tiny_sdxl), []
    handle = base.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["added_cond_kwargs"]["time_ids"].clone()), with_kwargs=True
    )
    module = ControlModule(base, OFTMethod(r=4), seed=0)
    try:
        module.diffusion_loss(batch, torch.Generator().manual_seed(0))
    finally:
        handle.remove()
        module.control.remove_hooks()
    assert seen[0].tolist() == expected


@pytest.mark.parametrize("kind", ["conv_in", "multiscale", "controlnet"])
def test_oft_at_init_leaves_the_sdxl_unet_unchanged(tiny_sdxl, kind):
    plain, adapted = load_base(tiny_sdxl), load_base(tiny_sdxl)
    module = ControlModule(adapted, OFTMethod(r=4, coft=True, control_path=kind))
    generator = torch.Generator().manual_seed(0)
    noisy, t = torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([10, 700])
    control = torch.rand(2, 3, 32, 32, generator=generator)
    conditioning = plain.condition(PROMPTS, sizes_for(2))
    expected = plain.unet(noisy, t, **conditioning.unet_kwargs()).sample
    actual = module.control.predict(module.unet, noisy, t, adapted.condition(PROMPTS, sizes_for(2)), control)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert module.num_trainable_parameters > 0


def test_the_papers_targets_are_every_sdxl_transformer_blocks_attention_and_geglu(tiny_sdxl):
    base = load_base(tiny_sdxl)
    OFTMethod(r=4).adapt(base)
    blocks = [m for m in base.unet.modules() if isinstance(m, BasicTransformerBlock)]
    # Stacked as SDXL stacks them: 1 and 2 per attention of the down blocks, 2 in the middle, up blocks mirrored.
    assert len(blocks) == 11
    for block in blocks:
        layers = [block.attn1.to_q, block.attn1.to_k, block.attn1.to_v, block.attn1.to_out[0],
                  block.attn2.to_q, block.attn2.to_k, block.attn2.to_v, block.attn2.to_out[0], block.ff.net[0].proj]
        assert all(isinstance(layer, OFTLayer) for layer in layers)
    assert sum(isinstance(m, OFTLayer) for m in base.unet.modules()) == 9 * len(blocks)


def test_the_control_encoder_fits_sdxls_three_down_blocks(base):
    """One feature map per place it is added (conv_in and each down block), each of that
    output's shape: SDXL's last down block keeps its resolution."""
    outputs = []
    targets = [base.unet.conv_in, *base.unet.down_blocks]
    hooks = [t.register_forward_hook(lambda m, a, out: outputs.append(out if torch.is_tensor(out) else out[0])) for t in targets]
    base.unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), **base.condition(PROMPTS[:1], sizes_for(1)).unet_kwargs())
    for hook in hooks:
        hook.remove()
    path = build_control_path("multiscale", base.unet, base.vae_scale_factor)
    features = path.encoder(torch.rand(1, 3, 32, 32))
    assert len(base.unet.down_blocks) == 3 and base.unet.down_blocks[-1].downsamplers is None
    assert [f.shape for f in features] == [o.shape for o in outputs]
    controlnet = build_control_path("controlnet", base.unet, base.vae_scale_factor).controlnet
    assert controlnet.config.addition_embed_type == "text_time"


def test_text_encoder_adaptation_reaches_both_encoders(tiny_sdxl):
    base = load_base(tiny_sdxl)
    adapted = OFTMethod(r=4, text_encoder=True).adapt(base)
    assert set(adapted) == {"unet", "text_encoder", "text_encoder_2"}
    assert any(p.requires_grad for p in base.text_encoder_2.parameters())
    check_method_fits(LoRAMethod(text_encoder=True), str(tiny_sdxl))
    with pytest.raises(ConfigError, match="method"):
        check_method_fits(OFTMethod(r=5, text_encoder=True), str(tiny_sdxl))


@pytest.fixture(scope="module")
def trained(tiny_sdxl, tmp_path_factory):
    """experiment -> (its output dir, final metrics) of a 2-step run on the tiny SDXL base."""
    runs = {}

    def run(experiment: str):
        if experiment not in runs:
            output_dir = tmp_path_factory.mktemp(experiment)
            cfg = compose_config("train", ["model=sdxl", f"model.path={tiny_sdxl}", *FAST, f"experiment={experiment}",
                                           "model.gradient_checkpointing=false"], output_dir)
            runs[experiment] = output_dir, train(cfg)
        return runs[experiment]

    return run


@pytest.mark.parametrize("experiment", ["canny_oft", "canny_coft", "canny_lora", "canny_controlnet"])
def test_every_method_trains_on_sdxl(trained, experiment):
    output_dir, metrics = trained(experiment)
    assert np.isfinite(metrics["val/loss"]) and 0 <= metrics["val/edge_f1"] <= 1
    assert "he/rel_change_total" in metrics
    assert list((output_dir / "samples").glob("step_*.png"))
    adapter = load_adapter(output_dir / "adapter")
    assert isinstance(adapter.base, SDXLBase)
    images = adapter.sample(["a red circle"], torch.rand(1, 3, 32, 32), [0], steps=2)
    assert images.shape == (1, 32, 32, 3) and images.std() > 0
    # Two steps moved the prediction away from the base's (every method starts as a no-op).
    plain, generator = load_base(adapter.base.path), torch.Generator().manual_seed(0)
    noisy, t, control = torch.randn(1, 4, 8, 8, generator=generator), torch.tensor([500]), torch.ones(1, 3, 32, 32)
    with torch.no_grad():
        expected = plain.unet(noisy, t, **plain.condition(PROMPTS[:1], sizes_for(1)).unet_kwargs()).sample
        actual = adapter.control.predict(adapter.base.unet, noisy, t, adapter.base.condition(PROMPTS[:1], sizes_for(1)), control)
    assert (actual - expected).abs().max() > 0


def test_generate_evaluate_and_demo_on_sdxl(trained, tmp_path):
    output_dir, _ = trained("canny_coft")
    adapter = output_dir / "adapter"
    edges = np.zeros((32, 32, 3), np.uint8)
    edges[8:24, 8] = edges[8:24, 24] = 255
    control = tmp_path / "edges.png"
    cv2.imwrite(str(control), edges)
    paths = generate(compose_config("cli/generate", [f"adapter={adapter}", "prompt=a red circle", f"control={control}",
                                                     "seeds=[0]", "steps=2"], tmp_path / "generate"))
    assert cv2.imread(str(paths[0])).shape == (32, 32, 3)
    report = evaluate(compose_config("cli/evaluate", [f"adapter={adapter}", "split=test", "num_images=2", "batch_size=2",
                                                      "grid_rows=1", "grid_seeds=[0]", "steps=2"], tmp_path / "evaluate"))
    assert "hyperspherical_energy" in report
    shown, images = Demo(load_adapter(adapter)).generate(str(control), None, "a red circle", 0, 2, 4.0, 1.0, 2, "auto")
    assert shown.shape == (32, 32, 3) and len(images) == 2 and not np.array_equal(images[0], images[1])
