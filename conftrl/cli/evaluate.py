"""Score a trained adapter on a split of the data it was trained with.

    python -m conftrl.evaluate adapter=outputs/canny_coft/runs/<time>/adapter [split=test] [num_images=64]

Writes metrics.json, metrics.md and samples.png (`--help` lists every key, conf/evaluate.yaml).
"""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from conftrl.cli import mistakes_reported
from conftrl.config import config_dir, register_resolvers
from conftrl.config.schema import ConfigError, validate_sampling_overrides
from conftrl.diffusion import load_unet
from conftrl.diffusion.sampling import SAMPLING_OPTIONS
from conftrl.evaluation.measure import energy_change, sample_grid
from conftrl.evaluation.report import fidelity_report, split_items, to_markdown
from conftrl.evaluation.scorers import UnknownMetricError, check_metric, estimator_of
from conftrl.training.adapter import INPUT_ERRORS, TrainedAdapter, load_adapter
from conftrl.training.merged import MERGED_BASE
from conftrl.utils.images import save_png

log = logging.getLogger(__name__)
register_resolvers()


def reference_unet(adapter: TrainedAdapter):
    """The UNet the adapter's energy change is measured against: its base's, or for a merged
    export the base it was merged into."""
    merged_base = adapter.config.get(MERGED_BASE)
    if merged_base is None:
        return load_unet(adapter.base.path, adapter.base.config)
    return load_unet(merged_base.path, merged_base.get("config"))


def evaluate(cfg: DictConfig) -> dict:
    """The metrics of the adapter `cfg.adapter`, also written to `cfg.output_dir`."""
    adapter = load_adapter(cfg.adapter, cfg.model_path)
    metric = check_metric(cfg.metric or OmegaConf.select(adapter.config, "callbacks.control_fidelity.metric"))
    sampling = adapter.sampling(**{option: cfg[option] for option in SAMPLING_OPTIONS})
    sample = partial(adapter.sample, **sampling)
    datamodule = adapter.build("data")
    items = split_items(datamodule, cfg.split, cfg.num_images)

    report = {
        "adapter": str(Path(cfg.adapter).resolve()),
        "base_model": str(adapter.base.path),
        "method": adapter.method.name,
        "annotator": adapter.config.annotator._target_.rsplit(".", 1)[-1],
        "split": cfg.split,
        "num_images": len(items["caption"]),
        "sampling": sampling,
        "trainable_parameters": int(adapter.config.trainable_parameters),
        "fidelity": fidelity_report(metric, sample, items, estimator_of(datamodule), cfg.batch_size, adapter.base.vae),
        "hyperspherical_energy": energy_change(adapter.base.unet, reference_unet(adapter)),
    }
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    (output_dir / "metrics.md").write_text(to_markdown(report))
    rows = {key: value[: cfg.grid_rows] for key, value in items.items()}
    save_png(sample_grid(sample, rows, list(cfg.grid_seeds)), output_dir / "samples.png")
    log.info("metrics and samples written to %s", output_dir)
    return report


@hydra.main(version_base="1.3", config_path=f"{config_dir()}/cli", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with mistakes_reported("conftrl.evaluate", ConfigError, UnknownMetricError, *INPUT_ERRORS):
        validate_sampling_overrides(cfg)
        evaluate(cfg)


if __name__ == "__main__":
    main()
