"""Every conf/data and conf/annotator file composes with Hydra and instantiates."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from conftrl.config import config_dir
from datamodules import FolderDataModule, ShapesWorldDataModule
from datamodules.annotators import Annotator
from support.config_groups import shipped_options

DATA = shipped_options("data")
ANNOTATORS = shipped_options("annotator")


def compose_pair(data: str, annotator: str, *overrides: str):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(overrides=[f"+data={data}", f"+annotator={annotator}", *overrides])


def estimator_overrides(annotator: str, tmp_path: Path) -> list[str]:
    """Estimators load lazily, so an existing (empty) path is enough to instantiate them."""
    if "dnn" in annotator:
        (tmp_path / "model.onnx").write_bytes(b"")
        return [f"annotator.estimator.path={tmp_path / 'model.onnx'}"]
    if "transformers" in annotator:
        return [f"annotator.estimator.path={tmp_path}"]
    return []


def test_the_expected_files_exist():
    assert {"shapesworld", "folder"} <= set(DATA)
    assert {"canny", "depth", "segmentation", "precomputed"} <= set(ANNOTATORS)


@pytest.mark.parametrize("annotator", ANNOTATORS)
def test_each_annotator_instantiates(annotator, tmp_path):
    cfg = compose_pair("shapesworld", annotator, *estimator_overrides(annotator, tmp_path))
    built = instantiate(cfg.annotator)
    assert isinstance(built, Annotator)
    assert built.estimates == annotator.endswith(("_dnn", "_transformers"))


@pytest.mark.parametrize("control", ["canny", "depth", "segmentation"])
def test_shapesworld_config_gives_batches(control):
    cfg = compose_pair("shapesworld", control, "data.num_train=4", "data.batch_size=2", "data.resolution=32")
    datamodule = instantiate(cfg.data)
    assert isinstance(datamodule, ShapesWorldDataModule)
    assert type(datamodule.annotator).__name__.lower().startswith(control)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["control"].shape == (2, 3, 32, 32)


@pytest.mark.parametrize("control", ["canny", "precomputed"])
def test_folder_config_gives_batches(control, imagefolder):
    settings = ["data.resolution=32", "data.num_workers=0", "data.val_fraction=0"]
    cfg = compose_pair("folder", control, f"data.root={imagefolder}", *settings)
    datamodule = instantiate(cfg.data)
    assert isinstance(datamodule, FolderDataModule)
    datamodule.setup("fit")
    assert next(iter(datamodule.train_dataloader()))["image"].shape == (4, 3, 32, 32)


def test_folder_root_is_required():
    from omegaconf.errors import MissingMandatoryValue

    with pytest.raises(MissingMandatoryValue):
        instantiate(compose_pair("folder", "canny").data)
