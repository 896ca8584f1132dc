"""The LightningModule: frozen base + the method's trainable part + a control path.

The one place a training step is defined. Built by Hydra from the config's `module` node,
whose optimiser and learning-rate schedule are partials completed here with the trainable
weights. Checkpoints hold only what trains (plus the optimiser), and a checkpoint of another
method or model is refused with the reason.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import numpy as np
import torch
from lightning import LightningModule
from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch.callbacks import ModelCheckpoint

from conftrl.control import build_control_path
from conftrl.diffusion import DiffusionBase
from conftrl.diffusion.conditioning import SizeConditions
from conftrl.diffusion.objective import (
    TIMESTEP_SAMPLINGS,
    denoising_loss,
    sample_timesteps,
    stream_seed,
    training_target,
)
from conftrl.diffusion.sampling import sample_images
from conftrl.oft import checkpoint_keeping_rotations
from conftrl.training.checkpoints import newest_checkpoint, non_finite
from conftrl.training.methods import Method


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; training stops before the optimiser step."""


class CheckpointMismatchError(ValueError):
    """A checkpoint was written by another method, control path or model shape."""


# `optimizer(params)`: an optimiser of the given weights, e.g. a partial torch.optim.AdamW.
OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
# `lr_scheduler(optimizer=..., num_training_steps=N)`: its schedule over N steps, e.g. a partial
# diffusers.optimization.get_scheduler.
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


class ControlModule(LightningModule):
    def __init__(
        self, base: DiffusionBase, method: Method, gradient_checkpointing: bool = False, seed: int = 0,
        snr_gamma: float | None = None, timestep_sampling: str = "uniform",
        optimizer: OptimizerFactory = torch.optim.AdamW, lr_scheduler: SchedulerFactory | None = None,
    ):
        super().__init__()
        if timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"loss.timesteps={timestep_sampling!r}: expected one of {', '.join(TIMESTEP_SAMPLINGS)}")
        self.base, self.method, self.seed, self.snr_gamma = base, method, seed, snr_gamma
        self.timestep_sampling = timestep_sampling
        # Not `self.optimizer`/`self.lr_scheduler`: Lightning's strategies use those names.
        self.make_optimizer, self.make_lr_schedule = optimizer, lr_scheduler
        self.unet, self.vae = base.unet, base.vae
        for name, text_encoder in base.text_encoders.items():  # submodules, so they move with the module
            self.add_module(name, text_encoder)
        # The control path first: ControlNet copies the UNet's weights before any adapter.
        self.control = build_control_path(
            method.control_path, base.unet, base.vae_scale_factor, method.control_widths, method.control_sees_latent
        )
        # A plain dict, not submodules: these models are registered already (as the base's).
        self.adapted = method.adapt(base)
        if gradient_checkpointing:
            for model in (self.unet, *self.control.children()):
                if getattr(model, "_supports_gradient_checkpointing", False):
                    # Plain non-reentrant checkpointing, except that OFT blocks are built once.
                    model.enable_gradient_checkpointing(checkpoint_keeping_rotations)
        # Frozen weights never enter a checkpoint, so loading is checked by `on_load_checkpoint`.
        self.strict_loading = False

    def on_fit_start(self) -> None:
        # The frozen base stays in eval mode on purpose (its dropout must not act while the
        # adapter trains); Lightning warns about every module in eval mode right after this hook.
        warnings.filterwarnings("ignore", r"Found \d+ module\(s\) in eval mode", PossibleUserWarning)

    # --- what trains ---------------------------------------------------------------------

    def trainable_state(self) -> dict[str, torch.Size]:
        return {name: p.shape for name, p in self.named_parameters() if p.requires_grad}

    @property
    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # --- the training step -----------------------------------------------------------------

    def _generator(self, *stream: int) -> torch.Generator:
        """Randomness derived from (seed, stream, step, batch, rank) rather than a global RNG, so a run
        resumed from a checkpoint draws exactly the noise the uninterrupted run would."""
        return torch.Generator(self.device).manual_seed(stream_seed(self.seed, *stream, self.global_rank))

    def diffusion_loss(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        image, control = batch["image"], batch["control"]
        with torch.no_grad():
            latents = self.vae.encode(image).latent_dist.sample(generator)
            latents = latents * self.vae.config.scaling_factor
        with torch.set_grad_enabled(self.method.text_encoder and self.training):
            conditioning = self.base.condition(batch["caption"], SizeConditions.of(batch))
        scheduler = self.base.noise_scheduler
        noise = torch.randn(latents.shape, generator=generator, device=self.device, dtype=latents.dtype)
        timesteps = sample_timesteps(scheduler, len(latents), generator, self.device, self.timestep_sampling)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = self.control.predict(self.unet, noisy, timesteps, conditioning, control)
        target = training_target(scheduler, latents, noise, timesteps)
        return denoising_loss(prediction, target, scheduler, timesteps, self.snr_gamma)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.diffusion_loss(batch, self._generator(0, self.global_step, batch_idx))
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"loss is {loss.item()} at step {self.global_step}; stopped before the optimiser step. "
                f"{self._good_checkpoint()}"
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["caption"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # The same noise for every evaluation, so validation losses are comparable over time.
        loss = self.diffusion_loss(batch, self._generator(1, batch_idx))
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch["caption"]))

    def configure_optimizers(self):
        optimizer = self.make_optimizer([p for p in self.parameters() if p.requires_grad])
        if self.make_lr_schedule is None:
            return optimizer
        steps = self.trainer.estimated_stepping_batches
        schedule = self.make_lr_schedule(optimizer=optimizer, num_training_steps=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # --- sampling (for callbacks, generate and evaluate) --------------------------------------

    def sample(self, prompts: list[str], control: torch.Tensor, seeds: list[int], **sampling) -> np.ndarray:
        """uint8 images B×H×W×3, in eval mode (no module dropout), restoring the mode after."""
        was_training = self.training
        self.eval()
        try:
            return sample_images(self.base, self.control, prompts, control, seeds, **sampling)
        finally:
            self.train(was_training)

    # --- checkpoints: trainable state only ----------------------------------------------------

    def _fingerprint(self) -> dict:
        return {
            "method": self.method.name,
            "control_path": self.method.control_path,
            "trainable": {name: list(shape) for name, shape in self.trainable_state().items()},
        }

    def _good_checkpoint(self) -> str:
        """The newest checkpoint saved before this step. The one saved at this step holds the
        weights being trained now, which may be what made the loss non-finite."""
        folder = getattr(self.trainer.checkpoint_callback, "dirpath", None)
        found = newest_checkpoint(folder, before_step=self.global_step) if folder else None
        if found is None:
            return f"No checkpoint saved before step {self.global_step} exists to resume from."
        return f"Last good checkpoint: {found[0]} (step {found[1]}); resume with ckpt_path={found[0]}"

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = self.trainable_state()
        state = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["state_dict"] = state
        # Weights, optimiser moments, callback state such as EMA; not the checkpoint callback's
        # own bookkeeping, whose "no score yet" is infinite.
        bad = non_finite({k: v for k, v in checkpoint.items() if k != "callbacks"}) + non_finite({
            k: v for k, v in checkpoint.get("callbacks", {}).items() if not k.startswith(ModelCheckpoint.__qualname__)
        })
        if bad:
            raise NonFiniteLossError(
                f"refusing to checkpoint step {self.global_step}, its state is not finite: {bad[:3]}. "
                f"{self._good_checkpoint()}"
            )
        checkpoint["conftrl"] = self._fingerprint()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("conftrl")
        if saved is None:
            raise CheckpointMismatchError("not a conftrl checkpoint (no 'conftrl' entry)")
        mine = self._fingerprint()
        for key in ("method", "control_path"):
            if saved[key] != mine[key]:
                raise CheckpointMismatchError(
                    f"checkpoint was trained with {key}={saved[key]!r}, this run uses {mine[key]!r}"
                )
        if saved["trainable"] != mine["trainable"]:
            theirs, ours = saved["trainable"], mine["trainable"]
            differ = sorted(n for n in theirs.keys() | ours.keys() if theirs.get(n) != ours.get(n))
            raise CheckpointMismatchError(
                f"checkpoint's trainable weights do not match this model (e.g. {differ[:3]}); "
                "was it trained with another r, target set or base model?"
            )
        if set(checkpoint["state_dict"]) != set(mine["trainable"]):
            raise CheckpointMismatchError("checkpoint's state_dict does not hold every trainable weight")
