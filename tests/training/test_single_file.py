"""A base from one safetensors file in the original layout (CompVis's; SDXL's own for SDXL), read
offline with a diffusers config folder: the same model as the diffusers folder it was written from."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch
from support.training_runs import TEST_SDXL_SPEC, compose_config
from support.original_layout import save_original_checkpoint

from conftrl.cli.train import train
from conftrl.config import ASSETS
from conftrl.config.schema import ConfigError
from conftrl.diffusion import ModelFolderError, SDXLBase, load_base, load_unet
from conftrl.diffusion.conditioning import SizeConditions
from conftrl.diffusion.tiny import save_tiny_pipeline
from conftrl.training.adapter import load_adapter

# Published sizes of SD 1.5, SD 2.1 and SDXL base per component: the shipped configs build them.
PUBLISHED_PARAMETERS = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd21": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
}


@pytest.fixture(scope="module")
def single_file(tiny_base, tmp_path_factory):
    return save_original_checkpoint(tiny_base, tmp_path_factory.mktemp("single") / "tiny.safetensors")


def test_a_single_file_loads_as_the_folder_it_was_written_from(tiny_base, single_file):
    folder, file = load_base(tiny_base), load_base(single_file, config=tiny_base)
    assert file.path == single_file and file.config == tiny_base
    torch.manual_seed(0)
    latents = torch.randn(2, folder.unet.config.in_channels, 8, 8)
    text = torch.randn(2, 5, folder.unet.config.cross_attention_dim)
    with torch.no_grad():
        expected = folder.unet(latents, 10, encoder_hidden_states=text).sample
        torch.testing.assert_close(file.unet(latents, 10, encoder_hidden_states=text).sample, expected, rtol=0, atol=0)
        images = torch.rand(1, 3, 32, 32) * 2 - 1
        torch.testing.assert_close(file.vae.decode(file.vae.encode(images).latent_dist.mode()).sample,
                                   folder.vae.decode(folder.vae.encode(images).latent_dist.mode()).sample)  # fmt: skip
        ids = folder.tokenizer(["a red circle"], return_tensors="pt").input_ids
        torch.testing.assert_close(file.text_encoder(ids)[0], folder.text_encoder(ids)[0])
    assert file.noise_scheduler.config == folder.noise_scheduler.config
    torch.testing.assert_close(load_unet(single_file, tiny_base).state_dict(), folder.unet.state_dict())


def test_training_and_loading_an_adapter_on_a_single_file(tiny_base, single_file, make_config, tmp_path):
    train(make_config("experiment=canny_coft", f"model.path={single_file}", f"model.config={tiny_base}"))
    adapter = load_adapter(tmp_path / "adapter")
    assert adapter.base.path == single_file and adapter.base.config == tiny_base


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.path={ckpt}"], "must be .safetensors.*pickle"),
        (["model=sd15", "model.path={file}"], "model.tokenizer.*no tokenizer vocabulary"),
        (["model.path={file}", "model.config={empty}"], "model.config:.*missing: model_index.json"),
    ],
)
def test_a_single_file_that_cannot_load_is_a_config_mistake(single_file, tmp_path, overrides, message):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(single_file.read_bytes())
    paths = {"ckpt": ckpt, "file": single_file, "empty": tmp_path}
    overrides = [override.format(**paths) for override in overrides]
    with pytest.raises(ConfigError, match=message):
        train(compose_config("train", ["experiment=canny_coft", *overrides], tmp_path / "run"))


def test_loading_a_single_file_without_a_vocabulary_names_the_key(single_file):
    with pytest.raises(ModelFolderError, match="model.tokenizer"):
        load_base(single_file, config=ASSETS / "configs" / "sd15")


@pytest.mark.parametrize("name", PUBLISHED_PARAMETERS)
def test_the_shipped_configs_build_the_published_models(name):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    builders = {
        "unet": lambda folder: UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder)),
        "vae": lambda folder: AutoencoderKL.from_config(AutoencoderKL.load_config(folder)),
        "text_encoder": lambda folder: CLIPTextModel(CLIPTextConfig.from_pretrained(folder)),
        "text_encoder_2": lambda folder: CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder)),
    }
    configs = ASSETS / "configs" / name
    with torch.device("meta"):
        built = {part: builders[part](configs / part) for part in PUBLISHED_PARAMETERS[name]}
    assert {part: sum(p.numel() for p in model.parameters()) for part, model in built.items()} == PUBLISHED_PARAMETERS[name]


def test_a_truncated_single_file_names_the_file_and_its_configs(single_file, tiny_base, tmp_path):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(single_file.read_bytes()[:1000])
    with pytest.raises(ModelFolderError, match=f"cannot load '{truncated}' with the configs of '{tiny_base}'"):
        load_base(truncated, config=tiny_base)


@pytest.fixture(scope="module")
def sdxl_file(tiny_sdxl, tmp_path_factory):
    return save_original_checkpoint(tiny_sdxl, tmp_path_factory.mktemp("single-sdxl") / "tiny-sdxl.safetensors")


@pytest.fixture(scope="module")
def sdxl_tokenizers(tiny_sdxl, tmp_path_factory):
    """What `model.tokenizer` names for SDXL: a folder holding tokenizer/ and tokenizer_2/."""
    folder = tmp_path_factory.mktemp("sdxl-tokenizers")
    for name in ("tokenizer", "tokenizer_2"):
        shutil.copytree(tiny_sdxl / name, folder / name)
    return folder


def test_an_sdxl_single_file_loads_as_the_folder_it_was_written_from(tiny_sdxl, sdxl_file, sdxl_tokenizers):
    folder, file = load_base(tiny_sdxl), load_base(sdxl_file, config=tiny_sdxl, tokenizer=sdxl_tokenizers)
    assert isinstance(file, SDXLBase) and file.path == sdxl_file and file.config == tiny_sdxl
    assert file.text_encoder.config.hidden_size != file.text_encoder_2.config.hidden_size  # told apart by width
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        torch.testing.assert_close(getattr(file, part).state_dict(), getattr(folder, part).state_dict(), rtol=0, atol=0)
    assert file.vae.config.scaling_factor == folder.vae.config.scaling_factor
    assert file.noise_scheduler.config == folder.noise_scheduler.config
    assert file.force_zeros_for_empty_prompt == folder.force_zeros_for_empty_prompt
    sizes = SizeConditions(torch.tensor([[40, 60], [32, 90]]), torch.tensor([[0, 5], [0, 29]]), (32, 32))
    prompts = ["a red circle", "two blue squares"]
    torch.manual_seed(0)
    latents = torch.randn(2, folder.unet.config.in_channels, 8, 8)
    with torch.no_grad():
        expected, conditioning = folder.condition(prompts, sizes), file.condition(prompts, sizes)
        torch.testing.assert_close(conditioning.text, expected.text, rtol=0, atol=0)
        torch.testing.assert_close(conditioning.added, expected.added, rtol=0, atol=0)
        torch.testing.assert_close(file.unet(latents, 10, **conditioning.unet_kwargs()).sample,
                                   folder.unet(latents, 10, **expected.unet_kwargs()).sample, rtol=0, atol=0)  # fmt: skip
    torch.testing.assert_close(load_unet(sdxl_file, tiny_sdxl).state_dict(), folder.unet.state_dict())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # The shipped configs hold no vocabulary: both tokenizers are asked for.
        (["model.path={file}"], "model.tokenizer \\(unset\\).*tokenizer'.*\n.*tokenizer_2'.*holds no tokenizer vocabulary"),
        # SD's habit of naming the tokenizer/ folder itself: SDXL's key names the folder above it.
        (["model.path={file}", "model.tokenizer={folder}/tokenizer"], "model.tokenizer: .*holds tokenizer/ and tokenizer_2/"),
    ],
)
def test_an_sdxl_single_file_without_both_tokenizers_is_a_config_mistake(sdxl_file, tiny_sdxl, tmp_path, overrides, message):
    overrides = [override.format(file=sdxl_file, folder=tiny_sdxl) for override in overrides]
    with pytest.raises(ConfigError, match=message):
        train(compose_config("train", ["experiment=canny_coft", "model=sdxl", *overrides], tmp_path / "run"))


def test_an_sd_file_read_with_sdxl_configs_names_the_file_and_its_configs(single_file, tiny_sdxl):
    with pytest.raises(ModelFolderError, match=f"cannot load '{single_file}' with the configs of '{tiny_sdxl}'"):
        load_base(single_file, config=tiny_sdxl)


def test_an_sdxl_file_whose_encoders_cannot_be_told_apart_is_refused(tmp_path):
    """diffusers places a file's encoders by width; one it cannot place must not load unfilled."""
    folder = save_tiny_pipeline(tmp_path / "same-widths", replace(TEST_SDXL_SPEC, text_hidden_2=None))
    file = save_original_checkpoint(folder, tmp_path / "same-widths.safetensors")
    with pytest.raises(ModelFolderError, match="no weights for text_encoder_2 .*differ in width"):
        load_base(file, config=folder)
