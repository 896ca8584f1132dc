"""Sample-based evaluation, shared by the training callbacks and `conftrl.evaluate`: which
items are scored, how their samples are drawn, how samples and real images are scored."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from conftrl.control.inputs import control_from_file
from conftrl.metrics import energy_summary
from conftrl.utils.images import image_grid, to_uint8

# (prompts, control B×3×H×W in [0, 1], seeds) -> uint8 images B×H×W×3, e.g.
# `functools.partial(module.sample, **sampling)`; every caller ends in `sample_images`.
Sampler = Callable[[list[str], torch.Tensor, list[int]], np.ndarray]
Scorer = Callable[[np.ndarray, dict], dict[str, float]]


def first_items(batches: Iterable[dict], count: int) -> dict:
    """The first `count` samples of a dataloader as one batch dict (fixed across a run); empty
    when the dataloader yields nothing (a streamed split can turn out empty)."""
    taken, seen = [], 0
    for batch in batches:
        taken.append(batch)
        seen += len(batch["caption"])
        if seen >= count:
            break
    merged = {}
    for key in taken[0] if taken else ():
        values = [b[key] for b in taken]
        merged[key] = torch.cat(values)[:count] if isinstance(values[0], torch.Tensor) else sum(values, [])[:count]
    return merged


def paired_prompts(images: list[str] | None, prompts: list[str] | None) -> list[tuple[str, str]]:
    """(image, prompt) pairs, paired as diffusers' ControlNet script pairs `--validation_image`
    and `--validation_prompt`: as many of each, one image for every prompt, or one prompt for
    every image. Neither given: no pairs."""
    if images is None and prompts is None:
        return []
    if not images or not prompts:
        raise ValueError("validation.images and validation.prompts go together: set both, or neither")
    if len(images) == len(prompts):
        return list(zip(images, prompts))
    if len(images) == 1:
        return [(images[0], prompt) for prompt in prompts]
    if len(prompts) == 1:
        return [(image, prompts[0]) for image in images]
    raise ValueError(
        f"{len(images)} validation.images and {len(prompts)} validation.prompts: give one image for all "
        "prompts, one prompt for all images, or as many of each"
    )


def chosen_items(images: list[str], prompts: list[str], annotator, resolution: int) -> dict:
    """Chosen validation items as a batch dict (``control``, ``caption``): each image is
    annotated as `conftrl.generate` annotates its control image (a photo becomes its control,
    a control image is used as given), and resized and centre-cropped to `resolution`.
    Raises `datamodules.BadSampleError` naming a file that is missing or unreadable."""
    pairs = paired_prompts(images, prompts)
    controls = {path: control_from_file(path, annotator, resolution) for path in dict.fromkeys(images)}
    return {"control": torch.cat([controls[image] for image, _ in pairs]), "caption": [prompt for _, prompt in pairs]}


def _chunks(items: dict, size: int):
    for start in range(0, len(items["caption"]), size):
        yield start, {key: value[start : start + size] for key, value in items.items()}


def sample_grid(sample: Sampler, items: dict, seeds: list[int]) -> np.ndarray:
    """One row per item: its control, then one sample per seed for its caption."""
    n, captions = len(seeds), items["caption"]
    images = sample(
        [c for c in captions for _ in range(n)], items["control"].repeat_interleave(n, 0), list(seeds) * len(captions)
    )
    controls = to_uint8(items["control"])
    return image_grid([[controls[i], *images[i * n : (i + 1) * n]] for i in range(len(captions))])


def mean_scores(scores: list[dict[str, float]], weights: list[int]) -> dict[str, float]:
    """Each score's mean over groups of items, weighted by the groups' sizes."""
    return {name: float(np.average([s[name] for s in scores], weights=weights)) for name in scores[0]}


def fidelity(sample: Sampler, items: dict, score: Scorer, batch_size: int, first_index: int = 0) -> dict[str, float]:
    """Mean control-fidelity scores of one sample per item (seed = the item's index; the items
    may be a share of a larger set that begins at `first_index`)."""
    scores, sizes = [], []
    for start, part in _chunks(items, batch_size):
        count = len(part["caption"])
        seeds = list(range(first_index + start, first_index + start + count))
        scores.append(score(sample(part["caption"], part["control"], seeds), part))
        sizes.append(count)
    return mean_scores(scores, sizes)


@torch.no_grad()
def vae_round_trip(vae: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] encoded (posterior mean) and decoded again, as a generator that
    decodes through `vae` could at best produce them."""
    weight = next(vae.parameters())
    images = images.to(weight.device, weight.dtype)
    return vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1).float().cpu()


def fidelity_ceiling(items: dict, score: Scorer, batch_size: int, vae: nn.Module | None = None) -> dict[str, float]:
    """The same scores for the items' real images: the best a generator can be credited with.
    With `vae`, the images go through its round trip first: the best a generator that decodes
    through that VAE can be credited with (for canny, the edges it blurs away are lost to all)."""
    scores, sizes = [], []
    for _, part in _chunks(items, batch_size):
        images = part["image"] if vae is None else vae_round_trip(vae, part["image"])
        scores.append(score(to_uint8(images, value_range=(-1, 1)), part))
        sizes.append(len(part["caption"]))
    return mean_scores(scores, sizes)


def energy_change(unet: nn.Module, reference: nn.Module) -> dict[str, float]:
    """Relative change of the UNet's hyperspherical energy against the frozen base's, in total
    and for the layer that moved most (OFT keeps both near 0, additive updates do not)."""
    summary = energy_summary(unet, reference=reference)
    return {
        "rel_change_total": summary.relative_change_total,
        "rel_change_max_abs": max(map(abs, summary.relative_change.values())),
    }
