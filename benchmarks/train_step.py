"""One full optimizer step of ControlModule training per method: time, peak memory, trainable parameters.

A step is what `python -m conftrl.train` runs: Lightning fits the project's `ControlModule`
(VAE encode, text encode, control path, UNet forward and backward, gradient clipping at 1.0
as the default trainer config, AdamW `optimizer.step()`) on a fixed random batch of images,
Canny-like controls and captions. Every model is built with random weights in memory; nothing
is downloaded. Methods (all but `controlnet` use the paper's control encoder on `conv_in`):

* floor — `ControlOnlyMethod`: the control encoder alone, the UNet frozen; the loss
  backpropagates through the whole UNet to `conv_in`'s output, the least any adapter with this
  control path pays;
* oft / coft — conftrl OFT r = 4 (exact Cayley) on the paper's targets; coft with eps = 1e-3;
* peft_oft — PEFT's OFT with the same blocks (see `PeftOFTMethod`);
* peft_lora — conftrl's LoRA method (PEFT) at the rank whose parameter count is nearest OFT's;
* controlnet — diffusers' `ControlNetModel.from_unet` trained, the frozen UNet taking its residuals;
* full — every UNet weight trains.

UNets (`--models`): `tiny` (the embedded base's `TinySpec`, the default experiment's batch 64
at 64 px), `sd100m` (a 115 M-parameter SD-shaped UNet, blocks 192/384/768, batch 2 at 256 px),
`sd15` (SD 1.5's UNet, VAE and CLIP text encoder, batch 16 at 512 px, gradient
checkpointing as `model=sd15` trains; for a GPU) and `sdxl` (SDXL's UNet, VAE and both text
encoders with its size conditioning, batch 4 at 1024 px, gradient checkpointing; for a GPU). The time is the median of `--repeats` steps
after `--warmup` steps; each method runs in a fresh process so its peak memory is its own, and
`--rounds N` runs the method list N times over and pools each method's steps. One further step
runs under torch's FlopCounterMode: the work each method does, which no noisy neighbour on a
shared machine changes, against the floor's.
JSON and Markdown are rewritten after every method, so a run cut short keeps what it measured.

    python benchmarks/train_step.py [--models tiny sd100m] [--methods floor oft ...] \\
        [--device cpu|cuda] [--precision fp32|bf16] [--batch N] [--resolution PX] [--text-encoder-layers N] \\
        [--repeats 5] [--warmup 2] [--rounds 1] [--threads N] [--out outputs/benchmarks/train_step.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import peft  # imported before any memory baseline: it is part of the runtime, not of a method
import torch
from diffusers import UNet2DConditionModel
from lightning import Callback, Trainer
from lightning.fabric.utilities.warnings import PossibleUserWarning
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from conftrl.diffusion import DiffusionBase, assemble_base
from conftrl.diffusion.sdxl import SDXL_VAE_SCALING
from conftrl.diffusion.tiny import TinySDXLSpec, TinySpec, build_tiny_pipeline, build_tiny_sdxl_pipeline
from conftrl.training.methods import (
    PAPER_UNET_TARGETS, Adapted, ControlNetMethod, ControlOnlyMethod, FullMethod, LoRAMethod, Method, OFTMethod,
)
from conftrl.training.module import ControlModule

from measure import PeakMemory, device_name, in_fresh_process, markdown_table, round_robin, synchronize
from sd_models import (
    SD100M_UNET, SD_TOKENS, SD_VAE_CHANNELS, SDXL_UNET, sd_text_encoder, sd_unet, sd_vae, sdxl_text_encoder_2,
)

CAPTION = "a red circle left of a blue square"


@dataclass(frozen=True)
class Workload:
    """A random base model and the batch one training step of it sees."""

    name: str
    batch: int
    resolution: int
    gradient_checkpointing: bool = False
    spec: Optional[TinySpec] = None  # a tiny base; None: SD-shaped (VAE, CLIP text encoder, `unet`)
    unet: dict = field(default_factory=dict)  # UNet2DConditionModel arguments; {} is SD 1.5's UNet
    vae_width_divisor: int = 1  # SD's VAE channels divided by this
    sdxl: bool = False  # SDXL's second text encoder and size conditioning (a tiny one for a TinySDXLSpec)
    # Fewer layers in each text encoder (None: their own). The widths the UNet sees stay, the
    # frozen encoders' share of a step is small, and SDXL's 3.3 GB of them then fit a CPU machine.
    text_encoder_layers: Optional[int] = None


WORKLOADS = {
    # The default experiment's data: ShapesWorld, batch 64 at 64 px.
    "tiny": Workload("tiny", batch=64, resolution=TinySpec().resolution, spec=TinySpec()),
    # A quarter-width VAE: at full width its 256 px encode alone takes three times the UNet's
    # step on a CPU core, and the benchmark compares UNet adapters.
    "sd100m": Workload("sd100m", batch=2, resolution=256, unet=SD100M_UNET, vae_width_divisor=4),
    "sd15": Workload("sd15", batch=16, resolution=512, gradient_checkpointing=True),
    # SDXL's UNet, VAE and both text encoders at its native 1024 px, as `model=sdxl` trains (for a GPU).
    "sdxl": Workload("sdxl", batch=4, resolution=1024, gradient_checkpointing=True, unet=SDXL_UNET, sdxl=True),
}


@dataclass(frozen=True)
class Settings:
    """How every method's steps run: device, precision, steps timed after warm-up, torch threads."""

    device: str = "cpu"
    precision: str = "fp32"
    repeats: int = 5
    warmup: int = 2
    threads: int = 1
    rounds: int = 1  # passes over the method list; each method runs once per pass


PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed"}  # bf16: autocast, fp32 weights, as trainer=gpu
ACCELERATORS = {"cpu": "cpu", "cuda": "gpu"}


# --- models -----------------------------------------------------------------------------------


def random_base(workload: Workload) -> DiffusionBase:
    """The workload's architecture with random weights, frozen as `load_base` leaves a base.

    An SD- or SDXL-shaped base takes the tiny pipeline's tokenizer (at 77 tokens) and noise
    schedule, which are SD's; their cost does not depend on the vocabulary."""
    if workload.sdxl:
        parts = build_tiny_sdxl_pipeline(workload.spec or TinySDXLSpec(max_tokens=SD_TOKENS)).components
    else:
        parts = build_tiny_pipeline(workload.spec or TinySpec(max_tokens=SD_TOKENS)).components
    if workload.spec is None:
        parts["unet"] = sd_unet(workload.resolution // 2 ** (len(SD_VAE_CHANNELS) - 1), **workload.unet)
        sdxl_vae = {"scaling_factor": SDXL_VAE_SCALING} if workload.sdxl else {}
        parts["vae"] = sd_vae(workload.vae_width_divisor, workload.resolution, **sdxl_vae)
        depth = {"layers": workload.text_encoder_layers} if workload.text_encoder_layers else {}
        parts["text_encoder"] = sd_text_encoder(parts["tokenizer"], **depth)
        if workload.sdxl:
            parts["text_encoder_2"] = sdxl_text_encoder_2(parts["tokenizer"], **depth)
    return assemble_base(Path(f"random-{workload.name}"), parts)


def random_batch(workload: Workload) -> dict:
    """What the datamodule yields: images in [-1, 1], binary (edge-like) controls in [0, 1],
    captions, and each image's size and crop (uncropped images of the training size)."""
    generator = torch.Generator().manual_seed(0)
    shape = (workload.batch, 3, workload.resolution, workload.resolution)
    return {
        "image": torch.rand(shape, generator=generator) * 2 - 1,
        "control": torch.rand(shape, generator=generator).round(),
        "caption": [CAPTION] * workload.batch,
        "original_size": torch.tensor([[workload.resolution] * 2] * workload.batch),
        "crop_top_left": torch.zeros(workload.batch, 2, dtype=torch.long),
    }


# --- methods ----------------------------------------------------------------------------------


@dataclass
class PeftOFTMethod(Method):
    """PEFT's OFT, for this comparison only (it is no conftrl method).

    In PEFT's OFTConfig, as in conftrl's, `r` is the number of blocks per layer
    (r × oft_block_size = in_features; oft_block_size=0 selects r), so r = 4 gives every
    target layer of input size d blocks of d/4, the same as conftrl's r = 4, and the same
    number of trainable parameters. Exact Cayley (`use_cayley_neumann=False`; PEFT's default
    is its Neumann approximation), no COFT, as `oft`."""

    name: str = "peft_oft"
    control_path: str = "conv_in"
    r: int = 4

    def adapt(self, base: DiffusionBase) -> Adapted:
        config = peft.OFTConfig(
            r=self.r, oft_block_size=0, use_cayley_neumann=False, target_modules=list(PAPER_UNET_TARGETS)
        )
        peft.inject_adapter_in_model(config, base.unet)
        for name, parameter in base.unet.named_parameters():
            parameter.requires_grad_("oft_" in name)
        return {"unet": base.unet}


def adapter_parameters(method: Method, unet_config) -> int:
    """UNet parameters `method` trains, counted on a weightless (meta-device) copy of the UNet."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config).requires_grad_(False)
    # A method that leaves the text encoder frozen reads nothing but the UNet of its base.
    method.adapt(DiffusionBase(path=None, unet=unet, vae=None, text_encoder=None, tokenizer=None, noise_scheduler=None))
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


def lora_rank_matching_oft(unet: UNet2DConditionModel) -> int:
    """The LoRA rank whose parameter count is nearest conftrl OFT r = 4's (LoRA's grows linearly in r)."""
    oft, per_rank = (adapter_parameters(m, unet.config) for m in (OFTMethod(coft=False), LoRAMethod(r=1)))
    return max(1, round(oft / per_rank))


METHODS: dict[str, Callable[[UNet2DConditionModel], Method]] = {
    "floor": lambda unet: ControlOnlyMethod(control_path="conv_in"),
    "oft": lambda unet: OFTMethod(name="oft", r=4, coft=False, use_cayley_neumann=False),
    "coft": lambda unet: OFTMethod(name="coft", r=4, coft=True, eps=1e-3, use_cayley_neumann=False),
    "peft_oft": lambda unet: PeftOFTMethod(),
    "peft_lora": lambda unet: LoRAMethod(name="peft_lora", r=lora_rank_matching_oft(unet)),
    "controlnet": lambda unet: ControlNetMethod(),
    "full": lambda unet: FullMethod(),
}


# --- one method, measured -----------------------------------------------------------------------


class StepTimes(Callback):
    """Wall time of every training batch, from Lightning's batch start (after the batch reached
    the device) to its end (after `optimizer.step()`)."""

    def __init__(self, device: str):
        self.device = device
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        synchronize(self.device)
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        synchronize(self.device)
        self.times.append(time.perf_counter() - self.start)


def trainable(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def fit(module: ControlModule, workload: Workload, settings: Settings, steps: int, callbacks=()) -> None:
    """`steps` optimizer steps of `module` on the workload's batch, as the trainer config runs them."""
    trainer = Trainer(
        accelerator=ACCELERATORS[settings.device], devices=1, precision=PRECISIONS[settings.precision],
        max_steps=steps, gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=list(callbacks),
    )
    # batch_size=None: the loader hands over the ready batch as it is, `steps` times.
    trainer.fit(module, train_dataloaders=DataLoader([random_batch(workload)] * steps, batch_size=None))


def measure_method(workload: Workload, method_name: str, settings: Settings) -> dict:
    """Fit `method_name` on `workload` for warm-up + repeated steps in this process."""
    torch.set_num_threads(settings.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=PossibleUserWarning)  # few batches, no workers: wanted
    timer = StepTimes(settings.device)
    with PeakMemory(settings.device) as memory:
        with torch.device(settings.device):
            base = random_base(workload)
            unet_parameters = sum(p.numel() for p in base.unet.parameters())
            method = METHODS[method_name](base.unet)
            module = ControlModule(base, method, workload.gradient_checkpointing)
        fit(module, workload, settings, settings.warmup + settings.repeats, callbacks=[timer])
    times = timer.times[settings.warmup:]
    # One more step, untimed and after the memory peak: the dispatch mode slows every op.
    with FlopCounterMode(display=False) as flop_counter:
        fit(module, workload, settings, 1)
    return {
        "method": method_name,
        "trainable_parameters": module.num_trainable_parameters,
        "trainable_unet_parameters": trainable(module.unet),
        "unet_parameters": unet_parameters,
        **({"lora_rank": method.r} if isinstance(method, LoRAMethod) else {}),
        "median_s": statistics.median(times),
        "step_times_s": times,
        "flops": flop_counter.get_total_flops(),
        "peak_memory_bytes": memory.bytes,
        "device_name": device_name(settings.device),
        "threads": torch.get_num_threads(),
    }


# --- ratios -----------------------------------------------------------------------------------


def add_ratios(results: list[dict]) -> None:
    """Each method's time, work and memory over the floor's of the same run (None without a floor)."""
    floor = next((r for r in results if r["method"] == "floor"), None)
    for result in results:
        result["ratio_to_floor"] = result["median_s"] / floor["median_s"] if floor else None
        result["flops_ratio_to_floor"] = result["flops"] / floor["flops"] if floor else None
        result["memory_ratio_to_floor"] = (
            result["peak_memory_bytes"] / floor["peak_memory_bytes"] if floor and floor["peak_memory_bytes"] else None
        )


def run_method(workload: Workload, method: str, settings: Settings, isolated: bool) -> dict:
    """The method's result; in a fresh process when `isolated`, where a failure (say, out of
    memory) is recorded as the result so the other methods still run."""
    if not isolated:
        return measure_method(workload, method, settings)
    try:
        return in_fresh_process(measure_method, workload, method, settings)
    except Exception as error:
        return {"method": method, "error": f"{type(error).__name__}: {error}"}


def pooled(runs: list[dict]) -> dict:
    """One method's result over its rounds: the median of all timed steps and of the peaks.

    Rounds alternate the methods, so a slow spell on a shared machine falls on all of them
    instead of on whichever method happened to run then."""
    failed = next((r for r in runs if "error" in r), None)
    if failed or len(runs) == 1:
        return failed or runs[0]
    times = [t for r in runs for t in r["step_times_s"]]
    peak = statistics.median(r["peak_memory_bytes"] for r in runs)
    return {**runs[0], "median_s": statistics.median(times), "step_times_s": times, "peak_memory_bytes": peak,
            "rounds": len(runs)}


def benchmark(
    workload: Workload, methods: list[str], settings: Settings, isolated: bool = True
) -> Iterator[tuple[str, dict]]:
    """Yields the method just run and the workload's entry (one dict, growing), round after round."""
    entry = {**dataclasses.asdict(workload), "spec": None, "results": []}
    if workload.spec is not None:
        entry["spec"] = {k: v for k, v in dataclasses.asdict(workload.spec).items() if k != "words"}
    runs: dict[str, list[dict]] = {}
    for method in round_robin(methods, settings.rounds):
        runs.setdefault(method, []).append(run_method(workload, method, settings, isolated))
        entry["results"] = [pooled(method_runs) for method_runs in runs.values()]
        add_ratios([r for r in entry["results"] if "error" not in r])
        yield method, entry


# --- report -----------------------------------------------------------------------------------


def ratio(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.2f}"


COLUMNS = ("method", "trainable", "of which UNet", "step (s)", "× floor", "GFLOP", "× floor", "peak memory (MiB)",
           "× floor")


def result_row(r: dict) -> list[str]:
    if "error" in r:
        return [r["method"], f"failed: {r['error'][:200]}", *[""] * (len(COLUMNS) - 2)]
    return [
        r["method"], f"{r['trainable_parameters']:,}", f"{r['trainable_unet_parameters']:,}", f"{r['median_s']:.3f}",
        ratio(r["ratio_to_floor"]), f"{r['flops'] / 1e9:,.0f}", ratio(r["flops_ratio_to_floor"]),
        f"{r['peak_memory_bytes'] / 2**20:,.0f}", ratio(r["memory_ratio_to_floor"]),
    ]


def workload_markdown(entry: dict) -> list[str]:
    measured = {r["method"]: r for r in entry["results"] if "error" not in r}
    unet = next(iter(measured.values()), {}).get("unet_parameters", 0)
    lines = [
        f"### {entry['name']}: UNet {unet / 1e6:.1f} M parameters, batch {entry['batch']} at {entry['resolution']} px, "
        f"gradient checkpointing {'on' if entry['gradient_checkpointing'] else 'off'}"
        + (f", text encoders cut to {entry['text_encoder_layers']} layers" if entry.get("text_encoder_layers") else ""),
        "",
    ]
    if {"oft", "peft_lora"} <= measured.keys():
        lora, oft = measured["peft_lora"], measured["oft"]
        lines += [
            f"peft_lora rank {lora['lora_rank']}: {lora['trainable_unet_parameters']:,} UNet parameters "
            f"against oft's {oft['trainable_unet_parameters']:,}.",
            "",
        ]
    return [*lines, *markdown_table(COLUMNS, map(result_row, entry["results"])), ""]


def rounds_text(rounds: int) -> str:
    return "" if rounds == 1 else (
        f", in each of {rounds} rounds that alternate the methods, each round starting one method later "
        "(medians pooled)"
    )


def to_markdown(report: dict) -> str:
    measured = [r for e in report["workloads"] for r in e["results"] if "error" not in r]
    load = report["load_average"]
    lines = [
        f"{measured[0]['device_name'] if measured else report['device']}, torch {report['torch']}, "
        f"{report['precision']}, {report['threads']} threads on {report['cpu_count']} CPUs, load average "
        f"{load['start'][0]:.1f} at start and {load['end'][0]:.1f} at end; median of {report['repeats']} steps "
        f"after {report['warmup']} warm-up{rounds_text(report.get('rounds', 1))}. Peak memory: CUDA's max "
        "allocated, or the resident-set peak above the interpreter's, each method in a fresh process. GFLOP: "
        "one more step under torch's FlopCounterMode (matmuls, convolutions and attention, forward and "
        "backward; not LU solves or elementwise work), the same in every round.",
        "",
    ]
    for entry in report["workloads"]:
        lines += workload_markdown(entry)
    return "\n".join(lines)


def progress_line(entry: dict, method: str) -> str:
    """The method's pooled result so far."""
    r = next(r for r in entry["results"] if r["method"] == method)
    if "error" in r:
        return f"{entry['name']:7s} {r['method']:10s} failed: {r['error']}"
    return (f"{entry['name']:7s} {r['method']:10s} {r['median_s']:8.3f} s  x{ratio(r['ratio_to_floor'])}  "
            f"{r['peak_memory_bytes'] / 2**20:8.0f} MiB")


def save(report: dict, out: Path) -> None:
    report["load_average"]["end"] = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(to_markdown(report))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(WORKLOADS), default=["tiny", "sd100m"])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--device", choices=list(ACCELERATORS), default="cpu")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="fp32")
    parser.add_argument("--batch", type=int, help="batch size (default: the model's)")
    parser.add_argument("--resolution", type=int, help="image side in pixels (default: the model's)")
    parser.add_argument("--text-encoder-layers", type=int, help="layers of each text encoder (default: their own)")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                        help="default: as the model trains (on for sd15 only)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the method list this many times over, each method once per round, and pool")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks/train_step.json"))
    return parser.parse_args()


def configured(workload: Workload, args: argparse.Namespace) -> Workload:
    """`workload` with the sizes given on the command line."""
    overrides = {
        "batch": args.batch, "resolution": args.resolution, "gradient_checkpointing": args.gradient_checkpointing,
        "text_encoder_layers": args.text_encoder_layers,
    }
    return dataclasses.replace(workload, **{k: v for k, v in overrides.items() if v is not None})


def main() -> None:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings(args.device, args.precision, args.repeats, args.warmup, torch.get_num_threads(), args.rounds)
    report = {
        "benchmark": "train_step", "torch": torch.__version__, **dataclasses.asdict(settings),
        "cpu_count": os.cpu_count(), "load_average": {"start": os.getloadavg(), "end": os.getloadavg()},
        "workloads": [],
    }

    for name in args.models:
        report["workloads"].append({})
        for method, entry in benchmark(configured(WORKLOADS[name], args), args.methods, settings):
            report["workloads"][-1] = entry
            print(progress_line(entry, method), flush=True)
            save(report, args.out)
    print(to_markdown(report))


if __name__ == "__main__":
    main()
