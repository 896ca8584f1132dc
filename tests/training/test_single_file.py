"""A base from one safetensors file in the original (CompVis) layout, read offline with a
diffusers config folder: the same model as the diffusers folder it was written from."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config
from support.original_layout import save_original_checkpoint

from conftrl.cli.train import train
from conftrl.config import ASSETS
from conftrl.config.schema import ConfigError
from conftrl.diffusion import ModelFolderError, load_base, load_unet
from conftrl.training.adapter import load_adapter

# Published sizes of SD 1.5 and SD 2.1 (UNet, VAE, text encoder): the shipped configs build them.
PUBLISHED_PARAMETERS = {"sd15": (859_520_964, 83_653_863, 123_060_480), "sd21": (865_910_724, 83_653_863, 340_387_840)}


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
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = ASSETS / "configs" / name
    with torch.device("meta"):
        models = (
            UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
            AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
            CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
        )
    assert tuple(sum(p.numel() for p in model.parameters()) for model in models) == PUBLISHED_PARAMETERS[name]


def test_a_truncated_single_file_names_the_file_and_its_configs(single_file, tiny_base, tmp_path):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(single_file.read_bytes()[:1000])
    with pytest.raises(ModelFolderError, match=f"cannot load '{truncated}' with the configs of '{tiny_base}'"):
        load_base(truncated, config=tiny_base)
