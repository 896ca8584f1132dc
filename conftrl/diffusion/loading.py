"""Load the frozen parts of a text-to-image model from a local diffusers folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextModel, PreTrainedTokenizerBase

# What a Stable-Diffusion-style diffusers folder must hold: subfolder -> any one of these files.
REQUIRED_FILES = {
    ".": ("model_index.json",),
    "unet": ("config.json",),
    "vae": ("config.json",),
    "text_encoder": ("config.json",),
    "tokenizer": ("tokenizer.json", "vocab.json", "tokenizer_config.json"),
    "scheduler": ("scheduler_config.json",),
}


class ModelFolderError(FileNotFoundError):
    """The model path is missing or is not a loadable diffusers text-to-image folder."""


@dataclass
class DiffusionBase:
    """The frozen base model: what a training step and a sampler need from a pipeline."""

    path: Path
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: PreTrainedTokenizerBase
    noise_scheduler: DDPMScheduler

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def pipeline(self, scheduler=None) -> StableDiffusionPipeline:
        """A plain text-to-image pipeline over these very modules (no copies), sampling with
        `scheduler` (default: the training noise scheduler)."""
        return StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=scheduler or self.noise_scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )

    def freeze(self) -> None:
        for model in (self.unet, self.vae, self.text_encoder):
            model.requires_grad_(False)
            model.eval()


def check_model_folder(path: str | Path) -> Path:
    """Fail early, naming the path and every missing piece, before any loader runs."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelFolderError(f"model path {str(path)!r} does not exist (set model.path=...)")
    if not path.is_dir():
        raise ModelFolderError(f"model path {str(path)!r} is a file, not a diffusers folder")
    missing = [
        f"{sub}/{' or '.join(names)}" if sub != "." else names[0]
        for sub, names in REQUIRED_FILES.items()
        if not any((path / sub / name).is_file() for name in names)
    ]
    if missing:
        raise ModelFolderError(
            f"{str(path)!r} is not a diffusers text-to-image folder; missing: {', '.join(missing)}"
        )
    return path


def _load(component: str, path: Path, loader):
    try:
        return loader(path, subfolder=component, local_files_only=True)
    except Exception as error:  # corrupt or incomplete weights: say which component failed
        raise ModelFolderError(f"cannot load {component!r} from {str(path)!r}: {error}") from error


def load_base(path: str | Path) -> DiffusionBase:
    """Load and freeze UNet, VAE, text encoder, tokenizer and noise scheduler from `path`."""
    path = check_model_folder(path)
    base = DiffusionBase(
        path=path,
        unet=_load("unet", path, UNet2DConditionModel.from_pretrained),
        vae=_load("vae", path, AutoencoderKL.from_pretrained),
        text_encoder=_load("text_encoder", path, CLIPTextModel.from_pretrained),
        tokenizer=_load("tokenizer", path, AutoTokenizer.from_pretrained),
        noise_scheduler=_load("scheduler", path, DDPMScheduler.from_pretrained),
    )
    base.freeze()
    return base


def load_unet(path: str | Path) -> UNet2DConditionModel:
    """Only the frozen UNet of `path`: the reference an adapted UNet is compared with."""
    unet = _load("unet", check_model_folder(path), UNet2DConditionModel.from_pretrained)
    unet.requires_grad_(False)
    return unet.eval()
