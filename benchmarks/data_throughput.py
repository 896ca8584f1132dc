"""Throughput of the data pipeline (samples/s), against what a GPU training step consumes.

Measures full training batches (decode or render, resize + random crop, Canny, tensors,
collate) at 512 px and batch 16, from a folder of JPEGs written to a temporary directory
and from ShapesWorld, with 0 and 2 workers. The first batch (worker start-up) is not timed.

    python benchmarks/data_throughput.py [--batches 12] [--json results.json]

GPU consumption is derived from ControlNet's own training notes (docs/train.md of
lllyasviel/ControlNet): 4000 steps at batch 4 in about 50 minutes on an A100 PCIe 40 GB,
fp32, SD 1.5 — 5.3 samples/s for ControlNet. The ControlNet paper (§3.2) puts ControlNet's
step at 1.34× plain SD finetuning, so a frozen-base method like OFT consumes about
5.3 × 1.34 ≈ 7 samples/s at fp32; bf16 on current GPUs is taken as 3× faster (≈ 21 samples/s).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch

from datamodules import FolderDataModule, ShapesWorldDataModule
from datamodules.annotators import CannyAnnotator

from measure import cpu_model, seconds

RESOLUTION, BATCH_SIZE = 512, 16
CONTROLNET_FP32_SAMPLES_PER_S = 4000 * 4 / (50 * 60)  # ControlNet docs/train.md, A100 PCIe 40 GB
CONTROLNET_STEP_OVER_SD = 1.34  # ControlNet paper §3.2
BF16_SPEEDUP = 3.0  # assumption, stated in the report
GPU_SAMPLES_PER_S = {
    "controlnet_fp32_a100": CONTROLNET_FP32_SAMPLES_PER_S,
    "frozen_base_fp32_a100": CONTROLNET_FP32_SAMPLES_PER_S * CONTROLNET_STEP_OVER_SD,
    "frozen_base_bf16": CONTROLNET_FP32_SAMPLES_PER_S * CONTROLNET_STEP_OVER_SD * BF16_SPEEDUP,
}


def write_jpeg_folder(root: Path, count: int, size: tuple[int, int] = (768, 576)) -> None:
    """Photo-sized JPEGs (gradients, blurred blobs, noise) with .txt captions."""
    rng = np.random.default_rng(0)
    width, height = size
    ramp = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    for i in range(count):
        image = np.broadcast_to(rng.uniform(40, 200, 3) + 50 * ramp, (height, width, 3)).copy()
        for _ in range(8):
            center = (int(rng.integers(width)), int(rng.integers(height)))
            axes = (int(rng.integers(20, width // 4)), int(rng.integers(20, height // 4)))
            color = rng.uniform(0, 255, 3).tolist()
            cv2.ellipse(image, center, axes, float(rng.uniform(0, 180)), 0, 360, color, cv2.FILLED, cv2.LINE_AA)
        image = cv2.GaussianBlur(image, (5, 5), 1.0) + rng.normal(0, 5, image.shape)
        cv2.imwrite(str(root / f"{i:03d}.jpg"), np.clip(image, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])
        (root / f"{i:03d}.txt").write_text(f"a photograph number {i}")


def samples_per_second(datamodule, batches: int) -> float:
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    stream = (batch for _ in itertools.count() for batch in loader)  # epoch after epoch
    next(stream)  # worker start-up and the first batch are not timed
    return batches * BATCH_SIZE / seconds(lambda: [next(stream) for _ in range(batches)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=12, help="timed batches per configuration")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]  # other processes share these cores
    # One thread per process, as in dataloader workers: 0 vs 2 workers then compares processes.
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    common = dict(resolution=RESOLUTION, batch_size=BATCH_SIZE, seed=0)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        write_jpeg_folder(Path(folder), count=64)
        for workers in (0, 2):
            common["num_workers"] = workers
            sources = {
                "jpeg folder 768x576": FolderDataModule(CannyAnnotator(), folder, val_fraction=0, **common),
                "shapesworld": ShapesWorldDataModule(CannyAnnotator(), num_train=4096, **common),
            }
            for name, datamodule in sources.items():
                rate = samples_per_second(datamodule, args.batches)
                results.append({"source": name, "num_workers": workers, "samples_per_s": round(rate, 1)})
    report = {
        "resolution": RESOLUTION,
        "batch_size": BATCH_SIZE,
        "control": "canny",
        "cpu": f"{cpu_model()}, {os.cpu_count()} cores",
        "load_average_1min_before": round(load_before, 1),
        "results": results,
        "gpu_consumption_samples_per_s": {k: round(v, 1) for k, v in GPU_SAMPLES_PER_S.items()},
    }
    print(f"{'source':<22}{'workers':>8}{'samples/s':>11}{'× bf16 GPU need':>17}")
    for row in results:
        ratio = row["samples_per_s"] / GPU_SAMPLES_PER_S["frozen_base_bf16"]
        print(f"{row['source']:<22}{row['num_workers']:>8}{row['samples_per_s']:>11.1f}{ratio:>17.2f}")
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
