"""Training methods: which part of the frozen base becomes trainable, and how it is saved.

A method is a config dataclass (instantiated by Hydra from `conf/method/*.yaml`) that also
carries its optimiser settings, because the right learning rate depends on the method.
`adapt` runs once on the loaded base; `save`/`load` write and read the adapter folder's
method part (the control path saves its own part).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

from conftrl.diffusion import DiffusionBase
from conftrl.oft import OFTConfig, OFTModel

PAPER_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj"]
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


@dataclass
class Method:
    """Trains only the control path (the ControlNet baseline uses it as is)."""

    name: str = "controlnet"
    control_path: str = "controlnet"  # conv_in | multiscale | controlnet
    text_encoder: bool = False  # adapt the text encoder too
    lr: float = 1e-5
    weight_decay: float = 0.0
    lr_scheduler: str = "constant_with_warmup"  # any name of diffusers.optimization.get_scheduler
    warmup_steps: int = 0

    def adapt(self, base: DiffusionBase) -> None:
        """Make this method's part of `base` trainable (the rest stays frozen)."""

    def save(self, base: DiffusionBase, directory: Path) -> None:
        """Write this method's trained weights into the adapter folder `directory`."""

    def load(self, base: DiffusionBase, directory: Path) -> None:
        """Apply the weights `save` wrote to a freshly loaded `base`."""

    def models(self, base: DiffusionBase) -> dict[str, object]:
        return {"unet": base.unet, **({"text_encoder": base.text_encoder} if self.text_encoder else {})}


@dataclass
class OFTMethod(Method):
    """OFT / COFT (conftrl.oft) on the UNet's attention and GEGLU projections."""

    name: str = "coft"
    control_path: str = "conv_in"
    r: int = 4
    coft: bool = True
    eps: float = 1e-3
    block_share: bool = False
    module_dropout: float = 0.0
    use_cayley_neumann: bool = False
    target_modules: list[str] = field(default_factory=lambda: list(PAPER_UNET_TARGETS))
    text_encoder_target_modules: list[str] = field(default_factory=lambda: list(CLIP_TARGETS))

    wrappers: dict[str, OFTModel] = field(default_factory=dict, init=False, repr=False)

    def config(self, targets: list[str]) -> OFTConfig:
        return OFTConfig(
            r=self.r, coft=self.coft, eps=self.eps, block_share=self.block_share,
            module_dropout=self.module_dropout, use_cayley_neumann=self.use_cayley_neumann,
            target_modules=list(targets),
        )

    def _targets(self, part: str) -> list[str]:
        return self.target_modules if part == "unet" else self.text_encoder_target_modules

    def adapt(self, base: DiffusionBase) -> None:
        for part, model in self.models(base).items():
            # OFTModel swaps the target layers of `model` in place; `model` stays the module used.
            self.wrappers[part] = OFTModel(model, self.config(self._targets(part)))

    def save(self, base: DiffusionBase, directory: Path) -> None:
        for part, wrapper in self.wrappers.items():
            wrapper.save_pretrained(directory / part)

    def load(self, base: DiffusionBase, directory: Path) -> None:
        for part, model in self.models(base).items():
            self.wrappers[part] = OFTModel.from_pretrained(model, directory / part)


@dataclass
class LoRAMethod(Method):
    """LoRA baseline through peft, on the same layers as OFT."""

    name: str = "lora"
    control_path: str = "conv_in"
    r: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    lr: float = 1e-4
    target_modules: list[str] = field(default_factory=lambda: list(PAPER_UNET_TARGETS))
    text_encoder_target_modules: list[str] = field(default_factory=lambda: list(CLIP_TARGETS))

    # peft is an optional dependency (the `baselines` extra): imported only when LoRA is used.
    def _config(self, part: str):
        from peft import LoraConfig

        targets = self.target_modules if part == "unet" else self.text_encoder_target_modules
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=list(targets))

    def adapt(self, base: DiffusionBase) -> None:
        from peft import inject_adapter_in_model

        for part, model in self.models(base).items():
            inject_adapter_in_model(self._config(part), model)
            for name, parameter in model.named_parameters():
                parameter.requires_grad_("lora_" in name)

    def save(self, base: DiffusionBase, directory: Path) -> None:
        from peft import get_peft_model_state_dict

        for part, model in self.models(base).items():
            self._config(part).save_pretrained(directory / part)
            save_file(get_peft_model_state_dict(model), directory / part / "adapter_model.safetensors")

    def load(self, base: DiffusionBase, directory: Path) -> None:
        from peft import set_peft_model_state_dict

        self.adapt(base)
        for part, model in self.models(base).items():
            result = set_peft_model_state_dict(model, load_file(directory / part / "adapter_model.safetensors"))
            if result.unexpected_keys:
                raise ValueError(f"LoRA weights in {directory / part} do not fit: {result.unexpected_keys[:5]}")


@dataclass
class FullMethod(Method):
    """Full finetuning baseline: every UNet weight is trained."""

    name: str = "full"
    control_path: str = "conv_in"

    def adapt(self, base: DiffusionBase) -> None:
        for model in self.models(base).values():
            model.requires_grad_(True)

    def save(self, base: DiffusionBase, directory: Path) -> None:
        for part, model in self.models(base).items():
            model.save_pretrained(directory / part)

    def load(self, base: DiffusionBase, directory: Path) -> None:
        classes = {"unet": UNet2DConditionModel, "text_encoder": CLIPTextModel}
        for part, model in self.models(base).items():
            trained = classes[part].from_pretrained(directory / part, use_safetensors=True)
            model.load_state_dict(trained.state_dict())
