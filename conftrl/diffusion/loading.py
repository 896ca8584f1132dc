"""Load the frozen parts of a text-to-image model from a local diffusers folder, or from one
safetensors file in the original key layout (CompVis's; SDXL's own for SDXL) read with a
diffusers config folder."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

from conftrl.diffusion.base import DiffusionBase
from conftrl.diffusion.sdxl import EXTRA_REQUIRED_FILES, SDXLBase, empty_prompt_is_zeros, is_sdxl_folder

# What a Stable-Diffusion-style diffusers folder must hold: subfolder -> any one of these files.
REQUIRED_FILES = {
    ".": ("model_index.json",),
    "unet": ("config.json",),
    "vae": ("config.json",),
    "text_encoder": ("config.json",),
    "tokenizer": ("tokenizer.json", "vocab.json", "tokenizer_config.json"),
    "scheduler": ("scheduler_config.json",),
}
# A tokenizer's vocabulary: what a folder must hold besides its settings to tokenize.
TOKENIZER_VOCABULARY = ("tokenizer.json", "vocab.json")
# The tokenizer folders of a pipeline (SD has the first only): what a single file does not carry.
TOKENIZERS = ("tokenizer", "tokenizer_2")
# Single files are read only as safetensors: a .ckpt is a pickle, which can run code.
SINGLE_FILE_SUFFIX = ".safetensors"


class ModelFolderError(FileNotFoundError):
    """The model path is missing or is not a loadable diffusers text-to-image folder."""


def check_model_folder(path: str | Path, without: tuple[str, ...] = ()) -> Path:
    """Fail early, naming the path and every missing piece (but the subfolders `without`),
    before any loader runs."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelFolderError(f"model path {str(path)!r} does not exist (set model.path=...)")
    if not path.is_dir():
        raise ModelFolderError(f"model path {str(path)!r} is a file, not a diffusers folder")
    missing = _missing(path, REQUIRED_FILES, without)
    if not missing and is_sdxl_folder(path):
        missing = _missing(path, EXTRA_REQUIRED_FILES, without)
    if missing:
        raise ModelFolderError(
            f"{str(path)!r} is not a diffusers text-to-image folder; missing: {', '.join(missing)}"
        )
    return path


def _missing(path: Path, required: dict[str, tuple[str, ...]], without: tuple[str, ...]) -> list[str]:
    return [
        f"{sub}/{' or '.join(names)}" if sub != "." else names[0]
        for sub, names in required.items()
        if sub not in without and not any((path / sub / name).is_file() for name in names)
    ]


def single_file_problems(path: Path, config: str | Path | None) -> list[str]:
    """What keeps the single file `path` from loading with the config folder `config`, as
    `key=value: why` lines."""
    if path.suffix != SINGLE_FILE_SUFFIX:
        return [f"model.path={str(path)!r}: a single-file checkpoint must be {SINGLE_FILE_SUFFIX} "
                "(a .ckpt is a pickle, which is never loaded); convert it, or give a diffusers folder"]  # fmt: skip
    if config is None:
        return [f"model.config: a single-file checkpoint ({str(path)!r}) needs the diffusers config folder of its "
                "architecture (model=sd15, model=sd21 and model=sdxl set it)"]  # fmt: skip
    try:
        check_model_folder(config, without=TOKENIZERS)
    except ModelFolderError as error:
        return [f"model.config: {error}"]
    return []


def tokenizer_folders(config: str | Path, tokenizer: str | Path | None) -> dict[str, Path]:
    """Each tokenizer a single file is read with, by its pipeline name: SD's is the folder
    `tokenizer`; SDXL's two are the tokenizer/ and tokenizer_2/ inside it, since one key names
    both (their padding differs). Unset: those of the config folder."""
    config = Path(config).expanduser()
    if is_sdxl_folder(config):
        root = Path(tokenizer).expanduser() if tokenizer is not None else config
        return {name: root / name for name in TOKENIZERS}
    return {"tokenizer": Path(tokenizer).expanduser() if tokenizer is not None else config / "tokenizer"}


def tokenizer_problems(config: str | Path, tokenizer: str | Path | None) -> list[str]:
    """What keeps the tokenizer folders of `tokenizer` (None: the config folder's own) from
    tokenizing: a vocabulary, which a single-file checkpoint does not carry."""
    key = "model.tokenizer" if tokenizer is not None else "model.tokenizer (unset)"
    sdxl = is_sdxl_folder(Path(config).expanduser())
    expected = ("the folder of the model's diffusers copy, which holds tokenizer/ and tokenizer_2/" if sdxl else
                "the tokenizer/ folder of the model's diffusers copy, or of openai/clip-vit-large-patch14 for SD 1.x")  # fmt: skip
    return [
        f"{key}: {str(vocabulary)!r} holds no tokenizer vocabulary ({' or '.join(TOKENIZER_VOCABULARY)}); "
        f"a single-file checkpoint carries none, so set model.tokenizer=<folder> to {expected}"
        for vocabulary in tokenizer_folders(config, tokenizer).values()
        if not any((vocabulary / name).is_file() for name in TOKENIZER_VOCABULARY)
    ]


def config_folder(path: str | Path, config: str | Path | None = None) -> Path:
    """The folder that holds the model's component configs: `path` itself, or for a single
    file the config folder it is read with."""
    path = Path(path).expanduser()
    return path if path.is_dir() or config is None else Path(config).expanduser()


def _load(component: str, path: Path, loader):
    try:
        return loader(path, subfolder=component, local_files_only=True)
    except Exception as error:  # corrupt or incomplete weights: say which component failed
        raise ModelFolderError(f"cannot load {component!r} from {str(path)!r}: {error}") from error


def _check_single_file(path: Path, config: str | Path | None) -> Path:
    if problems := single_file_problems(path, config):
        raise ModelFolderError("\n".join(problems))
    return Path(config).expanduser()


def _load_single_file(path: Path, config: str | Path | None, tokenizer: str | Path | None) -> DiffusionBase:
    """The pipeline's modules from an original-layout file, as diffusers converts them, with the
    component configs of `config` and the tokenizers of `tokenizer` (or of `config`); offline."""
    config = _check_single_file(path, config)
    if problems := tokenizer_problems(config, tokenizer):
        raise ModelFolderError("\n".join(problems))
    components = {
        name: _load(folder.name, folder.parent, AutoTokenizer.from_pretrained)
        for name, folder in tokenizer_folders(config, tokenizer).items()
    }
    components["scheduler"] = _load("scheduler", config, DDPMScheduler.from_pretrained)
    if sdxl := is_sdxl_folder(config):
        pipeline, options = StableDiffusionXLPipeline, {"add_watermarker": False}
    else:
        pipeline = StableDiffusionPipeline
        options = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    try:
        pipe = pipeline.from_single_file(
            str(path), config=str(config), local_files_only=True, **components, **options
        )  # fmt: skip
    except Exception as error:  # a file of another architecture, truncated, or not a checkpoint
        raise ModelFolderError(f"cannot load {str(path)!r} with the configs of {str(config)!r}: {error}") from error
    # diffusers tells a file's text encoders apart by their widths and leaves one it cannot
    # place without weights (on the meta device) instead of failing.
    if unfilled := [name for name, part in pipe.components.items() if isinstance(part, torch.nn.Module)
                    and any(weight.is_meta for weight in part.parameters())]:  # fmt: skip
        raise ModelFolderError(f"cannot load {str(path)!r} with the configs of {str(config)!r}: no weights for "
                               f"{', '.join(unfilled)} (SDXL's two text encoders must differ in width)")  # fmt: skip
    options = {"force_zeros_for_empty_prompt": empty_prompt_is_zeros(config)} if sdxl else {}
    return assemble_base(path, {**pipe.components, "config": config}, **options)


# Each component's subfolder and loader; SDXL's folder adds a second text encoder and tokenizer.
COMPONENTS = {
    "unet": UNet2DConditionModel.from_pretrained,
    "vae": AutoencoderKL.from_pretrained,
    "text_encoder": CLIPTextModel.from_pretrained,
    "tokenizer": AutoTokenizer.from_pretrained,
    "scheduler": DDPMScheduler.from_pretrained,  # the training noise schedule, whatever class the folder names
}
SDXL_COMPONENTS = {
    "text_encoder_2": CLIPTextModelWithProjection.from_pretrained,
    "tokenizer_2": AutoTokenizer.from_pretrained,
}


def load_base(path: str | Path, config: str | Path | None = None, tokenizer: str | Path | None = None) -> DiffusionBase:
    """Load and freeze UNet, VAE, text encoder, tokenizer and noise scheduler from the diffusers
    folder `path` (and an SDXL folder's second text encoder and tokenizer: its UNet config says
    which it is), or from the single file `path` with the config folder `config` (and the
    tokenizers of `tokenizer`, where `config` has no vocabulary: `tokenizer_folders`)."""
    path = Path(path).expanduser()
    if path.is_file():
        return _load_single_file(path, config, tokenizer)
    path = check_model_folder(path)
    sdxl = is_sdxl_folder(path)
    loaders = {**COMPONENTS, **(SDXL_COMPONENTS if sdxl else {})}
    components = {name: _load(name, path, loader) for name, loader in loaders.items()}
    options = {"force_zeros_for_empty_prompt": empty_prompt_is_zeros(path)} if sdxl else {}
    return assemble_base(path, components, **options)


def assemble_base(path: Path | None, components: dict, **options) -> DiffusionBase:
    """The frozen base made of a pipeline's `components` (by their pipeline names; others are
    left out): an SDXL base when they hold a second text encoder."""
    kind = SDXLBase if "text_encoder_2" in components else DiffusionBase
    names = {field.name for field in fields(kind)}
    parts = {name: part for name, part in components.items() if name in names}
    base = kind(path=path, noise_scheduler=components["scheduler"], **parts, **options)
    base.freeze()
    return base


def load_unet(path: str | Path, config: str | Path | None = None) -> UNet2DConditionModel:
    """Only the frozen UNet of `path` (a single file: read with `config`): the reference an
    adapted UNet is compared with."""
    path = Path(path).expanduser()
    if path.is_file():
        config = _check_single_file(path, config)
        unet = UNet2DConditionModel.from_single_file(
            str(path), config=str(config), subfolder="unet", local_files_only=True
        )
    else:
        unet = _load("unet", check_model_folder(path), UNet2DConditionModel.from_pretrained)
    unet.requires_grad_(False)
    return unet.eval()
