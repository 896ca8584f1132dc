"""How good a pretrained base is at its world: text adherence and the VAE's ceilings.

Scores a diffusers folder (default: the embedded base) the way `python -m conftrl.pretrain`
scores its checkpoints, with the world, seed and sampling settings of its pretrain record:
held-out test captions (seeds 0…n-1) → background correct, named colours present, unnamed
colours absent; held-out val images → VAE PSNR and the edge-F1 ceiling (Canny of the round
trip vs Canny of the original). Prints JSON.

    python benchmarks/base_quality.py [--base conftrl/assets/tiny-sd] [--captions 64] [--images 256]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from conftrl.config import ASSETS
from conftrl.diffusion import load_base
from conftrl.metrics.scene import SceneScorer
from conftrl.pretraining.data import held_out
from conftrl.pretraining.evaluation import scene_quality, vae_quality
from datamodules.shapesworld import COLORS, WorldSpec

from measure import machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=ASSETS / "tiny-sd")
    parser.add_argument("--record", type=Path, default=None, help="its pretrain_record.json (default: beside --base)")
    parser.add_argument("--captions", type=int, default=64)
    parser.add_argument("--images", type=int, default=256)
    args = parser.parse_args()
    record = json.loads((args.record or args.base.parent / "pretrain_record.json").read_text())
    config = record["config"]
    world, resolution, seed = WorldSpec(**config["world"]), config["model"]["resolution"], config["seed"]
    pipe = load_base(args.base).pipeline()

    start = time.perf_counter()
    samples = held_out(world, resolution, args.captions, seed, "test")
    scorer = SceneScorer(COLORS, world.shape_colors)
    settings = config["evaluation"]
    scene = scene_quality(pipe, samples, scorer, settings["sampling_steps"], settings["cfg_scale"])
    images = np.stack([s["image"] for s in held_out(world, resolution, args.images, seed, "val")])
    report = {
        "base": str(args.base),
        "sampling": {"sampler": "ddim", "steps": settings["sampling_steps"], "cfg_scale": settings["cfg_scale"]},
        "scene": scene,
        "vae": vae_quality(pipe.vae, images),
        "seconds": round(time.perf_counter() - start, 1),
        "machine": machine(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
