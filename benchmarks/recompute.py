"""OFT under gradient checkpointing: recomputing every Cayley transform against keeping them.

One UNet forward + backward (noise-prediction MSE) with conftrl OFT (r = 4) on the paper's
targets, in three modes measured in the same process, each round starting one mode later:
* `off` — no checkpointing (the speed bound, the most memory);
* `recompute` — diffusers' default checkpointing: every block's forward, and with it every OFT
  layer's Cayley transform, runs again in backward;
* `keep` — `conftrl.oft.checkpoint_keeping_rotations`: the same, except each layer's blocks
  are built once and kept for the recomputation (what `ControlModule` uses when it checkpoints).
Prints each mode's median time and its ratio to `recompute`, the largest adapter-gradient
difference between `keep` and `recompute` (the two must agree), what the Cayley transforms cost
on their own, the memory the kept blocks take, and on CUDA the peak memory. Random weights;
nothing is downloaded.

    python benchmarks/recompute.py [--model sd100m|sd15|small] [--batch 2] [--r 4] [--device cpu|cuda]
        [--dtype fp32|bf16] [--modes off recompute keep] [--repeats 5] [--threads N]
        [--out outputs/benchmarks/recompute.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from conftrl.oft import OFTConfig, OFTModel, OFTRotation, checkpoint_keeping_rotations
from conftrl.training.methods import PAPER_UNET_TARGETS

from measure import device_name, repeated, round_robin, seconds
from sd_models import SD100M_UNET, SD_TEXT_WIDTH, SD_TOKENS, sd_unet

# UNet arguments, latent size; `small` is for smoke tests.
MODELS = {
    "sd100m": (SD100M_UNET, 32),
    "sd15": ({}, 64),
    "small": (dict(SD100M_UNET, block_out_channels=(32, 64, 128)), 8),
}
DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # bf16: autocast over fp32 weights
MODES = ("off", "recompute", "keep")


def build(model: str, device: str, r: int = 4) -> tuple[OFTModel, list[OFTRotation], int]:
    arguments, latent = MODELS[model]
    unet = sd_unet(latent, **arguments).to(device)
    unet.requires_grad_(False)
    wrapped = OFTModel(unet, OFTConfig(r=r, target_modules=list(PAPER_UNET_TARGETS), init_weights=False))
    rotations = [m for m in wrapped.modules() if isinstance(m, OFTRotation)]
    return wrapped, rotations, latent


def set_mode(unet: UNet2DConditionModel, mode: str) -> None:
    if mode == "off":
        unet.disable_gradient_checkpointing()
    else:
        unet.enable_gradient_checkpointing(checkpoint_keeping_rotations if mode == "keep" else None)


def step(wrapped: OFTModel, inputs: tuple, dtype, device: str) -> float:
    """Seconds for one forward + backward; gradients are left in the adapters."""
    wrapped.zero_grad(set_to_none=True)

    def forward_backward() -> None:
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            prediction = wrapped(*inputs).sample
        prediction.float().pow(2).mean().backward()

    return seconds(forward_backward, device)


def cayley_cost(rotations: list[OFTRotation], repeats: int, device: str) -> float:
    """Median seconds to build every layer's blocks once (forward and backward)."""
    return statistics.median(
        repeated(lambda: sum(rotation.blocks().sum() for rotation in rotations).backward(), repeats, device=device)
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="sd100m")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--r", type=int, default=4, help="OFT blocks per layer (fewer: wider, costlier blocks)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up round")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="modes to time (recompute and keep are always among them)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks/recompute.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    modes = [mode for mode in MODES if mode in {*args.modes, "recompute", "keep"}]
    wrapped, rotations, latent = build(args.model, args.device, args.r)
    unet, dtype = wrapped.model, DTYPES[args.dtype]
    generator = torch.Generator().manual_seed(1)
    inputs = (
        torch.randn(args.batch, 4, latent, latent, generator=generator).to(args.device),
        torch.full((args.batch,), 500, device=args.device),
        torch.randn(args.batch, SD_TOKENS, SD_TEXT_WIDTH, generator=generator).to(args.device),
    )

    times = {mode: [] for mode in modes}
    gradients, peaks = {}, {}
    for position, mode in enumerate(round_robin(modes, args.repeats + 1)):  # round 0 warms up
        round_index = position // len(modes)
        set_mode(unet, mode)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = step(wrapped, inputs, dtype, args.device)
        if round_index:
            times[mode].append(seconds)
        else:
            gradients[mode] = torch.cat([r.weight.grad.flatten() for r in rotations])
            if args.device == "cuda":
                peaks[mode] = torch.cuda.max_memory_allocated() / 2**20
        print(f"round {round_index} {mode:9s} {seconds:.3f} s", flush=True)

    median = {mode: statistics.median(values) for mode, values in times.items()}
    difference = float((gradients["keep"] - gradients["recompute"]).abs().max())
    scale = float(gradients["recompute"].abs().max())
    report = {
        "model": args.model, "batch": args.batch, "r": args.r, "device": args.device, "dtype": args.dtype,
        "card": device_name(args.device),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "oft_layers": len(rotations),
        "median_s": median, "times_s": times,
        "ratio_to_recompute": {mode: median[mode] / median["recompute"] for mode in modes},
        "cayley_all_layers_s": cayley_cost(rotations, args.repeats, args.device),
        # What `keep` holds per checkpointed call beyond plain checkpointing: the fp32 blocks.
        "kept_blocks_mib": sum(r.weight.shape[0] * r.block_size**2 for r in rotations) * 4 / 2**20,
        "max_gradient_difference": difference, "max_gradient": scale,
        "peak_memory_mib": peaks or None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("median_s", "ratio_to_recompute", "cayley_all_layers_s", "kept_blocks_mib",
                                              "max_gradient_difference", "max_gradient", "peak_memory_mib")}, indent=2))
    return report


if __name__ == "__main__":
    main()
