"""What every benchmark shares: the machine it ran on, timing with warm-up and repeats, the
order in which compared methods take turns, peak memory, and Markdown tables.

The benchmarks are scripts run as `python benchmarks/<name>.py`; Python puts their folder
first on the import path, which is how they import this module (the tests name the folder in
pytest's `pythonpath`).
"""

from __future__ import annotations

import multiprocessing
import os
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (the processor type where it does not)."""
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
              if line.startswith("model name")] if cpuinfo.is_file() else []
    return models[0] if models else platform.processor() or platform.machine()


def device_name(device: str) -> str:
    """The GPU's name for a CUDA device, else the CPU's model."""
    return torch.cuda.get_device_name() if device.startswith("cuda") else cpu_model()


def machine() -> dict:
    """Where a wall time was measured: the CPU, its cores and torch (threads are each run's)."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__}


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so that a wall-clock interval holds what it launched."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def seconds(call: Callable[[], object], device: str = "cpu") -> float:
    """Wall time of one `call()`, the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    call()
    synchronize(device)
    return time.perf_counter() - start


def repeated(call: Callable[[], object], repeats: int, warmup: int = 0, device: str = "cpu") -> list[float]:
    """Wall times of `repeats` calls after `warmup` untimed ones (caches, allocator, kernels)."""
    for _ in range(warmup):
        call()
    return [seconds(call, device) for _ in range(repeats)]


def round_robin(names: Sequence[str], rounds: int) -> Iterator[str]:
    """The names once per round, each round starting one name later.

    Compared methods alternate so that a slow spell on a shared machine falls on all of them,
    and rotate so that none keeps one place in the order: in a fixed order the method run
    right after another's warm state reads differently. Over len(names) rounds every name
    holds every place once."""
    for round_index in range(rounds):
        start = round_index % len(names)
        yield from list(names[start:]) + list(names[:start])


def interleaved(
    calls: dict[str, Callable[[], object]], rounds: int, warmup: int = 0, device: str = "cpu"
) -> dict[str, list[float]]:
    """Each call's wall times over `rounds` rounds of `round_robin`, after `warmup` untimed
    calls of each."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for name in round_robin(list(calls), rounds):
        times[name].append(seconds(calls[name], device))
    return times


class PeakMemory:
    """The most memory this process held inside the block, above what it held on entering it.

    GPU: `torch.cuda.max_memory_allocated` after resetting the peak (the CUDA context is not
    counted). CPU: the kernel's resident-set high-water mark, VmHWM of /proc/self/status,
    minus the RSS on entry (the interpreter and imported libraries). Not getrusage's
    ru_maxrss: Linux carries that over exec from the parent, so a child started by a large
    parent would report the parent's peak. Run in a fresh process (`in_fresh_process`), the
    mark is this block's.
    """

    def __init__(self, device: str):
        self.device, self.bytes = device, 0

    def _now(self, peak: bool) -> int:
        if self.device == "cuda":
            return torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()
        key = "VmHWM:" if peak else "VmRSS:"
        line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(key))
        return int(line.split()[1]) * 1024

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.start = self._now(peak=False)
        return self

    def __exit__(self, *exc) -> None:
        self.bytes = self._now(peak=True) - self.start


def in_fresh_process(function: Callable, *args):
    """`function(*args)` in a new interpreter (spawn, not fork), so its memory high-water mark,
    allocator caches and CUDA context belong to this call alone."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]], align: str = "") -> list[str]:
    """A Markdown table's lines; `align` holds one letter per column, `r` right-aligning it
    (columns past its end are left as Markdown's default)."""
    rule = ["---:" if letter == "r" else "---" for letter in align.ljust(len(header))]
    return [" ".join(["|", " | ".join(header), "|"]), "|" + "|".join(rule) + "|",
            *(" ".join(["|", " | ".join(str(cell) for cell in row), "|"]) for row in rows)]
