"""Validation of a composed config, before any model or data is loaded.

The schema of a config node with a `_target_` is the signature of the class it names: its
annotations (types, `Literal` choices, `annotated_types` bounds such as `Ge(1)`) are checked by
pydantic, so code and config cannot drift apart and no key needs a checker of its own. Library
callables whose signatures leave a bound out get it from `LIBRARY_RULES`. A partial node
(`_partial_: true`) may leave out the arguments its caller completes it with. The few nodes
without a target (`sampling`, `loss`) have pydantic models here. A mistake is reported as the
config key, the value and what is allowed, all mistakes at once.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any, Literal, Optional

import torch
from annotated_types import Ge, Gt
from diffusers import UNet2DConditionModel
from diffusers.optimization import SchedulerType, get_scheduler
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, FilePath, TypeAdapter, ValidationError, create_model, model_validator
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from conftrl.diffusion.loading import config_folder, single_file_problems, tokenizer_problems
from conftrl.diffusion.objective import TIMESTEP_SAMPLINGS
from conftrl.diffusion.sampling import SAMPLERS
from conftrl.evaluation.measure import paired_prompts

# diffusers' Stable Diffusion pipelines need image sides divisible by 8, whatever the VAE.
PIPELINE_MULTIPLE = 8
# A base folder's text encoders (SDXL has both) and the class each is built as.
TEXT_ENCODERS = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}


# Bounds that library signatures do not state, checked as if they were annotated there: torch's
# optimisers check their settings only when built, with the trainable weights (and accept a
# learning rate of 0, which trains nothing); diffusers' get_scheduler takes any string as a
# schedule's name, and any number of warm-up steps, until it is called.
LIBRARY_RULES: dict[Any, dict[str, Any]] = {
    torch.optim.Optimizer: {"lr": Annotated[float, Gt(0)], "weight_decay": Annotated[float, Ge(0)]},
    get_scheduler: {
        "name": Literal[tuple(kind.value for kind in SchedulerType)],
        "num_warmup_steps": Annotated[int, Ge(0)],
    },
}


class ConfigError(ValueError):
    """A composed config that cannot run; one line per mistake, each naming its key."""


class Sampling(BaseModel):
    """`sampling`: how grids, fidelity metrics, generate and evaluate draw samples."""

    model_config = ConfigDict(extra="forbid")
    sampler: Literal[tuple(SAMPLERS)]  # type: ignore[valid-type]
    steps: Annotated[int, Ge(1)]
    cfg_scale: Annotated[float, Ge(0)]
    control_scale: float
    guide_control: bool


class Loss(BaseModel):
    """`loss`: the denoising objective's weighting and timestep distribution."""

    model_config = ConfigDict(extra="forbid")
    snr_gamma: Optional[Annotated[float, Gt(0)]]
    timesteps: Literal[tuple(TIMESTEP_SAMPLINGS)]  # type: ignore[valid-type]


class Validation(BaseModel):
    """`validation`: the chosen items of the sample grids (`paired_prompts` pairs them)."""

    model_config = ConfigDict(extra="forbid")
    images: Optional[list[FilePath]] = None
    prompts: Optional[list[str]] = None

    @model_validator(mode="after")
    def _pairs(self) -> Validation:
        paired_prompts(self.images, self.prompts)
        return self


def validate_train_config(cfg: DictConfig) -> None:
    """Raise `ConfigError` listing every mistake of the training config `cfg`."""
    errors = [f"{key}: missing value (set it on the command line: {key}=...)" for key in _missing_keys(cfg)]
    if errors:  # a missing value cannot be resolved, so nothing else can be checked
        raise ConfigError("\n".join(errors))
    errors += _model_errors(Sampling, cfg.sampling, "sampling")
    errors += _model_errors(Loss, cfg.loss, "loss")
    errors += _model_errors(Validation, cfg.validation, "validation")
    for key, node in _target_nodes(cfg):
        errors += _target_errors(node, key)
    errors += _model_path_errors(cfg)
    if errors:
        raise ConfigError("\n".join(errors))


def instantiate_checked(node: DictConfig, key: str) -> Any:
    """`instantiate(node)`, with the object's own checks (e.g. `OFTConfig`'s rules) reported
    as mistakes of the config key `key`."""
    try:
        return instantiate(node)
    except InstantiationException as error:
        cause = error.__cause__ or error
        raise ConfigError(f"{key}: {cause}") from error


def validate_sampling_overrides(cfg: DictConfig) -> None:
    """The sampling keys a command sets (`None`: the run's own) against `Sampling`'s rules."""
    errors = []
    for key, field in Sampling.model_fields.items():
        if cfg.get(key) is not None:
            rule = TypeAdapter(Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation)
            try:
                rule.validate_python(cfg[key])
            except ValidationError as error:
                errors += [_describe(problem, key, None) for problem in error.errors()]
    if errors:
        raise ConfigError("\n".join(errors))


def check_method_fits(method: Any, folder: str | Path) -> None:
    """Adapt a weightless copy of the base (built on the meta device from the config files in
    `folder`) with `method`, so that a setting the base's layers cannot take (an `r` that does
    not divide a layer's width, a target that matches nothing) is reported before the weights
    load."""
    folder = Path(folder)
    if not (folder / "unet" / "config.json").is_file():
        return  # not a diffusers folder: the loader reports it
    with torch.device("meta"):
        skeleton = SimpleNamespace(
            unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
            text_encoders={
                name: kind(CLIPTextConfig.from_pretrained(folder / name))
                for name, kind in TEXT_ENCODERS.items()
                if getattr(method, "text_encoder", False) and (folder / name / "config.json").is_file()
            },
        )
        try:
            method.adapt(skeleton)
        except ValueError as error:
            raise ConfigError(f"method: {error}") from error


def check_strategy_complete(trainer: Any) -> None:
    """Refuse the EMA callback under FSDP over several processes: each rank's average holds
    only the shard of the trainable weights that rank keeps, and checkpoints would keep rank
    0's alone. The watchers and the adapter export gather FSDP's shards (`whole_weights`)."""
    from lightning.pytorch.strategies import FSDPStrategy

    from conftrl.training.callbacks import EMA

    if isinstance(trainer.strategy, FSDPStrategy) and trainer.world_size > 1 and any(
        isinstance(callback, EMA) for callback in trainer.callbacks
    ):
        raise ConfigError(
            f"trainer=fsdp over {trainer.world_size} processes with callbacks.ema: the average would keep "
            "each rank's shard of the weights and checkpoint rank 0's alone (docs/scaling.md, FSDP); "
            "leave ema out, or use trainer=ddp"
        )


def _missing_keys(cfg: DictConfig) -> list[str]:
    return sorted(key for key in OmegaConf.missing_keys(cfg) if not key.startswith("hydra."))


def _target_nodes(cfg: DictConfig) -> Iterator[tuple[str, DictConfig]]:
    """The instantiated nodes: each group's and the module's, with the nodes nested in them
    (such as the module's optimiser), and each entry of the callbacks and loggers."""
    for key in ("data", "annotator", "method", "module", "trainer"):
        yield from _with_nested(cfg[key], key)
    for group in ("callbacks", "logger"):
        for name, node in (cfg.get(group) or {}).items():
            if isinstance(node, DictConfig) and "_target_" in node:
                yield f"{group}.{name}", node


def _with_nested(node: DictConfig, key: str) -> Iterator[tuple[str, DictConfig]]:
    """`node` and every node with a target inside it, except those that repeat another key
    (`${...}`, such as the data's `annotator`), which are checked where they are written."""
    yield key, node
    for name in node:
        value = node._get_node(name)
        if isinstance(value, DictConfig) and not OmegaConf.is_interpolation(node, name) and "_target_" in value:
            yield from _with_nested(value, f"{key}.{name}")


def _target_errors(node: DictConfig, key: str) -> list[str]:
    values = OmegaConf.to_container(node, resolve=True)
    target_name = values.pop("_target_")
    partial = values.pop("_partial_", False)
    for hydra_key in ("_recursive_", "_convert_"):  # Hydra's own, not the target's
        values.pop(hydra_key, None)
    try:
        target = get_object(target_name)
    except Exception as error:  # Hydra raises ImportError or a plain Exception, depending on the path
        return [f"{key}._target_={target_name!r}: cannot be imported ({error})"]
    nested = {name for name, value in values.items() if _has_target(value)}
    schema = _signature_schema(target, nested, partial)
    return _model_errors(schema, values, key, accepted=_accepted_keys(schema))


def _model_errors(schema: type[BaseModel], values: Any, key: str, accepted: str | None = None) -> list[str]:
    if isinstance(values, (DictConfig, ListConfig)):
        values = OmegaConf.to_container(values, resolve=True)
    try:
        schema.model_validate(values)
    except ValidationError as error:
        return [_describe(problem, key, accepted) for problem in error.errors()]
    return []


def _describe(problem: dict, key: str, accepted: str | None) -> str:
    where = ".".join([key, *(str(part) for part in problem["loc"])])
    if problem["type"] == "extra_forbidden":
        return f"{where}: unknown key" + (f"; {key} takes {accepted}" if accepted else "")
    if problem["type"] == "missing":
        return f"{where}: missing value"
    return f"{where}={problem['input']!r}: {problem['msg']}"


def _accepted_keys(schema: type[BaseModel]) -> str | None:
    if schema.model_config.get("extra") != "forbid":
        return None
    return ", ".join(schema.model_fields)


def _has_target(value: Any) -> bool:
    """Whether `value` holds a node Hydra instantiates (checked as a node of its own, if at all)."""
    if isinstance(value, dict):
        return "_target_" in value or any(_has_target(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_target(v) for v in value)
    return False


def _signature_schema(target: Callable, nested: set[str], partial: bool = False) -> type[BaseModel]:
    """A pydantic model of the keyword arguments `target` accepts, from its annotations and
    its `LIBRARY_RULES`.

    The `**kwargs` of one of conftrl's classes, which it passes on to its base class, is followed
    up the MRO; any other `**kwargs` (a library's, which may go anywhere, as FSDPStrategy's go to
    torch's FSDP) admits any extra key. Arguments in `nested` are instantiated from
    nodes of their own and accept anything here. A `partial` target's caller supplies the
    arguments the node leaves out, so none is required.
    """
    parameters, open_ended = _parameters(target)
    rules = _library_rules(target)
    fields = {}
    for name, (parameter, hint) in parameters.items():
        required = parameter.default is inspect.Parameter.empty
        default = None if required and partial else ... if required else parameter.default
        fields[name] = (Any if name in nested else rules.get(name, hint), default)
    config = ConfigDict(extra="allow" if open_ended else "forbid", arbitrary_types_allowed=True)
    return create_model(f"{getattr(target, '__name__', 'target')}Config", __config__=config, **fields)


def _library_rules(target: Callable) -> dict[str, Any]:
    """The `LIBRARY_RULES` of `target`: its own, or those of a class it derives from."""
    for owner, rules in LIBRARY_RULES.items():
        if target is owner or inspect.isclass(target) and inspect.isclass(owner) and issubclass(target, owner):
            return rules
    return {}


# Packages whose classes pass their `**kwargs` on to their base class.
OWN_PACKAGES = ("conftrl.", "datamodules.")


def _parameters(target: Callable) -> tuple[dict[str, tuple[inspect.Parameter, Any]], bool]:
    """Every keyword argument of `target` with its annotation; and whether any key goes."""
    functions = [target]
    if inspect.isclass(target):
        functions = [klass.__init__ for klass in target.__mro__ if "__init__" in vars(klass)]
    parameters: dict[str, tuple[inspect.Parameter, Any]] = {}
    for function in functions:
        hints = _hints(function, target)
        signature = inspect.signature(function)
        for parameter in signature.parameters.values():
            if parameter.name == "self" or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                continue
            parameters.setdefault(parameter.name, (parameter, hints.get(parameter.name, Any)))
        if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
            return parameters, False
        if not function.__module__.startswith(OWN_PACKAGES):
            return parameters, True
    return parameters, True


def _hints(function: Callable, owner: Callable) -> dict[str, Any]:
    """Resolved annotations; a dataclass's generated `__init__` takes them from its fields."""
    try:
        if dataclasses.is_dataclass(owner) and function is owner.__init__:
            return typing.get_type_hints(owner, include_extras=True)
        return typing.get_type_hints(function, include_extras=True)
    except (NameError, TypeError):  # an annotation that does not resolve here checks nothing
        return {}


def _model_path_errors(cfg: DictConfig) -> list[str]:
    """`model.path` must exist (a single file: as safetensors, with a config folder and a
    tokenizer), and `data.resolution` must suit its VAE and the pipelines."""
    path = Path(str(cfg.model.path))
    if not path.exists():
        return [f"model.path={str(path)!r}: no such folder or file"]
    config, tokenizer = cfg.model.get("config"), cfg.model.get("tokenizer")
    if path.is_file() and (problems := single_file_problems(path, config) or tokenizer_problems(config, tokenizer)):
        return problems
    multiple = PIPELINE_MULTIPLE
    vae_config = config_folder(path, config) / "vae" / "config.json"
    if vae_config.is_file():
        vae_factor = 2 ** (len(json.loads(vae_config.read_text()).get("block_out_channels", [0])) - 1)
        multiple = math.lcm(multiple, vae_factor)
    resolution = cfg.data.get("resolution")
    if isinstance(resolution, int) and resolution % multiple:
        return [
            f"data.resolution={resolution}: must be a multiple of {multiple} (the VAE's downsampling and "
            f"the pipelines' multiple of {PIPELINE_MULTIPLE}), e.g. {max(multiple, resolution // multiple * multiple)}"
        ]
    return []
