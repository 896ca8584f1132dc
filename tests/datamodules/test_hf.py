"""data=hf: Hugging Face datasets on disk, in files and streamed, through the shared pipeline."""

from __future__ import annotations

import json
import logging
import re
from types import SimpleNamespace

import cv2
import datasets
import numpy as np
import pytest
import torch
from datamodules_support import make_photo, write_rgb
from support.data_sets import FEATURES, png_cell
from torch.utils.data import IterableDataset

from datamodules import BadSampleError, HFDataModule
from datamodules.annotators import CannyAnnotator, DepthAnnotator, PrecomputedControl


def inverted(image: np.ndarray) -> np.ndarray:
    """A stand-in control image: tells a given control from a computed one."""
    return 255 - image


def rows(count: int, start: int = 0) -> dict:
    photos = [make_photo(48 + 8 * (i % 3), 64, seed=i) for i in range(start, start + count)]
    return {
        "image": [png_cell(p) for p in photos],
        "conditioning_image": [png_cell(inverted(p)) for p in photos],
        "text": [f"photo {i}" for i in range(start, start + count)],
    }


def dataset(count: int = 12, start: int = 0) -> datasets.Dataset:
    return datasets.Dataset.from_dict(rows(count, start), features=FEATURES)


@pytest.fixture
def saved(tmp_path):
    return str(dataset().save_to_disk(tmp_path / "saved") or tmp_path / "saved")


@pytest.fixture
def parquet(tmp_path):
    (tmp_path / "parquet").mkdir()
    dataset().to_parquet(tmp_path / "parquet" / "train.parquet")
    return str(tmp_path / "parquet")


def datamodule(location, annotator=None, trainer=None, **settings) -> HFDataModule:
    settings = dict(resolution=32, batch_size=4, val_fraction=0.25, cache_dir=str(location) + "-cache") | settings
    module = HFDataModule(annotator or CannyAnnotator(), dataset_name=str(location), **settings)
    module.trainer = trainer
    module.setup("fit")
    return module


def captions(loader) -> list[str]:
    """Captions of one pass of a loader; of an endless stream, until a row comes again."""
    if not isinstance(loader.dataset, IterableDataset):
        return [caption for batch in loader for caption in batch["caption"]]
    seen = []
    for batch in loader:
        for caption in batch["caption"]:
            if caption in seen:
                return seen
            seen.append(caption)
    return seen


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("source", ["saved", "parquet"])
def test_on_disk_and_parquet_sets_give_batches_and_a_deterministic_val_split(source, streaming, request):
    location = request.getfixturevalue(source)
    module = datamodule(location, streaming=streaming)
    batch = next(iter(module.train_dataloader()))
    assert batch["image"].shape == batch["control"].shape == (4, 3, 32, 32)
    val = captions(module.val_dataloader())
    train = captions(module.train_dataloader())
    assert val and not set(val) & set(train) and len(val) + len(train) == 12
    assert captions(datamodule(location, streaming=not streaming).val_dataloader()) == val  # same rule, both ways


def test_control_from_the_conditioning_column_or_computed_from_the_image(saved):
    given = next(iter(datamodule(saved, PrecomputedControl()).val_dataloader()))
    computed = next(iter(datamodule(saved, CannyAnnotator()).val_dataloader()))
    torch.testing.assert_close(given["image"], computed["image"])
    # The given control is the inverted photo, resized and cropped with it.
    torch.testing.assert_close(given["control"], 1 - (given["image"] + 1) / 2, atol=1.5 / 255, rtol=0)
    for image, control in zip(computed["image"], computed["control"]):
        photo = ((image.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        assert np.array_equal((control[0].numpy() * 255).round(), cv2.Canny(photo, 100, 200))


def test_a_set_without_a_conditioning_column_is_annotated(tmp_path):
    bare = dataset().remove_columns("conditioning_image")
    bare.save_to_disk(tmp_path / "bare")
    assert next(iter(datamodule(tmp_path / "bare").train_dataloader()))["control"].max() == 1
    with pytest.raises(ValueError, match=r"conditioning_image_column='conditioning_image' is not one of its columns"):
        datamodule(tmp_path / "bare", PrecomputedControl())


def test_missing_columns_and_folders_are_named(saved, tmp_path):
    columns = r"\['conditioning_image', 'image', 'text'\]"
    with pytest.raises(ValueError, match=rf"data.caption_column='prompt' is not one of its columns {columns}"):
        datamodule(saved, caption_column="prompt")
    with pytest.raises(FileNotFoundError, match="data folder not found: .*nowhere"):
        HFDataModule(CannyAnnotator(), train_data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="set one of data.dataset_name"):
        HFDataModule(CannyAnnotator())
    with pytest.raises(ValueError, match="not depth maps"):
        HFDataModule(DepthAnnotator(), dataset_name=saved)


@pytest.fixture
def with_bad_rows(tmp_path):
    """Row 3 holds bytes that are no image, row 5 has no caption."""
    data = rows(8)
    data["image"][3] = {"bytes": b"not an image", "path": None}
    data["text"][5] = None
    datasets.Dataset.from_dict(data, features=FEATURES).save_to_disk(tmp_path / "bad")
    return tmp_path / "bad"


@pytest.mark.parametrize("streaming", [False, True])
def test_bad_rows_are_skipped_and_counted_by_index(with_bad_rows, streaming, caplog):
    module = datamodule(with_bad_rows, val_fraction=0.0, on_bad_sample="skip", streaming=streaming, batch_size=1)
    with caplog.at_level(logging.WARNING):
        seen = captions(module.train_dataloader())
    # Row 5 is dropped; row 3 is replaced by the next row (a map-style epoch keeps its length) or left out.
    assert sorted(seen) == sorted(f"photo {i}" for i in (0, 1, 2, 4, 6, 7) + ((4,) if not streaming else ()))
    # A streamed row is named by its place in the (shuffled) stream this process reads.
    row = r"train-stream row \d+" if streaming else "train row {}"
    assert re.search(row.format(3) + ": cannot decode image", caplog.text)
    assert re.search(row.format(5) + ": missing or empty caption", caplog.text)
    assert "1 substituted" in caplog.text or "1 skipped" in caplog.text


@pytest.mark.parametrize("streaming", [False, True])
def test_bad_rows_fail_by_index_under_error(with_bad_rows, streaming):
    if not streaming:
        with pytest.raises(BadSampleError, match=r"train row 5: missing or empty caption"):
            datamodule(with_bad_rows, val_fraction=0.0, on_bad_sample="error")
        return
    module = datamodule(with_bad_rows, val_fraction=0.0, on_bad_sample="error", streaming=True, batch_size=1)
    with pytest.raises(BadSampleError, match=r"train-stream row \d+: cannot decode image"):
        captions(module.train_dataloader())


def test_the_datasets_own_validation_split_is_used(tmp_path):
    datasets.DatasetDict(train=dataset(8), validation=dataset(3, start=100)).save_to_disk(tmp_path / "dict")
    module = datamodule(tmp_path / "dict", val_fraction=0.5)
    assert sorted(captions(module.val_dataloader())) == ["photo 100", "photo 101", "photo 102"]
    assert len(captions(module.train_dataloader())) == 8
    assert next(iter(module.val_dataloader()))["key"][0] == "validation/0"


@pytest.mark.parametrize("source", ["saved", "parquet"], ids=["12 shards: shards per rank", "1 file: rows per rank"])
def test_streaming_ranks_read_disjoint_rows_as_the_trainer_numbers_them(source, request):
    """Each epoch, the two ranks of a 2-process run read 6 rows each: all 12, none twice."""
    location = request.getfixturevalue(source)
    for epoch_rows in (slice(0, 6), slice(6, 12)):
        parts = []
        for rank in (0, 1):
            trainer = SimpleNamespace(global_rank=rank, world_size=2)
            loader = datamodule(location, streaming=True, val_fraction=0.0, batch_size=1, trainer=trainer).train_dataloader()
            parts.append([batch["caption"][0] for _, batch in zip(range(12), loader)][epoch_rows])
        assert sorted(parts[0] + parts[1]) == sorted(f"photo {i}" for i in range(12))
    assert "@rank1" in next(iter(loader))["key"][0]


def test_a_caption_list_gives_one_caption(tmp_path):
    data = rows(2) | {"text": [["a", "b", "c"], ["d"]]}
    features = datasets.Features(FEATURES | {"text": datasets.List(datasets.Value("string"))})
    datasets.Dataset.from_dict(data, features=features).save_to_disk(tmp_path / "lists")
    module = datamodule(tmp_path / "lists", val_fraction=0.0, batch_size=2)
    loader, drawn = module.train_dataloader(), set()
    for epoch in range(8):
        loader.sampler.set_epoch(epoch)
        drawn |= set(captions(loader))
    assert drawn <= {"a", "b", "c", "d"} and len(drawn & {"a", "b", "c"}) >= 2
    assert module.sample_builder("val")(module.datasets["train"].source[0], 0, 0)["caption"] == "a"  # evaluation: the first


def test_folder_layouts_load_through_datasets(tmp_path, imagefolder):
    # imagefolder: datasets parses metadata.jsonl; conditioning_image is a path beside it.
    module = datamodule(imagefolder, PrecomputedControl(), val_fraction=0.0)
    assert len(captions(module.train_dataloader())) == 4
    # ControlNet's prompt.json: target, source, prompt.
    fill = tmp_path / "fill"
    lines = []
    for i in range(3):
        write_rgb(fill / "target" / f"{i}.png", make_photo(32, 32, seed=i))
        write_rgb(fill / "source" / f"{i}.png", inverted(make_photo(32, 32, seed=i)))
        lines.append(json.dumps({"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": f"fill {i}"}))
    (fill / "prompt.json").write_text("\n".join(lines))
    module = datamodule(fill, PrecomputedControl(), val_fraction=0.0, batch_size=3)
    batch = next(iter(module.train_dataloader()))
    assert sorted(batch["caption"]) == ["fill 0", "fill 1", "fill 2"]


@pytest.mark.parametrize("source", ["saved", "parquet"], ids=["12 shards", "1 file: a worker idles"])
def test_a_stream_read_by_two_workers_gives_every_row_once_per_epoch(source, request):
    """Workers share the shards out; a worker left without one stops instead of failing."""
    location = request.getfixturevalue(source)
    loader = datamodule(location, streaming=True, val_fraction=0.0, batch_size=1, num_workers=2).train_dataloader()
    first_epoch = [batch["caption"][0] for _, batch in zip(range(12), loader)]
    assert sorted(first_epoch) == sorted(f"photo {i}" for i in range(12))


def test_a_hub_name_goes_to_the_hub_and_a_failure_names_it(monkeypatch):
    asked = []

    def load_dataset(name, config, streaming, cache_dir):
        asked.append((name, config, streaming))
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    module = HFDataModule(CannyAnnotator(), dataset_name="someone/a-set", dataset_config_name="small", streaming=True)
    with pytest.raises(FileNotFoundError, match="'someone/a-set' is no local folder, and the hub did not give it: offline"):
        module.setup("fit")
    assert asked == [("someone/a-set", "small", True)]
    with pytest.raises(FileNotFoundError, match="data folder not found: not a/hub name!"):
        HFDataModule(CannyAnnotator(), dataset_name="not a/hub name!")


@pytest.mark.parametrize("layout", ["bytes", "files"])
def test_estimator_outputs_of_rows_are_cached(tmp_path, layout, imagefolder):
    """A row's image identifies its cache entry by its bytes, or by its file: the second
    epoch runs the estimator no more."""
    from test_annotation_cache import CountingEstimator

    location = imagefolder if layout == "files" else tmp_path / "saved"
    if layout == "bytes":
        dataset(4).save_to_disk(location)
    estimator = CountingEstimator()
    annotator = DepthAnnotator(estimator=estimator, cache_dir=str(tmp_path / "annotations"))
    loader = datamodule(location, annotator, val_fraction=0.0).train_dataloader()
    for epoch in range(2):
        assert all(batch["control"].max() > 0 for batch in loader)
        assert estimator.calls == 4 and annotator.cache.hits == 4 * epoch
