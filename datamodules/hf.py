"""Hugging Face `datasets` as a source of samples: on disk, in files, on the hub, or streamed.

Where a dataset comes from (`load_splits`):

* a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
* a folder with ControlNet's ``prompt.json`` (Fill50K): its ``target``, ``source`` and
  ``prompt`` fields become the columns ``image``, ``conditioning_image`` and ``text``;
* any other folder `datasets.load_dataset` understands: parquet, arrow, csv/json files, or
  images with a ``metadata.jsonl`` (imagefolder);
* a hub name (``org/name``), downloaded by `datasets` when the machine is online.

Image columns hold images (`datasets.Image`, read undecoded so that this package's decoder
converts them and names a bad one) or file paths, relative to the dataset's folder. A
caption is a non-empty string or a list of them (one is drawn per training sample). Rows
are named by their split and index (``train row 17``), in errors and in a batch's ``key``
(``train/17``); a streamed row by its position in what this process reads of the stream.
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import datasets
from torch.utils.data import IterableDataset, get_worker_info

from datamodules.dataset import BadSampleCounter, SampleBuilder
from datamodules.decode import read_rgb
from datamodules.errors import BadSampleError, EmptySplitError
from datamodules.splits import position

log = logging.getLogger(__name__)

# A hub dataset's name: "name" or "owner/name".
HUB_NAME = re.compile(r"[\w.-]+(/[\w.-]+)?")
CONTROLNET_COLUMNS = {"target": "image", "source": "conditioning_image", "prompt": "text"}
# A dataset's own split for each of ours (the first name found); train is required.
OWN_SPLITS = {"train": ("train",), "val": ("validation", "val"), "test": ("test",)}


def load_splits(
    location: str, local_only: bool, config_name: str | None = None, streaming: bool = False, cache_dir: str | None = None
) -> tuple[dict, Path | None]:
    """The dataset's splits by name, and the folder its relative paths start from (None for the hub).

    `location` is a folder, or with `local_only` false, also a hub name."""
    if (folder := local_folder(location, local_only)) is not None:
        return _load_local(folder, config_name, streaming, cache_dir), folder
    try:
        loaded = datasets.load_dataset(location, config_name, streaming=streaming, cache_dir=cache_dir)
    except (ConnectionError, OSError, datasets.exceptions.DatasetNotFoundError) as err:
        raise FileNotFoundError(f"{location!r} is no local folder, and the hub did not give it: {err}") from err
    return dict(loaded), None


def local_folder(location: str, local_only: bool) -> Path | None:
    """The folder `location` names, or None for a hub name; anything else raises, naming it."""
    folder = Path(location).expanduser()
    if folder.is_dir():
        return folder.resolve()
    if local_only or not HUB_NAME.fullmatch(location):
        raise FileNotFoundError(f"data folder not found: {location}")
    return None


def _load_local(folder: Path, config_name: str | None, streaming: bool, cache_dir: str | None) -> dict:
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():  # save_to_disk
        loaded = datasets.load_from_disk(str(folder))
        splits = {"train": loaded} if isinstance(loaded, datasets.Dataset) else dict(loaded)
        if not streaming:
            return splits
        # Shards are what dataloader workers and DDP processes share out: 64 suit any power-of-two count.
        return {name: split.to_iterable_dataset(num_shards=max(1, min(len(split), 64))) for name, split in splits.items()}
    if (folder / "prompt.json").is_file():
        listing = str(folder / "prompt.json")
        loaded = datasets.load_dataset("json", data_files=listing, streaming=streaming, cache_dir=cache_dir)
        return {name: split.rename_columns(CONTROLNET_COLUMNS) for name, split in loaded.items()}
    return dict(datasets.load_dataset(str(folder), config_name, streaming=streaming, cache_dir=cache_dir))


def own_split(splits: dict, ours: str) -> tuple[str, object] | None:
    """(name, split) of the dataset's split that serves as our `ours` ("train", "val", "test"), or None."""
    return next(((name, splits[name]) for name in OWN_SPLITS[ours] if name in splits), None)


@dataclass(frozen=True)
class Part:
    """Where one of our splits comes from: a split of the dataset (by its name) and, unless
    streamed (None), which of its rows."""

    dataset: object
    name: str
    rows: list[int] | None = None


@dataclass(frozen=True)
class Columns:
    """Which columns hold the image, the caption and (None: not read) the control image."""

    image: str
    caption: str
    control: str | None = None

    def check(self, dataset, where: str) -> None:
        """Every column must exist; the message lists those the dataset has."""
        names = dataset.column_names
        if names is None:  # a stream that does not know its columns before reading
            return
        for role, column in (("image_column", self.image), ("caption_column", self.caption),
                             ("conditioning_image_column", self.control)):
            if column is not None and column not in names:
                raise ValueError(f"{where}: data.{role}={column!r} is not one of its columns {sorted(names)}")

    def undecoded(self, dataset):
        """`dataset` with only these columns, images left as bytes (or paths) for `read_rgb`."""
        columns = [c for c in (self.image, self.caption, self.control) if c is not None]
        dataset = dataset.select_columns(columns)
        features = dataset.features or {}
        for column in columns:
            if isinstance(features.get(column), datasets.Image):
                dataset = dataset.cast_column(column, datasets.Image(decode=False))
        return dataset


def caption_problem(caption) -> str | None:
    """Why a caption cell cannot be used, or None: a non-empty string or list of them is needed."""
    captions = caption if isinstance(caption, list) else [caption]
    if not captions or not all(isinstance(c, str) and c.strip() for c in captions):
        return f"missing or empty caption (got {caption!r})"
    return None


def image_identity(cell, folder: Path | None = None) -> bytes | str:
    """What identifies a row's image for the hash split: its bytes, or its path (relative to
    the dataset's `folder` when inside it, so that moving the folder keeps the splits)."""
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return cell["bytes"]
        cell = cell.get("path") or ""
    if isinstance(cell, str) and folder is not None and Path(cell).is_relative_to(folder):
        return Path(cell).relative_to(folder).as_posix()
    return cell if isinstance(cell, (str, bytes)) else repr(cell)


def image_identities(dataset, column: str, folder: Path | None) -> list[bytes | str]:
    """`image_identity` of every row of a map-style split, read in batches."""
    images = dataset.select_columns([column])
    return [image_identity(cell, folder) for batch in images.iter(batch_size=256) for cell in batch[column]]


def in_band(column: str, folder: Path | None, low: float, high: float):
    """A row filter: whether the row's image hashes into [low, high) (`splits.position`)."""
    return lambda row: low <= position(image_identity(row[column], folder)) < high


class RowDecoder:
    """A row (dict of column values) to the pipeline's raw sample (see `datamodules.folders`)."""

    def __init__(self, columns: Columns, folder: Path | None, location: str):
        self.columns, self.folder, self.location = columns, folder, location

    def __call__(self, row: dict, key: str, where: str) -> dict:
        where = f"{self.location}: {where}"
        if problem := caption_problem(row[self.columns.caption]):
            raise BadSampleError(where, problem)
        cell = row[self.columns.image]
        sample = {"image": self._image(cell, where), "caption": row[self.columns.caption], "key": key}
        # What identifies the image for the estimator cache: its bytes, or its file.
        if isinstance(cell, dict) and cell.get("bytes"):
            sample["encoded"] = cell["bytes"]
        elif (path := self._file(cell, where)) is not None:
            sample["path"] = path
        if self.columns.control is not None:
            sample["control"] = self._image(row[self.columns.control], f"{where}, {self.columns.control}")
        return sample

    def _image(self, cell, where: str):
        if isinstance(cell, dict) and cell.get("bytes"):
            return read_rgb(io.BytesIO(cell["bytes"]), where)
        path = self._file(cell, where)
        if path is None:
            raise BadSampleError(where, f"no image (got {type(cell).__name__} {str(cell)[:80]!r})")
        return read_rgb(path, f"{where} ({path})")

    def _file(self, cell, where: str) -> Path | None:
        """The file an image cell names (a path, relative to the dataset's folder), if any."""
        path = cell.get("path") if isinstance(cell, dict) else cell
        if not (isinstance(path, str) and path):
            return None
        if Path(path).is_absolute():
            return Path(path)
        if self.folder is None:
            raise BadSampleError(where, f"relative image path {path!r} in a dataset without a folder")
        return self.folder / path


class RowSource:
    """The chosen rows of a map-style dataset split as raw samples."""

    def __init__(self, part: Part, decode: RowDecoder):
        self.part, self.decode = part, decode

    def __len__(self) -> int:
        return len(self.part.rows)

    def __getitem__(self, index: int) -> dict:
        row, name = self.part.rows[index], self.part.name
        return self.decode(self.part.dataset[row], f"{name}/{row}", f"{name} row {row}")


class RowStream(IterableDataset):
    """A streamed split as built samples, each DDP rank and dataloader worker reading its own part.

    Bad rows are skipped (and counted) or raise, as `on_bad_sample` says. An `endless` stream
    (training) starts over when it ends, reshuffled for the next epoch, so that ranks holding
    a row more or less never run out at different steps; `trainer.max_steps` ends the run.
    """

    def __init__(self, rows, decode: RowDecoder, build: SampleBuilder, on_bad_sample: str, name: str, endless: bool):
        self.rows, self.decode, self.build, self.name, self.endless = rows, decode, build, name, endless
        self.bad_samples = BadSampleCounter(on_bad_sample)

    def __iter__(self):
        worker = get_worker_info()
        worker_id = worker.id if worker is not None else 0
        name = self.name + (f"@worker{worker_id}" if worker is not None and worker.num_workers > 1 else "")
        epoch = 0
        while True:
            self.rows.set_epoch(epoch)
            read = built = 0
            for index, row in enumerate(self.rows):
                read += 1
                try:
                    item = self.build(self.decode(row, f"{name}/{index}", f"{name} row {index}"), epoch, worker_id, index)
                except BadSampleError as err:
                    self.bad_samples(err, "skipping it", "skipped")
                    continue
                built += 1
                yield item
            # A worker given no shard of the stream (more workers than shards) has nothing to do.
            if not self.endless or read == 0:
                return
            if built == 0:  # starting over would never yield
                raise EmptySplitError(f"{name}: every row this process reads is bad")
            epoch += 1
