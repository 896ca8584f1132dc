"""Training runs on the data sources users bring: Hugging Face sets (parquet files, a
save_to_disk folder, streamed) and a folder of real photographs with canny control, with
chosen validation images and prompts in the sample grids."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import cv2
import datasets
import numpy as np
import pytest
from support.training_runs import FAST, compose_config, run_command
from support.data_sets import PHOTOS, photo_dataset, write_parquet_set, write_photo_folder, write_saved_set

from conftrl.cli.train import train
from conftrl.config.schema import ConfigError
from conftrl.control.inputs import control_from_file
from conftrl.training.adapter import load_adapter
from conftrl.training.callbacks import ControlFidelity, SampleGrid
from conftrl.training.loggers import logged_metrics
from conftrl.utils.images import to_uint8
from datamodules.annotators import CannyAnnotator

# FAST without ShapesWorld's split lengths.
FAST_FILES = [o for o in FAST if not o.startswith("data.num_")] + ["data.num_workers=0"]


def run(tiny_base, tmp_path, *overrides: str) -> dict:
    overrides = [f"model.path={tiny_base}", *FAST_FILES, "experiment=canny_coft", *overrides]
    return train(compose_config("train", overrides, tmp_path / "run"))


def steps(tmp_path) -> list[int]:
    return sorted(row["step"] for row in logged_metrics(tmp_path / "run") if "train/loss" in row)


@pytest.mark.slow
@pytest.mark.parametrize(
    "write, annotator, streaming",
    [(write_parquet_set, "canny", False), (write_saved_set, "precomputed", True)],
    ids=["parquet-canny", "save_to_disk-precomputed-streamed"],
)
def test_a_datasets_set_trains(tiny_base, tmp_path, write, annotator, streaming):
    location = write(tmp_path / "set")
    metrics = run(
        tiny_base, tmp_path, "data=hf", f"data.dataset_name={location}", f"annotator={annotator}",
        f"data.streaming={streaming}", "data.val_fraction=0.4", f"data.cache_dir={tmp_path / 'cache'}",
    )
    assert np.isfinite(metrics["val/loss"])
    assert steps(tmp_path) == [0, 1]
    assert load_adapter(tmp_path / "run" / "adapter").build("data").columns.image == "image"


@pytest.mark.slow
def test_real_photos_train_with_canny_and_chosen_validation_items_fill_the_grid(tiny_base, tmp_path):
    photos = write_photo_folder(tmp_path / "photos")
    edges = np.zeros((48, 64), np.uint8)
    cv2.rectangle(edges, (10, 8), (50, 40), 255, 1)
    cv2.imwrite(str(tmp_path / "edges.png"), edges)
    images = [str(photos / "coffee.jpg"), str(tmp_path / "edges.png")]
    metrics = run(
        tiny_base, tmp_path, "data=folder", f"data.root={photos}", "annotator=canny", "data.val_fraction=0.2",
        f"validation.images=[{images[0]},{images[1]}]", "validation.prompts=[a cup of coffee]",
        "callbacks.sample_grid.seeds=[0,1]",
    )
    assert np.isfinite(metrics["val/loss"]) and steps(tmp_path) == [0, 1]
    grid = cv2.imread(str(tmp_path / "run" / "samples" / "step_000002.png"))[..., ::-1]
    assert grid.shape == (2 * 32 + 2, 3 * 32 + 2 * 2, 3)  # a row per image, its control and 2 seeds
    for row, image in enumerate(images):  # one prompt for both images; each row starts with its control
        control = to_uint8(control_from_file(image, CannyAnnotator(), 32))[0]
        np.testing.assert_array_equal(grid[row * 34 : row * 34 + 32, :32], control)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["validation.images=[/no/such/control.png]", "validation.prompts=[a]"],
         "validation.images.0='/no/such/control.png': Path does not point to a file"),
        (["validation.images=[{0},{0}]", "validation.prompts=[a,b,c]"], "2 validation.images and 3 validation.prompts"),
        (["validation.prompts=[a]"], "validation.images and validation.prompts go together"),
        (["data=hf"], "set one of data.dataset_name"),
        (["data=hf", "data.dataset_name=/no/such/set"], "data: data folder not found: /no/such/set"),
    ],
    ids=["missing image", "pairing", "prompts alone", "hf without a dataset", "hf folder not there"],
)
def test_a_validation_or_data_mistake_stops_the_run_before_the_model_loads(
    tiny_base, tmp_path, monkeypatch, overrides, expected
):
    import conftrl.cli.train as command

    monkeypatch.setattr(command, "load_base", lambda *a, **k: pytest.fail("the base model was loaded"))
    existing = str(tiny_base / "model_index.json")
    with pytest.raises(ConfigError, match=re.escape(expected)):
        run(tiny_base, tmp_path, *(o.format(existing) for o in overrides))


@pytest.mark.slow
def test_a_stream_under_two_process_ddp_gives_each_rank_its_own_rows(tiny_base, tmp_path):
    """Two spawned gloo processes, 4 rows, batches of 1, 2 steps: one epoch of the stream, whose
    rows the ranks share out between them."""
    location, photos = tmp_path / "set", photo_dataset()
    datasets.DatasetDict(train=photos.select(range(4)), validation=photos.select(range(4, 6))).save_to_disk(location)
    overrides = [o for o in FAST_FILES if not o.startswith(("trainer.val_check", "data.batch_size", "callbacks."))]
    run_command(
        "conftrl.train", "experiment=canny_coft", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
        f"model.path={tiny_base}", *overrides, "data=hf", f"data.dataset_name={location}", "data.streaming=true",
        "data.batch_size=1", "data.proportion_empty_prompts=0", "trainer.limit_val_batches=0",
        "callbacks=none", f"data.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}",
        "+callbacks.probe._target_=batch_probes.RecordCaptions", f"+callbacks.probe.directory={tmp_path / 'probe'}",
        cwd=tmp_path, PYTHONPATH=str(Path(__file__).parent),
    )
    ranks = [json.loads((tmp_path / "probe" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [len(captions) for captions in ranks] == [2, 2]
    assert sorted(ranks[0] + ranks[1]) == sorted(list(PHOTOS.values())[:4])


def test_a_validation_split_that_yields_nothing_leaves_out_grids_and_fidelity(tmp_path):
    """A streamed split carved by hash can turn out empty: the run goes on without them."""
    module = SimpleNamespace(sample=lambda *args, **kwargs: pytest.fail("sampled"), log=lambda *args: pytest.fail("logged"))
    trainer = SimpleNamespace(
        sanity_checking=False, is_global_zero=True, global_rank=0, world_size=1, global_step=2, loggers=[],
        datamodule=SimpleNamespace(val_dataloader=lambda: iter(()), annotator=CannyAnnotator()),
        strategy=SimpleNamespace(model=module),
    )
    for callback, what in ((SampleGrid(2, [0], {}, str(tmp_path / "samples")), "no sample grid"),
                           (ControlFidelity("edge_f1", 2, 2, {}), "no control fidelity")):
        with pytest.warns(UserWarning, match=what):
            callback.on_validation_epoch_end(trainer, module)
    assert not (tmp_path / "samples").exists()
