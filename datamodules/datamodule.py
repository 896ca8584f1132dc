"""LightningDataModules: ShapesWorld, image folders and Hugging Face datasets, sharing one pipeline.

Each takes the annotator object (from ``conf/annotator``) and the common settings of
`ControlDataModule`, and adds only what describes its data.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Annotated, Literal

import lightning as L
import torch
from annotated_types import Ge, Interval
from datasets.distributed import split_dataset_by_node
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from pydantic import DirectoryPath
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from datamodules import hf
from datamodules.dataset import ON_BAD_SAMPLE, ControlDataset, EpochSampler, SampleBuilder, collate, seed_worker
from datamodules.errors import BadSampleError, EmptySplitError
from datamodules.folders import FORMATS, FolderSource, index_folder
from datamodules.shapesworld import ShapesWorld, WorldSpec
from datamodules.splits import bands, split_records
from datamodules.transforms import CROPS, PairedTransform

log = logging.getLogger(__name__)

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
        self.datasets: dict[str, Dataset] = {}

    def make_source(self, split: str):
        """The samples of `split` ("train", "val" or "test") as a sequence of dicts."""
        raise NotImplementedError

    def split_settings(self) -> str:
        """The settings that sized the splits, for messages."""
        return ""

    def empty_split_error(self, split: str) -> EmptySplitError:
        return EmptySplitError(f"{type(self).__name__}: the {split} split is empty{self.split_settings()}")

    def sample_builder(self, split: str) -> SampleBuilder:
        """The pipeline of `split`: augmentation and caption dropout in training only."""
        train = split == "train"
        return SampleBuilder(
            self.annotator,
            self.train_transform if train else self.eval_transform,
            seed=self.seed,
            train=train,
            proportion_empty_prompts=self.proportion_empty_prompts,
        )

    def make_dataset(self, split: str, required: bool) -> Dataset:
        """The dataset of `split`; a `required` one must hold samples."""
        source = self.make_source(split)
        if len(source) == 0 and required:
            raise self.empty_split_error(split)
        return ControlDataset(source, self.sample_builder(split), self.on_bad_sample)

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets of `stage`. The train split must hold samples. A val or test
        split may be empty (configured so, e.g. `val_fraction=0`): Lightning then skips its
        loop, also in the processes ddp_spawn starts for a run's final validation. A command
        that reads one split says when it is empty (`conftrl.evaluate`)."""
        for split in _STAGE_SPLITS[stage]:
            if split not in self.datasets:
                self.datasets[split] = self.make_dataset(split, required=split == "train")

    def train_dataloader(self) -> DataLoader:
        """Resumable: Lightning checkpoints how many batches of the epoch this process has
        taken and, resumed mid-epoch, the loader skips exactly those (each rank its own share,
        under DDP) instead of starting the epoch over. A stream starts over.

        The skip runs before Lightning sets the resumed epoch on the sampler, so the sampler
        starts in the trainer's (restored) epoch, and is sharded over the ranks here, in order:
        Lightning's own sharding would shuffle the shards again by an epoch not yet set."""
        dataset = self.datasets["train"]
        if isinstance(dataset, IterableDataset):  # a stream shuffles itself; resumed, it starts over
            return self._loader(dataset)
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        sampler = EpochSampler(len(dataset), self.seed, shuffle=True, epoch=epoch)
        rank, world_size = self._rank()
        if world_size > 1:
            sampler = DistributedSamplerWrapper(sampler, num_replicas=world_size, rank=rank, shuffle=False)
        return self._loader(dataset, sampler=sampler, stateful=True)

    def _rank(self) -> tuple[int, int]:
        """(global rank, world size) as the trainer runs this process; (0, 1) without one."""
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["val"])

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["test"])

    def _loader(self, dataset: Dataset, sampler=None, stateful: bool = False) -> DataLoader:
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


class HFDataModule(ControlDataModule):
    """A Hugging Face `datasets` dataset (`datamodules.hf`), named as diffusers' ControlNet
    training script names it: `dataset_name` (a hub name or a local dataset) or
    `train_data_dir` (a local folder), and the image, conditioning image and caption columns.

    The control comes from `conditioning_image_column` when the annotator reads a given
    control image (``annotator=precomputed``); any other annotator computes it from the image.
    Validation and test use the dataset's own ``validation`` and ``test`` splits; where it has
    none, `val_fraction` / `test_fraction` of the train split, chosen by a hash of each image.

    Args:
        streaming: read rows as they are needed instead of preparing the dataset on disk
            first (for sets larger than memory or disk); each DDP rank reads its own rows
            (`datasets.distributed.split_dataset_by_node`, with the trainer's rank and world
            size); training rows are shuffled in a buffer of `shuffle_buffer_size`.
        cache_dir: where `datasets` keeps what it prepares (its default when None).
    """

    def __init__(
        self,
        annotator,
        dataset_name: str | None = None,
        train_data_dir: str | None = None,
        dataset_config_name: str | None = None,
        image_column: str = "image",
        conditioning_image_column: str | None = "conditioning_image",
        caption_column: str = "text",
        streaming: bool = False,
        shuffle_buffer_size: Count = 1000,
        val_fraction: Annotated[float, Interval(ge=0, lt=1)] = 0.05,
        test_fraction: Annotated[float, Interval(ge=0, lt=1)] = 0.0,
        cache_dir: str | None = None,
        **common,
    ):
        super().__init__(annotator, **common)
        if (dataset_name is None) == (train_data_dir is None):
            raise ValueError(
                "set one of data.dataset_name (a hub name or a local dataset) and data.train_data_dir (a local "
                f"folder), got dataset_name={dataset_name!r}, train_data_dir={train_data_dir!r}"
            )
        if annotator.source_map in ("depth", "labels") and not annotator.estimates:
            raise ValueError(
                f"data=hf supplies images and control images, not {annotator.source_map} maps, so "
                f"{type(annotator).__name__} needs an estimator (e.g. annotator=depth_dnn)"
            )
        self.location, self.local_only = train_data_dir or dataset_name, train_data_dir is not None
        hf.local_folder(self.location, self.local_only)  # a missing folder fails before the model loads
        self.dataset_config_name, self.cache_dir = dataset_config_name, cache_dir
        reads_control = annotator.source_map == "control"
        self.columns = hf.Columns(image_column, caption_column, conditioning_image_column if reads_control else None)
        if reads_control and conditioning_image_column is None:
            raise ValueError(f"{type(annotator).__name__} reads the control from data.conditioning_image_column; set it")
        self.streaming, self.shuffle_buffer_size = streaming, shuffle_buffer_size
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self._loaded: dict | None = None
        self._folder: Path | None = None

    def split_settings(self) -> str:
        return f" in {self.location} (val_fraction={self.val_fraction}, test_fraction={self.test_fraction})"

    def _parts(self) -> dict[str, hf.Part | None]:
        """Where each of our splits comes from: the set's own split, or rows of its train split."""
        if self._loaded is None:
            loaded, self._folder = hf.load_splits(
                self.location, self.local_only, self.dataset_config_name, self.streaming, self.cache_dir
            )
            own = {ours: hf.own_split(loaded, ours) for ours in ("train", "val", "test")}
            if own["train"] is None:
                raise ValueError(f"{self.location}: no train split among its splits {sorted(loaded)}")
            for ours, found in own.items():
                if found is not None:
                    name, dataset = found
                    self.columns.check(dataset, f"{self.location} ({name} split)")
                    own[ours] = hf.Part(self.columns.undecoded(dataset), name)
            val_fraction = 0.0 if own["val"] else self.val_fraction
            test_fraction = 0.0 if own["test"] else self.test_fraction
            carve = self._streamed_parts if self.streaming else self._indexed_parts
            self._loaded = carve(own, val_fraction, test_fraction)
        return self._loaded

    def _streamed_parts(self, own: dict, val_fraction: float, test_fraction: float) -> dict:
        """A split the set lacks: the train rows whose image hashes into its band (`splits.bands`)."""
        parts = {}
        for split, (low, high) in bands(val_fraction, test_fraction).items():
            if split != "train" and own[split] is not None:
                parts[split] = own[split]
            elif high > low:
                train = own["train"]
                in_band = hf.in_band(self.columns.image, self._folder, low, high)
                parts[split] = hf.Part(train.dataset.filter(in_band), train.name)
            else:
                parts[split] = None
        return parts

    def _indexed_parts(self, own: dict, val_fraction: float, test_fraction: float) -> dict:
        """Rows with a usable caption; a split the set lacks takes train rows by `split_records`."""
        train = own["train"]
        rows = self._captioned_rows(train)
        carved = {"train": rows, "val": [], "test": []}
        if val_fraction or test_fraction:  # identities cost a pass over the images
            identities = hf.image_identities(train.dataset, self.columns.image, self._folder)
            carved = split_records(rows, val_fraction, test_fraction, identity=identities.__getitem__)
        return {
            split: hf.Part(own[split].dataset, own[split].name, self._captioned_rows(own[split]))
            if split != "train" and own[split] is not None else hf.Part(train.dataset, train.name, carved[split])
            for split in ("train", "val", "test")
        }

    def _captioned_rows(self, part: hf.Part) -> list[int]:
        """The rows whose caption is usable; the others raise, or are skipped and counted, now."""
        good = []
        for row, caption in enumerate(part.dataset[self.columns.caption]):
            if problem := hf.caption_problem(caption):
                err = BadSampleError(f"{self.location}: {part.name} row {row}", problem)
                if self.on_bad_sample == "error":
                    raise err
                log.warning("skipping bad sample %s", err)
            else:
                good.append(row)
        if skipped := len(part.dataset) - len(good):
            log.warning("skipped %d of %d rows of the %s split of %s", skipped, len(part.dataset), part.name, self.location)
        return good

    def make_dataset(self, split: str, required: bool) -> Dataset:
        part = self._parts()[split]
        if part is None or part.rows == []:
            if required:
                raise self.empty_split_error(split)
            return ControlDataset([], self.sample_builder(split))
        decode = hf.RowDecoder(self.columns, self._folder, self.location)
        if part.rows is not None:
            return ControlDataset(hf.RowSource(part, decode), self.sample_builder(split), self.on_bad_sample)
        stream, name = part.dataset, f"{part.name}-stream"
        if split == "train":
            stream = stream.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer_size)
        rank, world_size = self._rank()
        if world_size > 1:
            stream = split_dataset_by_node(stream, rank=rank, world_size=world_size)
            name = f"{name}@rank{rank}"
        return hf.RowStream(stream, decode, self.sample_builder(split), self.on_bad_sample, name, endless=split == "train")
