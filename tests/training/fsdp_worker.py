"""One rank of the CPU FSDP check, started by torchrun (two gloo processes).

    python -m torch.distributed.run --nproc-per-node 2 tests/training/fsdp_worker.py BASE OUT

Builds the module of a COFT run on the tiny base, moves its rotations off the identity (the
same on every rank), and shards it as conf/trainer/fsdp.yaml does, with torch's FSDP on CPU
(Lightning's FSDPStrategy accepts GPUs only). Then, as the callbacks and `conftrl.train` do
under FSDP, every rank reads the layers' weights, samples and exports inside `whole_weights`,
and the energy monitor and the sample grid run; rank 0 writes what it read and an unsharded
copy's, for the test to compare.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from omegaconf import OmegaConf
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from conftrl.diffusion import load_base
from conftrl.metrics import layer_weights, rotation_stats
from conftrl.training.adapter import export_adapter
from conftrl.training.callbacks import EnergyMonitor, SampleGrid
from conftrl.training.methods import OFTMethod
from conftrl.training.module import ControlModule
from conftrl.training.sharding import is_sharded, whole_weights


def build(base_path: str) -> ControlModule:
    torch.manual_seed(0)
    module = ControlModule(load_base(base_path), OFTMethod(r=4))
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    return module


def read(model: torch.nn.Module, module: ControlModule, out: Path, name: str, write: bool) -> None:
    """Weights, rotation statistics, a sample and the adapter, read as the watchers and the export do."""
    control = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with whole_weights(model):
        weights = {k: v.detach().clone() for k, v in layer_weights(module.unet).items()}
        stats = rotation_stats(module.unet)
        if write:
            export_adapter(module, OmegaConf.create({"method": {"name": "coft"}}), out / f"adapter_{name}")
    # A forward pass under FSDP gives each unit back its shard after it: reading weights after
    # sampling needs a new gathering, as each watcher and the export take their own.
    with whole_weights(model):
        images = module.sample(["a red square", "a blue circle"], control, [0, 1], steps=2, cfg_scale=3.0)
    if write:
        torch.save({"weights": weights, "stats": stats, "images": torch.from_numpy(images)}, out / f"{name}.pt")

def watch(model: torch.nn.Module, module: ControlModule, out: Path, name: str) -> None:
    """The energy monitor's per-layer energies and the sample grid's image, taken by the
    callbacks themselves on a stand-in for the trainer, every rank taking part: unsharded,
    as under data parallelism (each rank measures a share of the layers, rank 0 samples)."""
    rank, ranks = dist.get_rank(), dist.get_world_size()
    trainer = SimpleNamespace(
        strategy=SimpleNamespace(model=model), global_rank=rank, world_size=ranks, is_global_zero=rank == 0,
        sanity_checking=False, global_step=0, loggers=[],
    )
    energies = EnergyMonitor._energies(trainer, module)
    grid = SampleGrid(2, [0, 1], {"steps": 2, "cfg_scale": 3.0}, str(out / f"grid_{name}"))
    grid.rows = {"caption": ["a red square", "a blue circle"], "control": torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))}
    grid.on_validation_epoch_end(trainer, module)
    if rank == 0:
        torch.save(energies, out / f"energies_{name}.pt")


def main(base_path: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, out = dist.get_rank(), Path(out)
    module = build(base_path)
    if rank == 0:
        read(module, module, out, "unsharded", write=True)
    watch(module, module, out, "unsharded")
    policy = ModuleWrapPolicy({BasicTransformerBlock, ResnetBlock2D})
    sharded = FullyShardedDataParallel(module, device_id=torch.device("cpu"), use_orig_params=True, auto_wrap_policy=policy)
    assert is_sharded(sharded)
    shard = sum(p.numel() for p in module.unet.parameters())
    whole = sum(p.numel() for p in build(base_path).unet.parameters())
    assert shard < whole, f"rank {rank} holds {shard} of {whole} weights: not sharded"
    read(sharded, module, out, "sharded", write=rank == 0)
    watch(sharded, module, out, "sharded")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
