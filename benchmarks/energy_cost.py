"""Cost of the hyperspherical-energy metric: one 1280×1280 Linear, one 3×3 conv with 320
channels (neurons of length 2880), and every Linear/Conv2d of an SD 1.5-sized UNet (random
init, no download), in float64 (the default) and float32; and the OFT-adapted layers only
(paper recipe: attention projections + GEGLU input, r = 4), the cheap per-step log. Prints JSON.

    python benchmarks/energy_cost.py [--device cuda] [--skip-unet] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from conftrl.metrics import energy_summary, hyperspherical_energy
from conftrl.oft import OFTConfig, OFTLayer, OFTModel
from conftrl.training.methods import PAPER_UNET_TARGETS

from measure import cpu_model, repeated
from sd_models import sd_unet


def best_of(fn, repeats: int, device: str) -> float:
    """Fastest of ``repeats`` runs, in seconds."""
    return min(repeated(fn, repeats, device=device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-unet", action="store_true")
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    layers = {
        "linear_1280x1280": torch.randn(1280, 1280, generator=generator),
        "conv3x3_320": torch.randn(320, 320, 3, 3, generator=generator),
    }
    report = {
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "seconds": {},
    }
    for dtype in (torch.float64, torch.float32):
        tag = str(dtype).removeprefix("torch.")
        for name, weight in layers.items():
            weight = weight.to(args.device)
            report["seconds"][f"{name}/{tag}"] = best_of(
                lambda: hyperspherical_energy(weight, dtype=dtype), args.repeats, args.device
            )

    if not args.skip_unet:
        start = time.perf_counter()
        unet = sd_unet(64).to(args.device).eval()  # SD 1.5's UNet
        report["unet_build_s"] = time.perf_counter() - start
        for dtype in (torch.float64, torch.float32):
            tag = str(dtype).removeprefix("torch.")
            summaries = []
            report["seconds"][f"unet_all_linear_conv/{tag}"] = best_of(
                lambda: summaries.append(energy_summary(unet, dtype=dtype)), 1, args.device
            )
        report["unet_layers"] = len(summaries[-1].per_layer)
        report["unet_groups"] = len(summaries[-1].per_group)

        # the per-step log of an OFT run: only the adapted layers (paper recipe, r = 4)
        oft_model = OFTModel(unet, OFTConfig(r=4, target_modules=list(PAPER_UNET_TARGETS)))
        report["unet_oft_layers"] = sum(1 for _ in oft_model.oft_layers())
        report["seconds"]["unet_oft_layers/float32"] = best_of(
            lambda: energy_summary(unet, layer_types=(OFTLayer,), dtype=torch.float32), 1, args.device
        )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
