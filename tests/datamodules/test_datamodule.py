"""The LightningDataModule contract, on ShapesWorld: batches, seeds, epochs, workers."""

from types import SimpleNamespace

import cv2
import lightning as L
import numpy as np
import pytest
import torch
from datamodules_support import edge_alignment
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules import ShapesWorldDataModule
from datamodules.annotators import CannyAnnotator, DepthAnnotator, PrecomputedControl, SegmentationAnnotator
from datamodules.dataset import EpochSampler
from datamodules.shapesworld import CLASS_NAMES


def shapesworld(annotator=None, **kwargs) -> ShapesWorldDataModule:
    settings = dict(resolution=48, batch_size=8, num_train=24, num_val=8, num_test=8) | kwargs
    datamodule = ShapesWorldDataModule(annotator or CannyAnnotator(), **settings)
    datamodule.setup()
    return datamodule


def epoch(loader) -> list[dict]:
    return list(loader)


def test_batch_keys_types_and_ranges():
    batch = next(iter(shapesworld().train_dataloader()))
    assert set(batch) == {"image", "control", "caption", "key", "original_size", "crop_top_left", "depth", "labels", "scene"}
    assert batch["image"].dtype == torch.float32 and batch["image"].shape == (8, 3, 48, 48)
    assert -1 <= batch["image"].min() < 0 < batch["image"].max() <= 1
    assert batch["control"].dtype == torch.float32 and batch["control"].shape == (8, 3, 48, 48)
    assert 0 <= batch["control"].min() and batch["control"].max() == 1
    assert batch["depth"].dtype == torch.float32 and batch["depth"].shape == (8, 1, 48, 48)
    assert batch["labels"].dtype == torch.int64 and batch["labels"].shape == (8, 48, 48)
    assert 0 <= batch["labels"].min() and batch["labels"].max() < len(CLASS_NAMES)
    assert len(batch["caption"]) == len(batch["scene"]) == len(batch["key"]) == 8


def test_control_lines_up_with_the_class_map_in_batches():
    batch = next(iter(shapesworld(resolution=96).train_dataloader()))
    for control, labels in zip(batch["control"], batch["labels"]):
        precision, recall = edge_alignment((control[0].numpy() * 255).astype(np.uint8), labels.numpy())
        assert precision > 0.98 and recall > 0.95


@pytest.mark.parametrize("annotator", [DepthAnnotator(), SegmentationAnnotator()])
def test_depth_and_segmentation_controls_come_from_the_exact_maps(annotator):
    batch = next(iter(shapesworld(annotator).val_dataloader()))
    if isinstance(annotator, DepthAnnotator):
        torch.testing.assert_close(batch["control"], batch["depth"].expand(-1, 3, -1, -1), atol=0.51 / 255, rtol=0)
    else:  # one control colour per class
        for c in range(len(CLASS_NAMES)):
            colours = batch["control"].permute(0, 2, 3, 1)[batch["labels"] == c]
            assert len(colours) == 0 or (colours == colours[0]).all()


def test_same_seed_same_epochs_other_seed_other_epochs():
    first, second = shapesworld(seed=1).train_dataloader(), shapesworld(seed=1).train_dataloader()
    a, b = epoch(first), epoch(second)
    assert [x["key"] for x in a] == [x["key"] for x in b]
    torch.testing.assert_close(torch.cat([x["image"] for x in a]), torch.cat([x["image"] for x in b]))
    first.sampler.set_epoch(1)
    assert [x["key"] for x in epoch(first)] != [x["key"] for x in a]  # next epoch: new order
    assert [x["caption"] for x in epoch(shapesworld(seed=2).train_dataloader())] != [x["caption"] for x in a]


def test_epochs_are_identical_with_and_without_workers():
    # Workers fork from a parent that has used OpenCV's thread pool; that must not deadlock.
    cv2.GaussianBlur(np.zeros((1024, 1024, 3), np.uint8), (5, 5), 1)
    settings = dict(proportion_empty_prompts=0.3, annotator=CannyAnnotator(random_thresholds=True))
    serial = shapesworld(num_workers=0, **settings).train_dataloader()
    parallel = shapesworld(num_workers=2, **settings).train_dataloader()
    for _ in range(2):
        a, b = epoch(serial), epoch(parallel)
        assert [x["caption"] for x in a] == [x["caption"] for x in b]
        torch.testing.assert_close(torch.cat([x["control"] for x in a]), torch.cat([x["control"] for x in b]))


def test_set_epoch_replays_an_epoch():
    loader = shapesworld(proportion_empty_prompts=0.5).train_dataloader()
    loader.sampler.set_epoch(2)
    second = epoch(loader)
    loader.sampler.set_epoch(0)
    assert [x["caption"] for x in epoch(loader)] != [x["caption"] for x in second]
    fresh = shapesworld(proportion_empty_prompts=0.5).train_dataloader()
    fresh.sampler.set_epoch(2)
    assert [x["caption"] for x in epoch(fresh)] == [x["caption"] for x in second]


def test_caption_dropout_only_in_training():
    datamodule = shapesworld(proportion_empty_prompts=0.5, num_train=200, num_val=50)
    captions = [c for batch in datamodule.train_dataloader() for c in batch["caption"]]
    assert 0.35 < captions.count("") / len(captions) < 0.65
    assert "" not in [c for batch in datamodule.val_dataloader() for c in batch["caption"]]
    assert all(c for batch in shapesworld(num_train=50).train_dataloader() for c in batch["caption"])


def test_evaluation_batches_are_fixed():
    datamodule = shapesworld(annotator=CannyAnnotator(random_thresholds=True))
    a, b = epoch(datamodule.test_dataloader()), epoch(datamodule.test_dataloader())
    assert [x["key"] for x in a] == [x["key"] for x in b] == [[f"shapesworld/test/{i}" for i in range(8)]]
    torch.testing.assert_close(a[0]["control"], b[0]["control"])


def test_sampler_shuffles_a_permutation_per_epoch():
    sampler = EpochSampler(10, seed=0)
    first = list(sampler)
    assert list(sampler) == first  # iterating again (as a restore does) repeats the pass
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(i for i, _ in first) == list(range(10)) and {e for _, e in first} == {0}
    assert {e for _, e in second} == {1} and first != second
    assert [i for i, _ in EpochSampler(5, shuffle=False)] == [0, 1, 2, 3, 4]


def test_train_loader_resumed_mid_epoch_yields_the_rest_of_that_epoch():
    """The loader's state after 2 of 3 batches, loaded into a fresh loader of a new process,
    gives exactly the third batch, then the next epoch as an uninterrupted run would. In
    Lightning's order: the loader is built with the restored trainer, its iterator (which skips
    the batches taken) is made, and only then is the epoch set."""
    datamodule = shapesworld(num_train=12, batch_size=4)
    loader = datamodule.train_dataloader()
    loader.sampler.set_epoch(3)
    batches = iter(loader)
    taken = [next(batches)["key"] for _ in range(2)]
    state = loader.state_dict()
    rest = [b["key"] for b in batches]
    loader.sampler.set_epoch(4)
    following = [b["key"] for b in loader]

    restored = shapesworld(num_train=12, batch_size=4)
    restored.trainer = SimpleNamespace(current_epoch=3, world_size=1, global_rank=0)
    fresh = restored.train_dataloader()
    fresh.load_state_dict(state)
    batches = iter(fresh)
    fresh.sampler.set_epoch(3)
    assert [b["key"] for b in batches] == rest and len(rest) == 1 and rest[0] not in taken
    fresh.sampler.set_epoch(4)
    assert [b["key"] for b in fresh] == following


def test_a_fit_resumed_inside_a_later_epoch_takes_that_epochs_batches(tmp_path):
    """Lightning end to end: 3 batches an epoch, resumed from the checkpoint after step 4 (one
    batch into epoch 1), the run takes epoch 1's remaining batches, not epoch 0's."""

    def fit(max_steps: int, ckpt_path=None) -> list:
        module = _Recorder()
        every_two = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=2, save_top_k=-1)
        trainer = L.Trainer(max_steps=max_steps, logger=False, callbacks=[every_two], enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, accelerator="cpu")  # fmt: skip
        datamodule = ShapesWorldDataModule(CannyAnnotator(), resolution=16, batch_size=2, num_train=6)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        return module.seen

    straight = fit(6)
    resumed = fit(6, ckpt_path=tmp_path / "step=4.ckpt")
    assert [e for e, _ in straight] == [0, 0, 0, 1, 1, 1]
    assert resumed == straight[4:]


def test_setup_builds_only_the_stage_splits():
    datamodule = ShapesWorldDataModule(CannyAnnotator(), resolution=16, num_train=4)
    datamodule.setup("test")
    assert set(datamodule.datasets) == {"test"}
    datamodule.setup("fit")
    assert set(datamodule.datasets) == {"test", "train", "val"}


def test_annotator_that_needs_files_is_refused_for_shapesworld():
    with pytest.raises(ValueError, match="cannot annotate"):
        ShapesWorldDataModule(PrecomputedControl())


class _Recorder(L.LightningModule):
    """Records the keys of every training batch; learns nothing."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def training_step(self, batch, batch_index):
        self.seen.append((self.current_epoch, tuple(batch["key"])))
        return (self.weight - batch["image"].mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit_drives_the_epochs():
    def fit() -> list:
        module = _Recorder()
        trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, accelerator="cpu")  # fmt: skip
        datamodule = ShapesWorldDataModule(CannyAnnotator(), resolution=16, batch_size=4, num_train=8)
        trainer.fit(module, datamodule=datamodule)
        return module.seen

    seen = fit()
    assert [e for e, _ in seen] == [0, 0, 1, 1]
    assert {k for e, keys in seen if e == 0 for k in keys} == {k for e, keys in seen if e == 1 for k in keys}
    assert [keys for e, keys in seen if e == 0] != [keys for e, keys in seen if e == 1]
    assert fit() == seen
