"""From a source of samples to training tensors: annotate, transform, drop captions, collate.

Reproducibility does not depend on workers: every random choice for a training sample
(crop, flip, Canny thresholds, caption dropout) comes from a generator seeded with
``(seed, epoch, index)``. `EpochSampler` hands the dataset ``(index, epoch)`` keys, so the
same seed gives the same epochs with 0, 2 or 16 workers, and a resumed run (Lightning calls
``set_epoch``) continues where it stopped.

Bad samples under ``on_bad_sample: skip`` are replaced by the next good sample in index
order — deterministic, and the epoch keeps its length — and each replacement is logged with
a running count (per process: each worker counts its own).
"""

from __future__ import annotations

import logging
import random

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from datamodules.errors import BadSampleError

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_BAD = 100
ON_BAD_SAMPLE = ("error", "skip")


class SampleBuilder:
    """One raw sample (a dict from a source) to tensors: annotate, transform, drop the caption.

    `train` switches on random augmentation and caption dropout, drawn from a generator
    seeded with the `rng_key` of each call; evaluation samples are a fixed function of the
    sample. A caption given as a list (several per image) contributes one: a random one in
    training, the first otherwise.
    """

    def __init__(self, annotator, transform, *, seed: int = 0, train: bool = False, proportion_empty_prompts: float = 0.0):
        if not 0.0 <= proportion_empty_prompts <= 1.0:
            raise ValueError(f"proportion_empty_prompts must be in [0, 1], got {proportion_empty_prompts}")
        self.annotator, self.transform = annotator, transform
        self.seed, self.train, self.proportion_empty_prompts = int(seed), train, float(proportion_empty_prompts)

    def __call__(self, raw: dict, *rng_key: int) -> dict:
        rng = np.random.default_rng([self.seed, *rng_key]) if self.train else None
        sample = self.transform(self.annotator.prepare(raw), rng)
        image = sample["image"]
        control = self.annotator(image, sample, rng)
        if control.shape != image.shape or control.dtype != np.uint8:
            raise TypeError(
                f"{type(self.annotator).__name__} returned {control.dtype} {control.shape}; "
                f"the contract is uint8 {image.shape}"
            )
        caption = sample["caption"]
        if isinstance(caption, list):
            caption = caption[int(rng.integers(len(caption)))] if rng is not None else caption[0]
        if rng is not None and rng.random() < self.proportion_empty_prompts:
            caption = ""
        item = {
            "image": torch.from_numpy(image).permute(2, 0, 1).float().div_(127.5).sub_(1.0),
            "control": torch.from_numpy(control).permute(2, 0, 1).float().div_(255.0),
            "caption": caption,
            "key": sample["key"],
            "original_size": torch.tensor(sample["original_size"]),
            "crop_top_left": torch.tensor(sample["crop_top_left"]),
        }
        if "depth" in sample:
            item["depth"] = torch.from_numpy(np.asarray(sample["depth"], np.float32))[None]
        if "labels" in sample:
            item["labels"] = torch.from_numpy(np.asarray(sample["labels"], np.int64))
        if "scene" in sample:
            item["scene"] = sample["scene"]
        return item


class BadSampleCounter:
    """The ``on_bad_sample`` policy at load time: raise, or log the sample with a running count
    (per process: each worker counts its own)."""

    def __init__(self, on_bad_sample: str = "error"):
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"on_bad_sample must be one of {', '.join(ON_BAD_SAMPLE)}, got {on_bad_sample!r}")
        self.on_bad_sample, self.count = on_bad_sample, 0

    def __call__(self, err: BadSampleError, action: str, counted_as: str) -> None:
        """Raise `err`, or log it, what is done instead (`action`) and the count so far."""
        if self.on_bad_sample == "error":
            raise err
        self.count += 1
        log.warning("bad sample %s; %s (%d %s in this process)", err, action, self.count, counted_as)


class ControlDataset(Dataset):
    """Samples of `source` as tensors: ``image``, ``control``, ``caption``, ``key`` and any of
    ``depth``, ``labels``, ``scene`` that the source or annotator supplies (see `datamodules`),
    built by `SampleBuilder` with the random key ``(epoch, index)``.
    """

    def __init__(self, source, build: SampleBuilder, on_bad_sample: str = "error"):
        self.source, self.build = source, build
        self.bad_samples = BadSampleCounter(on_bad_sample)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        attempts = min(len(self), MAX_CONSECUTIVE_BAD)
        for offset in range(attempts):
            candidate = (index + offset) % len(self)
            try:
                return self.build(self.source[candidate], epoch, candidate)
            except BadSampleError as err:
                self.bad_samples(err, "using the next sample instead", "substituted")
        raise RuntimeError(f"{attempts} consecutive bad samples from index {index}; see the warnings above")


class EpochSampler(Sampler):
    """Yields ``(index, epoch)``: a permutation seeded by ``(seed, epoch)`` (or index order).

    The pass is the one ``set_epoch`` names (Lightning calls it at the start of every epoch, also
    through the sampler it wraps this in under DDP), so any number of ``iter`` calls yield the
    same pass. A new sampler starts in pass ``epoch``: a run resumed mid-epoch skips the batches
    it has taken by iterating before Lightning calls ``set_epoch``, so it must start in the
    resumed epoch's pass.
    """

    def __init__(self, length: int, seed: int = 0, shuffle: bool = True, epoch: int = 0):
        self.length, self.seed, self.shuffle = int(length), int(seed), shuffle
        self.epoch = int(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        order = range(self.length)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.length)
        return iter([(int(index), self.epoch) for index in order])


def collate(items: list[dict]) -> dict:
    """Stack tensors; keep strings and scene descriptions as lists."""
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        batch[key] = torch.stack(values) if torch.is_tensor(values[0]) else values
    return batch


def seed_worker(worker_id: int) -> None:
    """Seed a worker's global RNGs from its DataLoader seed.

    The pipeline's own randomness is per sample and needs none of this; it makes third-party
    randomness (estimators, user code) reproducible too. (It leaves OpenCV's thread count
    alone: `cv2.setNumThreads` in a forked worker deadlocks once the parent has used OpenCV.)
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    cv2.setRNGSeed(seed % 2**31)
