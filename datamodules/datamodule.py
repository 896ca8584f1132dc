"""LightningDataModules: ShapesWorld and image folders, sharing one pipeline.

Both take the annotator object (from ``conf/annotator``) and the common settings of
`ControlDataModule`; each adds only what describes its data.
"""

from __future__ import annotations

import warnings
from typing import Annotated, Literal

import lightning as L
import torch
from annotated_types import Ge, Interval
from pydantic import DirectoryPath
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from datamodules.dataset import ON_BAD_SAMPLE, ControlDataset, EpochSampler, collate, seed_worker
from datamodules.errors import EmptySplitError
from datamodules.folders import FORMATS, FolderSource, index_folder, split_records
from datamodules.shapesworld import ShapesWorld, WorldSpec
from datamodules.transforms import CROPS, PairedTransform

_STAGE_SPLITS = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": (),
    None: ("train", "val", "test"),
}

# torchdata's loader calls torch.set_vital, which newer torch deprecates with a warning per loader.
warnings.filterwarnings("ignore", "'set_vital' is deprecated", UserWarning)

# Constraints of the arguments, read by the config validation (conftrl.config.schema) as well.
Probability = Annotated[float, Interval(ge=0, le=1)]
Count = Annotated[int, Ge(1)]


class ControlDataModule(L.LightningDataModule):
    """Batches of ``image``, ``control``, ``caption`` (and metadata) for training a control.

    Args:
        annotator: turns a sample into its control image (`datamodules.annotators`).
        resolution: side of the square training images, in pixels.
        batch_size, num_workers: as for `torch.utils.data.DataLoader`.
        seed: fixes shuffling, augmentation and caption dropout (and ShapesWorld's scenes).
        proportion_empty_prompts: share of training captions replaced by "" (classifier-free guidance).
        on_bad_sample: "error" raises `BadSampleError` naming the file and the problem;
            "skip" drops it at setup or substitutes the next sample at load time, and logs counts.
        crop: "random" or "center" square crop of training images (evaluation always centres).
        flip_probability: chance of a horizontal flip of a training sample.
    """

    def __init__(
        self,
        annotator,
        resolution: Annotated[int, Ge(8)] = 512,
        batch_size: Count = 4,
        num_workers: Annotated[int, Ge(0)] = 0,
        seed: int = 0,
        proportion_empty_prompts: Probability = 0.0,
        on_bad_sample: Literal[ON_BAD_SAMPLE] = "error",
        crop: Literal[CROPS] = "random",
        flip_probability: Probability = 0.0,
    ):
        super().__init__()
        self.annotator = annotator
        self.resolution, self.batch_size, self.num_workers, self.seed = resolution, batch_size, num_workers, seed
        self.proportion_empty_prompts, self.on_bad_sample = proportion_empty_prompts, on_bad_sample
        self.train_transform = PairedTransform(resolution, crop, flip_probability)
        self.eval_transform = PairedTransform(resolution, "center")
        self.datasets: dict[str, ControlDataset] = {}

    def make_source(self, split: str):
        """The samples of `split` ("train", "val" or "test") as a sequence of dicts."""
        raise NotImplementedError

    def split_settings(self) -> str:
        """The settings that sized the splits, for messages."""
        return ""

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets of `stage`. Its own split (train to fit, val to validate, test to
        test) must hold samples; fit's validation split is empty only when configured so."""
        for split in _STAGE_SPLITS[stage]:
            if split in self.datasets:
                continue
            train = split == "train"
            source = self.make_source(split)
            if len(source) == 0 and stage is not None and split == _STAGE_SPLITS[stage][0]:
                raise EmptySplitError(f"{type(self).__name__}: the {split} split is empty{self.split_settings()}")
            self.datasets[split] = ControlDataset(
                source,
                self.annotator,
                self.train_transform if train else self.eval_transform,
                seed=self.seed,
                train=train,
                proportion_empty_prompts=self.proportion_empty_prompts,
                on_bad_sample=self.on_bad_sample,
            )

    def train_dataloader(self) -> StatefulDataLoader:
        """Resumable: Lightning checkpoints how many batches of the epoch this process has
        taken and, resumed mid-epoch, the loader skips exactly those (each rank its own share,
        under DDP) instead of starting the epoch over."""
        dataset = self.datasets["train"]
        return self._loader(dataset, sampler=EpochSampler(len(dataset), self.seed, shuffle=True), stateful=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["val"])

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["test"])

    def _loader(self, dataset: ControlDataset, sampler=None, stateful: bool = False) -> DataLoader:
        return (StatefulDataLoader if stateful else DataLoader)(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate,
            worker_init_fn=seed_worker,
            generator=torch.Generator().manual_seed(self.seed),
            persistent_workers=self.num_workers > 0,
        )


class ShapesWorldDataModule(ControlDataModule):
    """ShapesWorld (`datamodules.shapesworld`): rendered at `resolution`, never cropped or
    flipped (scene descriptions keep their positions), with exact ``depth``, ``labels`` and
    ``scene`` in every batch. Split lengths and the `WorldSpec` knobs are arguments.
    """

    def __init__(
        self,
        annotator,
        num_train: Count = 10_000,
        num_val: Count = 256,
        num_test: Annotated[int, Ge(0)] = 256,
        shapes=WorldSpec.shapes,
        shape_colors=WorldSpec.shape_colors,
        background_colors=WorldSpec.background_colors,
        min_shapes: Count = WorldSpec.min_shapes,
        max_shapes: Count = WorldSpec.max_shapes,
        min_size: Annotated[float, Interval(gt=0, le=1)] = WorldSpec.min_size,
        max_size: Annotated[float, Interval(gt=0, le=1)] = WorldSpec.max_size,
        min_visible: Probability = WorldSpec.min_visible,
        **common,
    ):
        super().__init__(annotator, **common, crop="center", flip_probability=0.0)
        self.lengths = {"train": num_train, "val": num_val, "test": num_test}
        self.spec = WorldSpec(
            shapes, shape_colors, background_colors, min_shapes, max_shapes, min_size, max_size, min_visible
        )
        source_map = annotator.source_map
        if source_map is not None and source_map not in ShapesWorld.provides and not annotator.estimates:
            raise ValueError(
                f"ShapesWorld supplies {sorted(ShapesWorld.provides)} maps, not {source_map!r}, "
                f"so {type(annotator).__name__} cannot annotate it"
            )

    def split_settings(self) -> str:
        return f" (num_train={self.lengths['train']}, num_val={self.lengths['val']}, num_test={self.lengths['test']})"

    def make_source(self, split: str) -> ShapesWorld:
        return ShapesWorld(split, self.lengths[split], self.resolution, self.seed, self.spec)


class FolderDataModule(ControlDataModule):
    """An image folder (`datamodules.folders`), split into train/val/test by a hash of each
    file's path; checked once at setup.

    Args:
        root: the folder.
        format: "auto", "imagefolder", "controlnet" or "txt".
        val_fraction, test_fraction: expected shares of the val and test splits.
    """

    def __init__(
        self,
        annotator,
        root: DirectoryPath,
        format: Literal[FORMATS] = "auto",
        val_fraction: Annotated[float, Interval(ge=0, lt=1)] = 0.05,
        test_fraction: Annotated[float, Interval(ge=0, lt=1)] = 0.0,
        **common,
    ):
        super().__init__(annotator, **common)
        self.root, self.format = root, format
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self._splits = None

    def split_settings(self) -> str:
        return f" in {self.root} (val_fraction={self.val_fraction}, test_fraction={self.test_fraction})"

    def make_source(self, split: str) -> FolderSource:
        if self._splits is None:
            source_map = self.annotator.source_map
            records = index_folder(
                self.root,
                self.format,
                source_map=source_map,
                map_required=source_map is not None and not self.annotator.estimates,
                on_bad_sample=self.on_bad_sample,
            )
            self._splits = split_records(records, self.val_fraction, self.test_fraction)
        return FolderSource(self._splits[split], self.annotator.source_map)
