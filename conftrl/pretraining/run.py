"""The pretraining run: train the VAE, then the text encoder + UNet on its latents, evaluate,
export a diffusers folder. Every step is checkpointable and a rerun continues where it stopped.

Output directory::

    checkpoint.safetensors   weights, optimiser/schedule/EMA state and progress (one file)
    tokenizer/               the run's tokenizer, fixed at its first start (token ids must
                             not change under a trained text encoder when a run resumes)
    tiny-sd/                 the diffusers folder (EMA weights), refreshed at every checkpoint
    pretrain_record.json     config, seed, steps and wall time per stage, metrics, history
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm
from transformers import CLIPTokenizer

from conftrl.diffusion.objective import stream_seed
from conftrl.diffusion.tiny import TinySpec, build_tiny_pipeline
from conftrl.metrics.scene import SceneScorer
from conftrl.pretraining.checkpoint import load_checkpoint, save_checkpoint
from conftrl.pretraining.data import WorldBatches, drop_captions, held_out, step_generator, to_model_range
from conftrl.pretraining.evaluation import scene_quality, vae_quality
from conftrl.pretraining.stages import Optimisation, text_to_image_loss, vae_loss
from conftrl.utils.atomic import atomic_write, replace_folder
from datamodules.shapesworld import COLORS, WorldSpec

log = logging.getLogger(__name__)

STAGES = ("vae", "text_to_image")
DONE = "done"
MODELS = ("vae", "text_encoder", "unet")
# Independent streams of randomness, each seeded from (seed, stream, step).
STREAMS = {"vae": 0, "text_to_image": 1, "caption_dropout": 2, "latent_scale": 3}


class ResumeMismatchError(ValueError):
    """The output directory holds a checkpoint of a run with another model, world or seed."""


class PretrainRun:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.spec = TinySpec(**{k: tuple(v) if OmegaConf.is_list(v) else v for k, v in cfg.model.items()})
        self.world = WorldSpec(**cfg.world)
        self.pipe = build_tiny_pipeline(self.spec, cfg.seed)
        self.pipe.tokenizer = self.run_tokenizer(self.pipe.tokenizer)
        self.progress = {"stage": STAGES[0], "step": 0, "steps_done": {}, "seconds": {}, "metrics": {}, "history": []}
        self.optimisation: Optimisation | None = None
        self.scorer = SceneScorer(COLORS, self.world.shape_colors)
        self._losses: list[float] = []

    # --- checkpoints ----------------------------------------------------------------------

    def run_tokenizer(self, built: CLIPTokenizer) -> CLIPTokenizer:
        """The tokenizer saved in the output directory; `built` is saved there on the first start."""
        directory = self.out / "tokenizer"
        if not directory.exists():
            staging = self.out / ".tokenizer.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            built.save_pretrained(staging)
            replace_folder(staging, directory)
        return CLIPTokenizer.from_pretrained(directory)

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.safetensors"

    def identity(self) -> dict:
        cfg = self.cfg
        return {"seed": cfg.seed, "model": OmegaConf.to_container(cfg.model), "world": OmegaConf.to_container(cfg.world)}

    def save(self) -> None:
        state = {
            "identity": self.identity(),
            "progress": self.progress,
            "models": {name: getattr(self.pipe, name).state_dict() for name in MODELS},
            "optimisation": self.optimisation.state_dict() if self.optimisation else {},
        }
        save_checkpoint(state, self.checkpoint_path)

    def resume(self) -> None:
        if not self.checkpoint_path.exists():
            return
        state = load_checkpoint(self.checkpoint_path)
        if state["identity"] != self.identity():
            raise ResumeMismatchError(
                f"{self.checkpoint_path} belongs to a run with {state['identity']}; this one has "
                f"{self.identity()}. Choose another output_dir (run_name=...) or delete the checkpoint."
            )
        for name in MODELS:
            getattr(self.pipe, name).load_state_dict(state["models"][name])
        self.progress = state["progress"]
        if "scaling_factor" in self.progress:
            self.pipe.vae.register_to_config(scaling_factor=self.progress["scaling_factor"])
        if self.progress["stage"] in STAGES:
            self.optimisation = self.build_optimisation(self.progress["stage"])
            if state["optimisation"]:
                self.optimisation.load_state_dict(state["optimisation"])
        log.info("resumed %s at stage %s, step %d", self.out, self.progress["stage"], self.progress["step"])

    # --- training -------------------------------------------------------------------------

    def build_optimisation(self, stage: str) -> Optimisation:
        settings = self.cfg[stage]
        models = ["vae"] if stage == "vae" else ["text_encoder", "unet"]
        for name in MODELS:
            getattr(self.pipe, name).requires_grad_(name in models).train(name in models)
        parameters = [p for name in models for p in getattr(self.pipe, name).parameters()]
        return Optimisation(
            parameters, settings.lr, settings.warmup_steps, settings.steps,
            settings.weight_decay, settings.grad_clip, settings.get("ema_decay"),
        )

    def loss(self, stage: str, batches: WorldBatches, step: int) -> torch.Tensor:
        settings = self.cfg[stage]
        images, captions = batches(step)
        generator = step_generator(self.cfg.seed, STREAMS[stage], step)
        if stage == "vae":
            return vae_loss(self.pipe.vae, to_model_range(images), generator, settings.kl_weight)
        captions = drop_captions(captions, settings.caption_dropout, stream_seed(self.cfg.seed, STREAMS["caption_dropout"], step))
        return text_to_image_loss(self.pipe, to_model_range(images), captions, generator, settings.snr_gamma)

    def train(self, stage: str, budget: Budget) -> bool:
        """Train `stage` to its configured steps; False when the run's budget ran out first."""
        if self.optimisation is None:
            self.optimisation = self.build_optimisation(stage)
        total = self.cfg[stage].steps
        batches = WorldBatches(self.world, self.spec.resolution, self.cfg[stage].batch_size, self.cfg.seed)
        bar = tqdm(total=total, initial=self.progress["step"], desc=stage, dynamic_ncols=True)
        last_checkpoint = time.monotonic()
        while self.progress["step"] < total:
            started = time.monotonic()
            loss = self.loss(stage, batches, self.progress["step"])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{stage} loss is {loss.item()} at step {self.progress['step']}")
            self.optimisation.step(loss)
            self.progress["step"] += 1
            self.progress["seconds"][stage] = self.progress["seconds"].get(stage, 0.0) + time.monotonic() - started
            self._losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}")
            budget.spend()
            due = time.monotonic() - last_checkpoint >= 60 * self.cfg.checkpoint_every_minutes
            if due or budget.exhausted:
                self.checkpoint(stage)
                last_checkpoint = time.monotonic()
            if budget.exhausted and self.progress["step"] < total:
                bar.close()
                return False
        bar.close()
        return True

    def checkpoint(self, stage: str) -> None:
        """Save; in the text-to-image stage also export, score and record (a learning curve)."""
        self.progress["steps_done"][stage] = self.progress["step"]
        entry = {"stage": stage, "step": self.progress["step"], "loss": float(np.mean(self._losses or [np.nan]))}
        self._losses = []
        if stage == "text_to_image":
            entry |= self.evaluate_scenes()
            self.export()
        self.progress["history"].append(entry)
        self.save()
        self.write_record()
        log.info("checkpoint: %s", entry)

    def finish_vae(self) -> None:
        """Freeze the VAE's latent scale (1 / std of held-out latents, as SD's 0.18215 was
        chosen) and measure what it loses."""
        settings = self.cfg.evaluation
        images = np.stack([s["image"] for s in held_out(self.world, self.spec.resolution, settings.vae_images, self.cfg.seed, "val")])
        vae = self.pipe.vae.eval()
        with torch.no_grad():
            latents = vae.encode(to_model_range(images)).latent_dist.sample(step_generator(self.cfg.seed, STREAMS["latent_scale"]))
        self.progress["scaling_factor"] = float(1 / latents.std())
        vae.register_to_config(scaling_factor=self.progress["scaling_factor"])
        self.progress["metrics"]["vae"] = vae_quality(vae, images)
        log.info("VAE: scaling factor %.4f, %s", self.progress["scaling_factor"], self.progress["metrics"]["vae"])

    # --- evaluation and export ------------------------------------------------------------

    def evaluate_scenes(self) -> dict[str, float]:
        settings = self.cfg.evaluation
        samples = held_out(self.world, self.spec.resolution, settings.num_captions, self.cfg.seed, "test")
        for model in (self.pipe.unet, self.pipe.text_encoder):
            model.eval()
        with self.optimisation.averaged_weights():
            scores = scene_quality(self.pipe, samples, self.scorer, settings.sampling_steps, settings.cfg_scale)
        for model in (self.pipe.unet, self.pipe.text_encoder):
            model.train()
        self.progress["metrics"]["scene"] = scores
        return scores

    def export(self) -> Path:
        """Write the diffusers folder (EMA weights) by swapping in a complete new copy."""
        staging = self.out / ".tiny-sd.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        with self.optimisation.averaged_weights():
            self.pipe.save_pretrained(staging)
        return replace_folder(staging, self.out / "tiny-sd")

    def record(self) -> dict:
        scene = self.progress["metrics"].get("scene", {})
        targets = OmegaConf.to_container(self.cfg.targets)
        return {
            "complete": self.progress["stage"] == DONE,
            "stage": self.progress["stage"],
            "seed": self.cfg.seed,
            "steps_done": self.progress["steps_done"],
            "wall_seconds": {k: round(v, 1) for k, v in self.progress["seconds"].items()},
            "steps_per_second": {
                k: round(self.progress["steps_done"].get(k, 0) / v, 3) for k, v in self.progress["seconds"].items() if v
            },
            "scaling_factor": self.progress.get("scaling_factor"),
            "metrics": self.progress["metrics"],
            "targets": targets,
            "targets_met": bool(scene) and all(scene[k] >= v for k, v in targets.items()),
            "history": self.progress["history"],
            # Where the run wrote is not part of its recipe, and would name a machine's path.
            "config": {k: v for k, v in OmegaConf.to_container(self.cfg, resolve=True).items() if k != "output_dir"},
        }

    def write_record(self) -> dict:
        record = self.record()
        atomic_write(self.out / "pretrain_record.json", lambda file: file.write((json.dumps(record, indent=2) + "\n").encode()))
        return record

    # --- the whole run --------------------------------------------------------------------

    def run(self) -> dict:
        self.resume()
        budget = Budget(self.cfg.max_steps_per_run, self.cfg.max_minutes_per_run)
        while self.progress["stage"] != DONE:
            stage = self.progress["stage"]
            if not self.train(stage, budget):
                log.info("budget of this run spent at %s step %d; rerun to continue", stage, self.progress["step"])
                return self.record()
            if stage == "vae":
                self.finish_vae()
            self.checkpoint(stage)
            following = STAGES.index(stage) + 1
            self.progress["stage"] = STAGES[following] if following < len(STAGES) else DONE
            self.progress["step"] = 0
            self.optimisation = None
            self.save()
        return self.write_record()


class Budget:
    """How much of the work one invocation may do before it checkpoints and stops (for
    slicing a long CPU run into sessions); None means no limit."""

    def __init__(self, max_steps: int | None, max_minutes: float | None):
        self.max_steps, self.max_minutes = max_steps, max_minutes
        self.steps, self.started = 0, time.monotonic()

    def spend(self) -> None:
        self.steps += 1

    @property
    def exhausted(self) -> bool:
        over_steps = self.max_steps is not None and self.steps >= self.max_steps
        over_time = self.max_minutes is not None and time.monotonic() - self.started >= 60 * self.max_minutes
        return over_steps or over_time


def pretrain(cfg: DictConfig) -> dict:
    """Run (or continue) pretraining as `cfg` says; returns the record."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return PretrainRun(cfg).run()
    finally:
        torch.set_num_threads(threads)
