"""Training methods: which part of the frozen base becomes trainable, and how it is saved.

A method is a config dataclass (instantiated by Hydra from `conf/method/*.yaml`) that says
what trains and nothing else: the optimiser is the module's (`module.optimizer`), and the
adapted models live with the module, not in the method. `adapt` runs once on the loaded base
and returns the adapted parts by name; `save` writes those into the adapter folder and `load`
applies what `save` wrote to a freshly loaded base (the control path saves its own part).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from annotated_types import Ge, Len, Lt
from safetensors.torch import load_file, save_file
from torch import nn

from conftrl.control import CONTROL_PATHS
from conftrl.control.encoder import PAPER_WIDTHS
from conftrl.diffusion import DiffusionBase
from conftrl.oft import OFTConfig, OFTModel
from conftrl.oft.model import DEFAULT_TARGET_MODULES

PAPER_UNET_TARGETS = DEFAULT_TARGET_MODULES["UNet2DConditionModel"]  # attention projections, GEGLU input
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]

ControlPathName = Literal[CONTROL_PATHS]
# A method's trained parts by name ("unet", "text_encoder", SDXL's "text_encoder_2"): what `save` writes.
Adapted = dict[str, nn.Module]


@dataclass
class Method:
    """What a method shares: its name, the control path trained beside it, and whether the text
    encoder is adapted too. Subclasses say what of the base trains."""

    name: str
    control_path: ControlPathName
    text_encoder: bool = False  # adapt the text encoder too
    # The control encoder's hidden conv widths (conv_in and multiscale paths), one per conv;
    # None: the paper's, capped at the UNet's conv_in width.
    control_widths: Optional[Annotated[list[Annotated[int, Ge(1)]], Len(len(PAPER_WIDTHS), len(PAPER_WIDTHS))]] = None
    # The control encoder also sees the UNet's noisy input latent, as a ControlNet does.
    control_sees_latent: bool = False

    def adapt(self, base: DiffusionBase) -> Adapted:
        """Make this method's part of `base` trainable (the rest stays frozen)."""
        raise NotImplementedError

    def save(self, adapted: Adapted, directory: Path) -> None:
        """Write the trained parts `adapt` returned into the adapter folder `directory`."""
        raise NotImplementedError

    def load(self, base: DiffusionBase, directory: Path) -> Adapted:
        """Apply the weights `save` wrote to a freshly loaded `base`."""
        raise NotImplementedError

    def merge(self, adapted: Adapted) -> None:
        """Fold the trained weights into the adapted models' own layers, leaving plain diffusers
        and transformers models (full finetuning and the control path alone have nothing to fold)."""

    def models(self, base: DiffusionBase) -> dict[str, nn.Module]:
        """The parts this method adapts: the UNet, and with `text_encoder` every text encoder."""
        return {"unet": base.unet, **(base.text_encoders if self.text_encoder else {})}


@dataclass
class ControlOnlyMethod(Method):
    """Nothing of the base trains, only the control path: the least any method with that
    control path trains, and so the floor of its cost (benchmarks/train_step.py measures the
    others against it)."""

    name: str = "control_only"
    control_path: ControlPathName = "conv_in"

    def __post_init__(self) -> None:
        if self.text_encoder:  # it would only run the frozen text encoder with gradients
            raise ValueError(f"{self.name} trains its control path alone: text_encoder=true needs a method "
                             "that adapts the base (coft, oft, lora or full)")

    def adapt(self, base: DiffusionBase) -> Adapted:
        return {}

    def save(self, adapted: Adapted, directory: Path) -> None:
        """Nothing but the control path, which saves itself."""

    def load(self, base: DiffusionBase, directory: Path) -> Adapted:
        return {}


@dataclass
class ControlNetMethod(ControlOnlyMethod):
    """The ControlNet baseline: the frozen base takes the residuals of a ControlNet (diffusers'
    ControlNetModel, initialised from the UNet), which is the control path and all that trains."""

    name: str = "controlnet"
    control_path: Literal["controlnet"] = "controlnet"


@dataclass
class OFTMethod(Method):
    """OFT / COFT (conftrl.oft) on the UNet's attention and GEGLU projections.

    Every field that `OFTConfig` also has goes to the adapter's OFTConfig unchanged, which
    checks them (once when the method is built, before any model is loaded). With
    `text_encoder`, they apply to the text encoder too, whose targets are
    `text_encoder_target_modules`.
    """

    name: str = "coft"
    control_path: ControlPathName = "conv_in"
    # The seed's OFTConfig fields (conftrl.oft.OFTConfig documents each).
    r: int = 4
    module_dropout: float = 0.0
    target_modules: Union[list[str], str] = field(default_factory=lambda: list(PAPER_UNET_TARGETS))
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: Optional[dict[str, int]] = None
    alpha_pattern: Optional[dict[str, float]] = None
    modules_to_save: Optional[list[str]] = None
    coft: bool = True
    eps: float = 1e-3
    block_share: bool = False
    # Later PEFT releases' fields.
    oft_block_size: int = 0
    use_cayley_neumann: bool = False
    num_cayley_neumann_terms: int = 5
    exclude_modules: Optional[Union[list[str], str]] = None
    text_encoder_target_modules: Union[list[str], str] = field(default_factory=lambda: list(CLIP_TARGETS))

    def __post_init__(self) -> None:
        self.config(self.target_modules)  # OFTConfig's checks, before any model is loaded

    def config(self, targets: Union[list[str], str]) -> OFTConfig:
        """The OFTConfig of one adapted part: the fields it shares with this method, and `targets`."""
        shared = {f.name for f in fields(OFTConfig)} & {f.name for f in fields(self)}
        options = {name: copy.deepcopy(getattr(self, name)) for name in shared}
        return OFTConfig(**{**options, "target_modules": copy.deepcopy(targets)})

    def _targets(self, part: str) -> Union[list[str], str]:
        return self.target_modules if part == "unet" else self.text_encoder_target_modules

    def adapt(self, base: DiffusionBase) -> dict[str, OFTModel]:
        # OFTModel swaps the target layers of each model in place; the model stays the module used.
        return {part: OFTModel(model, self.config(self._targets(part))) for part, model in self.models(base).items()}

    def save(self, adapted: dict[str, OFTModel], directory: Path) -> None:
        for part, wrapper in adapted.items():
            wrapper.save_pretrained(directory / part)

    def load(self, base: DiffusionBase, directory: Path) -> dict[str, OFTModel]:
        return {part: OFTModel.from_pretrained(model, directory / part) for part, model in self.models(base).items()}

    def merge(self, adapted: dict[str, OFTModel]) -> None:
        for wrapper in adapted.values():
            wrapper.merge_and_unload()  # W Rᵀ into each weight, the plain layer back in place


@dataclass
class LoRAMethod(Method):
    """LoRA baseline through peft, on the same layers as OFT."""

    name: str = "lora"
    control_path: ControlPathName = "conv_in"
    r: Annotated[int, Ge(1)] = 16
    alpha: float = 16.0
    dropout: Annotated[float, Ge(0), Lt(1)] = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(PAPER_UNET_TARGETS))
    text_encoder_target_modules: list[str] = field(default_factory=lambda: list(CLIP_TARGETS))

    # peft is an optional dependency (the `baselines` extra): imported only when LoRA is used.
    def _config(self, part: str):
        from peft import LoraConfig

        targets = self.target_modules if part == "unet" else self.text_encoder_target_modules
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=list(targets))

    def adapt(self, base: DiffusionBase) -> Adapted:
        from peft import inject_adapter_in_model

        adapted = self.models(base)
        for part, model in adapted.items():
            inject_adapter_in_model(self._config(part), model)
            for name, parameter in model.named_parameters():
                parameter.requires_grad_("lora_" in name)
        return adapted

    def save(self, adapted: Adapted, directory: Path) -> None:
        from peft import get_peft_model_state_dict

        for part, model in adapted.items():
            self._config(part).save_pretrained(directory / part)
            save_file(get_peft_model_state_dict(model), directory / part / "adapter_model.safetensors")

    def load(self, base: DiffusionBase, directory: Path) -> Adapted:
        from peft import set_peft_model_state_dict

        adapted = self.adapt(base)
        for part, model in adapted.items():
            result = set_peft_model_state_dict(model, load_file(directory / part / "adapter_model.safetensors"))
            if result.unexpected_keys:
                raise ValueError(f"LoRA weights in {directory / part} do not fit: {result.unexpected_keys[:5]}")
        return adapted

    def merge(self, adapted: Adapted) -> None:
        # peft merges per layer; its model-level merge_and_unload needs a PeftModel wrapper,
        # which `inject_adapter_in_model` does not make.
        from peft.tuners.tuners_utils import BaseTunerLayer

        for model in adapted.values():
            for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]:
                layer.merge()
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, layer.get_base_layer())


@dataclass
class FullMethod(Method):
    """Full finetuning baseline: every UNet weight is trained."""

    name: str = "full"
    control_path: ControlPathName = "conv_in"

    def adapt(self, base: DiffusionBase) -> Adapted:
        adapted = self.models(base)
        for model in adapted.values():
            model.requires_grad_(True)
        return adapted

    def save(self, adapted: Adapted, directory: Path) -> None:
        for part, model in adapted.items():
            model.save_pretrained(directory / part)

    def load(self, base: DiffusionBase, directory: Path) -> Adapted:
        adapted = self.models(base)
        for part, model in adapted.items():
            trained = type(model).from_pretrained(directory / part, use_safetensors=True)
            model.load_state_dict(trained.state_dict())
        return adapted
