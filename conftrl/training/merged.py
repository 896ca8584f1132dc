"""A merged export: the adapter folded into its base, written as a complete diffusers folder.

    <merged>/
      model_index.json, unet/ (rotations or LoRA merged in), vae/, text_encoder/, tokenizer/
      (SDXL: text_encoder_2/, tokenizer_2/ too),
      scheduler/          the run's sampler: a stock StableDiffusionPipeline (SDXL:
                          StableDiffusionXLPipeline) loads and samples it
      controlnet/         the ControlNet baseline's, listed in model_index.json, so a stock
                          StableDiffusion(XL)ControlNetPipeline loads it
      control_encoder/    the paper's control encoder (diffusers format), which only conftrl runs
      conftrl.yaml        the adapter's config with no base of its own: the folder is its own
                          base, so `load_adapter` (generate, evaluate) loads it as an adapter;
                          `merged_base` names the base it was merged into
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from conftrl.diffusion.sampling import SAMPLERS
from conftrl.training.adapter import CONFIG_FILE, TrainedAdapter, write_folder

# The key of a merged export's config that records the base it was merged into.
MERGED_BASE = "merged_base"


def is_merged_export(directory: Path) -> bool:
    return (directory / CONFIG_FILE).is_file() and (directory / "model_index.json").is_file()


def merged_record(adapter: TrainedAdapter) -> dict:
    """The adapter's config for its merged export: no base path (the folder is its own), and a
    method that only carries the control path, since its weights are now the base's."""
    record = OmegaConf.to_container(adapter.config, resolve=True)
    record[MERGED_BASE] = dict(record["model"])  # what the energy change is measured against
    record["model"] |= {"path": None, "config": None, "tokenizer": None}
    method = record["method"]
    record["method"] = {
        "_target_": "conftrl.training.methods.ControlOnlyMethod", "name": method["name"],
        "control_path": method["control_path"],
    }  # fmt: skip
    record["merged_from"] = str(adapter.directory.resolve())
    return record


def export_merged(adapter: TrainedAdapter, directory: str | Path) -> Path:
    """Merge `adapter` into its base (in place: `adapter` samples as before, from plain
    layers) and write the merged folder atomically; a folder there that is not a merged export
    is never replaced."""
    adapter.method.merge(adapter.adapted)
    scheduler = SAMPLERS[adapter.config.sampling.sampler].from_config(adapter.base.noise_scheduler.config)

    def build(staging: Path) -> None:
        adapter.control.pipeline(adapter.base, scheduler).save_pretrained(staging, safe_serialization=True)
        adapter.control.save(staging)
        OmegaConf.save(OmegaConf.create(merged_record(adapter)), staging / CONFIG_FILE)

    return write_folder(directory, build, is_merged_export, "a merged export", "merged")
