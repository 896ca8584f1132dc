"""Control paths: how a control image reaches the frozen UNet.

`EncoderControl` is the paper's: a control encoder whose features are added to the output of
the UNet's `conv_in` (and, multi-scale, of each down block) by forward hooks, so diffusers
code stays untouched and any pipeline that calls the UNet is controlled. An encoder that also
sees the noisy latent takes it from `conv_in`'s input, at every UNet call. `ControlNetControl`
is the ControlNet baseline, diffusers' `ControlNetModel` feeding residuals to the UNet.
Both expose the same three things: `predict` for a training step, `pipeline` and
`pipeline_kwargs` + `applied` for sampling.

Under classifier-free guidance a pipeline calls the UNet on the batch [uncond; cond]. By
default (diffusers' ControlNet pipeline) control enters both halves, and guidance amplifies
only the text. `applied(..., guided=True)` keeps control out of the unconditional half, so
that guidance amplifies the control too: eps = eps(∅) + w·(eps(text, control) − eps(∅)).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from diffusers import ControlNetModel, DiffusionPipeline
from torch import nn

from conftrl.control.encoder import ControlEncoder, encoder_for_unet
from conftrl.diffusion.conditioning import Conditioning


def _add(output: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    # Under classifier-free guidance the UNet batch is [uncond; cond]: control enters both.
    return output + feature.repeat(output.shape[0] // feature.shape[0], 1, 1, 1).to(output.dtype)


class AddControlFeature:
    """Forward hook adding the control path's `index`-th feature map to a UNet block's output.

    An object rather than a closure: the hook lives in the UNet, which DDP's spawn start
    method pickles into every worker.
    """

    def __init__(self, control: EncoderControl, index: int):
        self.control, self.index = control, index

    def __call__(self, module, args, output):
        at_conv_in = isinstance(output, torch.Tensor)
        if at_conv_in:  # conv_in's input is the UNet's input
            self.control.unet_input(args[0])
        features = self.control.features
        if features is None:
            return output
        feature = features[self.index]
        if at_conv_in:
            return _add(output, feature)
        hidden, skips = output  # a down block: its output is also its last skip connection
        return _add(hidden, feature), (*skips[:-1], _add(skips[-1], feature))


class EncoderControl(nn.Module):
    """The paper's control path; only the encoder is a submodule (the UNet is not owned)."""

    folder = "control_encoder"

    def __init__(self, encoder: ControlEncoder, unet):
        super().__init__()
        self.encoder = encoder
        # Both set only inside `applied`: what it was given, and the features the UNet adds.
        self._request: tuple[torch.Tensor, float, bool] | None = None
        self.features: list[torch.Tensor] | None = None
        targets = [unet.conv_in, *unet.down_blocks][: 1 + len(encoder.scale_outs)]
        self._hooks = [target.register_forward_hook(AddControlFeature(self, i)) for i, target in enumerate(targets)]

    @contextmanager
    def applied(self, control: torch.Tensor, scale: float = 1.0, guided: bool = False):
        """Within this block every UNet call gets `control`'s features times `scale`; with
        `guided`, only the conditional half of a guidance batch does (see the module notes).
        An encoder that sees the latent is run at every UNet call, on that call's input; any
        other once, here."""
        self._request = (control, scale, guided)
        self.features = None if self.encoder.sees_latent else self._encode(None)
        try:
            yield
        finally:
            self._request = self.features = None

    def unet_input(self, latent: torch.Tensor) -> None:
        """The UNet was called on `latent` (its first layer's hook, before any feature is
        added): encode it, if the encoder sees the latent."""
        if self._request is not None and self.encoder.sees_latent:
            self.features = self._encode(latent)

    def _encode(self, latent: torch.Tensor | None) -> list[torch.Tensor]:
        control, scale, guided = self._request
        if guided:  # a guidance batch [uncond; cond]: only the conditional half is encoded
            latent = None if latent is None else latent[len(latent) // 2 :]
        elif latent is not None:  # every row of the UNet's batch with its own latent
            control = control.repeat(len(latent) // len(control), 1, 1, 1)
        features = [scale * feature for feature in self.encoder(control, latent)]
        if guided:
            features = [torch.cat([torch.zeros_like(feature), feature]) for feature in features]
        return features

    def predict(self, unet, noisy, timesteps, conditioning: Conditioning, control) -> torch.Tensor:
        with self.applied(control):
            return unet(noisy, timesteps, **conditioning.unet_kwargs()).sample

    def pipeline(self, base, scheduler) -> DiffusionPipeline:
        return base.pipeline(scheduler)

    def pipeline_kwargs(self, control: torch.Tensor) -> dict:
        return {}

    def save(self, directory: Path) -> None:
        self.encoder.save_pretrained(directory / self.folder)

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()


class ScaleResiduals:
    """Forward hook multiplying each row of a ControlNet's residuals by its weight."""

    def __init__(self, weights: torch.Tensor):
        self.weights = weights

    def __call__(self, module, args, output):
        down, mid = output  # the pipeline calls the ControlNet with return_dict=False

        def scaled(residual: torch.Tensor) -> torch.Tensor:
            weights = self.weights.to(residual.device, residual.dtype)
            return residual * weights.repeat(len(residual) // len(weights)).view(-1, 1, 1, 1)

        return [scaled(r) for r in down], scaled(mid)


@contextmanager
def _hooked(module: nn.Module, hook):
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class ControlNetControl(nn.Module):
    """The ControlNet baseline: a trainable copy of the UNet's encoder half."""

    folder = "controlnet"

    def __init__(self, controlnet: ControlNetModel):
        super().__init__()
        self.controlnet = controlnet

    def applied(self, control: torch.Tensor, scale: float = 1.0, guided: bool = False):
        """Scales the ControlNet's residuals, and zeroes them for the unconditional half of a
        guidance batch with `guided`. Not diffusers' `guess_mode`: that also damps the residuals
        of the outer blocks, which the encoder path has no counterpart for."""
        if scale == 1.0 and not guided:
            return nullcontext()
        weights = torch.full((len(control),), float(scale))
        if guided:
            weights = torch.cat([torch.zeros_like(weights), weights])
        return _hooked(self.controlnet, ScaleResiduals(weights))

    def predict(self, unet, noisy, timesteps, conditioning: Conditioning, control) -> torch.Tensor:
        down, mid = self.controlnet(
            noisy, timesteps, **conditioning.unet_kwargs(), controlnet_cond=control, return_dict=False
        )
        return unet(
            noisy, timesteps, **conditioning.unet_kwargs(),
            down_block_additional_residuals=down, mid_block_additional_residual=mid,
        ).sample

    def pipeline(self, base, scheduler) -> DiffusionPipeline:
        return base.pipeline(scheduler, controlnet=self.controlnet)

    def pipeline_kwargs(self, control: torch.Tensor) -> dict:
        return {"image": control}

    def save(self, directory: Path) -> None:
        self.controlnet.save_pretrained(directory / self.folder)

    def remove_hooks(self) -> None:
        pass


CONTROL_PATHS = ("conv_in", "multiscale", "controlnet")


def build_control_path(
    kind: str, unet, vae_scale_factor: int, widths: tuple[int, ...] | None = None, sees_latent: bool = False
) -> nn.Module:
    """A fresh control path of `kind` (one of CONTROL_PATHS) sized for `unet`; `widths` and
    `sees_latent` shape the control encoder (`encoder_for_unet`), not ControlNet."""
    if kind == "controlnet":
        if widths is not None:
            raise ValueError("control widths size the conv_in and multiscale control encoders; controlnet has none")
        if sees_latent:
            raise ValueError("control_sees_latent is for the conv_in and multiscale control encoders; a controlnet always sees the latent")
        halvings = vae_scale_factor.bit_length() - 1
        embedding_widths = tuple(min(w, unet.conv_in.out_channels) for w in (16, 32, 96, 256))
        return ControlNetControl(
            ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=embedding_widths[: halvings + 1])
        )
    if kind in ("conv_in", "multiscale"):
        encoder = encoder_for_unet(unet, vae_scale_factor, kind == "multiscale", widths, sees_latent)
        return EncoderControl(encoder, unet)
    raise ValueError(f"unknown control path {kind!r}; choose one of {', '.join(CONTROL_PATHS)}")


def load_control_path(directory: Path, unet) -> nn.Module:
    """The control path saved in an adapter folder by `save`."""
    if (directory / ControlNetControl.folder).is_dir():
        return ControlNetControl(ControlNetModel.from_pretrained(directory / ControlNetControl.folder, use_safetensors=True))
    if (directory / EncoderControl.folder).is_dir():
        return EncoderControl(ControlEncoder.from_pretrained(directory / EncoderControl.folder, use_safetensors=True), unet)
    raise FileNotFoundError(
        f"{str(directory)!r} holds no control path ({EncoderControl.folder}/ or {ControlNetControl.folder}/)"
    )
