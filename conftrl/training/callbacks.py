"""Callbacks that watch a run: sample grids, control fidelity, hyperspherical energy; and EMA.

The watchers act at the end of each validation (cadence: `trainer.val_check_interval`), read
the module, and never change what trains. Sampling uses its own seeded generators. Under data
parallelism the fidelity images and the energy's layers are shared out over the ranks and the
results pooled, so every rank logs the number one process would; grids come from rank 0.
Under FSDP (`trainer=fsdp`) each rank holds a shard of the weights: the watchers read them
inside `whole_weights`, every rank taking part, and since FSDP's forward passes are
collectives too, every rank samples the grid and every fidelity image (rank 0 saves the grid).
`EMA` is the exception that says so: it averages the trainable weights.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Annotated, Literal, Optional

import torch
from annotated_types import Ge
from diffusers.training_utils import EMAModel
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from conftrl.evaluation.measure import chosen_items, fidelity, first_items, mean_scores, paired_prompts, sample_grid
from conftrl.evaluation.scorers import FIDELITY_SCORERS, FidelityUnavailable, estimator_of, fidelity_scorer
from conftrl.metrics import energy_summary, layer_energies, layer_weights, rotation_stats
from conftrl.training.sharding import is_sharded, whole_weights
from conftrl.utils.images import save_png

log = logging.getLogger(__name__)


def _from_every_rank(value) -> list:
    """`value` of every process of the run, in rank order. Lightning's strategies gather only
    tensors of one shape; scores and per-layer energies are small dicts."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def _share(count: int, trainer: Trainer) -> slice:
    """This rank's contiguous share of `count` items."""
    rank, ranks = trainer.global_rank, trainer.world_size
    return slice(count * rank // ranks, count * (rank + 1) // ranks)


class SampleGrid(Callback):
    """Each row: a validation control, then one sample per seed for its caption.

    The rows are the first `num_rows` validation items, or the chosen `images` (control
    images or photos, annotated as `conftrl.generate` does) paired with `prompts` as
    `paired_prompts` says; chosen files are read when fitting starts, so a bad one stops the
    run before its first step.
    """

    def __init__(
        self, num_rows: Annotated[int, Ge(1)], seeds: list[int], sampling: dict, output_dir: str,
        images: Optional[list[str]] = None, prompts: Optional[list[str]] = None,
    ):
        paired_prompts(images, prompts)  # a pairing that cannot be made fails here
        self.num_rows, self.seeds, self.sampling = num_rows, list(seeds), dict(sampling)
        self.images, self.prompts = images, prompts
        self.output_dir = Path(output_dir)
        self.rows: dict | None = None

    def on_fit_start(self, trainer: Trainer, module: LightningModule) -> None:
        if self.images is not None:
            self._rows(trainer)

    def _rows(self, trainer: Trainer) -> dict:
        if self.rows is None:
            data = trainer.datamodule
            self.rows = (
                first_items(data.val_dataloader(), self.num_rows) if self.images is None
                else chosen_items(self.images, self.prompts, data.annotator, data.resolution)
            )
        return self.rows

    def on_validation_epoch_end(self, trainer: Trainer, module: LightningModule) -> None:
        model = trainer.strategy.model
        if trainer.sanity_checking or not (trainer.is_global_zero or is_sharded(model)):
            return
        if not self._rows(trainer):
            rank_zero_warn("the validation split yielded no samples: no sample grid")
            return
        with whole_weights(model):
            grid = sample_grid(partial(module.sample, **self.sampling), self.rows, self.seeds)
        if not trainer.is_global_zero:
            return
        save_png(grid, self.output_dir / f"step_{trainer.global_step:06d}.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("samples", [grid], step=trainer.global_step, caption=[" | ".join(self.rows["caption"])])


class ControlFidelity(Callback):
    """Scores samples for the first `num_images` validation controls (seed = index).

    Segmentation and depth on data other than ShapesWorld are read off the samples by the
    annotator's estimator; with none, the metric is skipped for the run, with one warning.
    """

    def __init__(
        self, metric: Literal[tuple(FIDELITY_SCORERS)], num_images: Annotated[int, Ge(1)],
        batch_size: Annotated[int, Ge(1)], sampling: dict,
    ):
        self.metric, self.num_images, self.batch_size, self.sampling = metric, num_images, batch_size, dict(sampling)
        self.items: dict | None = None
        self.score = None
        self.skipped = False

    def _prepare(self, trainer: Trainer) -> bool:
        """Pick the items and their scorer once; False (and the one warning) if none can score them."""
        datamodule = trainer.datamodule
        self.items = first_items(datamodule.val_dataloader(), self.num_images)
        try:
            self.score = fidelity_scorer(self.metric, self.items, estimator_of(datamodule))
        except FidelityUnavailable as reason:
            if trainer.is_global_zero:
                log.warning("%s", reason)
            self.skipped = True
        return not self.skipped

    def on_validation_epoch_end(self, trainer: Trainer, module: LightningModule) -> None:
        # Every rank sees the same items and estimator, so every rank skips or scores alike.
        if trainer.sanity_checking or self.skipped or (self.score is None and not self._prepare(trainer)):
            return
        model = trainer.strategy.model
        total = len(self.items.get("caption", ()))  # a streamed split can yield nothing
        share = slice(0, total) if is_sharded(model) else _share(total, trainer)
        mine = {key: value[share] for key, value in self.items.items()}
        count = len(mine.get("caption", ()))
        sample = partial(module.sample, **self.sampling)
        with whole_weights(model):
            scores = fidelity(sample, mine, self.score, self.batch_size, first_index=share.start) if count else {}
        every_rank = [(scores, count)] if is_sharded(model) else _from_every_rank((scores, count))
        shares = [(scores, count) for scores, count in every_rank if count]
        if not shares:
            rank_zero_warn("the validation split yielded no samples: no control fidelity")
            return
        for name, value in mean_scores([scores for scores, _ in shares], [count for _, count in shares]).items():
            module.log(f"val/{name}", value)


class EnergyMonitor(Callback):
    """Hyperspherical energy of the UNet's layers and its change since the run began, plus
    ‖R − I‖_F of OFT rotations. The starting energies are checkpointed, so a resumed run
    still compares against the frozen base."""

    def __init__(self):
        self.reference: dict[str, float] | None = None

    @staticmethod
    def _energies(trainer: Trainer, module: LightningModule) -> dict[str, float]:
        """Each layer's energy, every rank measuring a share of the layers."""
        with whole_weights(trainer.strategy.model):
            names = list(layer_weights(module.unet))
            shares = _from_every_rank(layer_energies(module.unet, names=names[_share(len(names), trainer)]))
        pooled = {name: energy for share in shares for name, energy in share.items()}
        return {name: pooled[name] for name in names if name in pooled}  # one order: the same sums

    def on_fit_start(self, trainer: Trainer, module: LightningModule) -> None:
        if self.reference is None:
            self.reference = self._energies(trainer, module)

    def on_validation_epoch_end(self, trainer: Trainer, module: LightningModule) -> None:
        if trainer.sanity_checking or self.reference is None:
            return
        summary = energy_summary(module.unet, reference=self.reference, per_layer=self._energies(trainer, module))
        with whole_weights(trainer.strategy.model):
            rotations = rotation_stats(module.unet)
        values = {**summary.log_dict("he"), **{f"oft/{k}": v for k, v in rotations.items()}}
        for name, value in values.items():
            module.log(name, value)

    def state_dict(self) -> dict:
        return {"reference": self.reference}

    def load_state_dict(self, state_dict: dict) -> None:
        self.reference = state_dict["reference"]


class EMA(Callback):
    """Exponential moving average of the trainable weights (the frozen ones never change),
    kept by diffusers' `EMAModel`.

    Training steps use the live weights; validation during fit swaps the average in and back
    out, and at the end of fit the average becomes the weights, so the final validation and
    the exported adapter use it. The average is checkpointed by parameter name: a resumed run
    continues it. The one callback that changes the module, and only by copying whole tensors.
    """

    def __init__(self, decay: float = 0.999):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.ema: EMAModel | None = None
        self.names: list[str] = []
        self.restored: dict[str, torch.Tensor] | None = None
        self.updated_at_step = -1

    @staticmethod
    def _trainable(module: LightningModule) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in module.named_parameters() if p.requires_grad}

    def _parameters(self, module: LightningModule) -> list[torch.nn.Parameter]:
        return list(self._trainable(module).values())

    def on_fit_start(self, trainer: Trainer, module: LightningModule) -> None:
        live = self._trainable(module)
        self.names = list(live)
        # min_decay = decay and update_after_step = -1 switch off EMAModel's warm-up schedule:
        # the average starts at the initial weights and moves by `decay` from the first step.
        self.ema = EMAModel(live.values(), decay=self.decay, min_decay=self.decay, update_after_step=-1)
        if self.restored is not None:
            self.ema.shadow_params = [self.restored[name].to(p.device, p.dtype) for name, p in live.items()]
            self.restored = None

    def on_train_batch_end(self, trainer: Trainer, module: LightningModule, *args) -> None:
        if trainer.global_step == self.updated_at_step:  # gradient accumulation: no step yet
            return
        self.updated_at_step = trainer.global_step
        self.ema.step(self._parameters(module))

    def on_validation_start(self, trainer: Trainer, module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self.ema.store(self._parameters(module))
            self.ema.copy_to(self._parameters(module))

    def on_validation_end(self, trainer: Trainer, module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self.ema.restore(self._parameters(module))

    def on_fit_end(self, trainer: Trainer, module: LightningModule) -> None:
        self.ema.copy_to(self._parameters(module))

    def state_dict(self) -> dict:
        return {"average": dict(zip(self.names, self.ema.shadow_params)), "updated_at_step": self.updated_at_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.restored, self.updated_at_step = state_dict["average"], state_dict["updated_at_step"]
