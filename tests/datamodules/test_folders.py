"""Image folders: the three formats, maps beside images, and every kind of bad input."""

import json
import logging

import cv2
import numpy as np
import pytest
import torch
from datamodules_support import make_photo, write_rgb

from conftrl.evaluation.report import split_items
from datamodules import BadSampleError, EmptySplitError, FolderDataModule
from datamodules.annotators import CannyAnnotator, DepthAnnotator, PrecomputedControl, SegmentationAnnotator


def load_all(root, annotator=None, split="train", **kwargs) -> list[dict]:
    """Every batch of one split, after setup, with a small resolution."""
    settings = dict(resolution=32, batch_size=4, val_fraction=0.0) | kwargs
    datamodule = FolderDataModule(annotator or CannyAnnotator(), str(root), **settings)
    datamodule.setup("fit" if split == "train" else "test")
    loader = datamodule.train_dataloader() if split == "train" else datamodule.test_dataloader()
    return list(loader)


def keys(batches) -> list[str]:
    return sorted(key for batch in batches for key in batch["key"])


def test_txt_pairs_give_documented_batches(txt_folder):
    batches = load_all(txt_folder)
    assert keys(batches) == [f"img_{i}.jpg" for i in range(6)]
    batch = batches[0]
    assert set(batch) == {"image", "control", "caption", "key", "original_size", "crop_top_left"}
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert -1 <= batch["image"].min() and batch["image"].max() <= 1
    assert batch["control"].shape == (4, 3, 32, 32) and set(batch["control"].unique().tolist()) <= {0.0, 1.0}
    assert all(caption.startswith("photo number") for caption in batch["caption"])


def test_imagefolder_with_conditioning_images(imagefolder):
    batches = load_all(imagefolder, PrecomputedControl(), resolution=64, crop="center")
    assert keys(batches) == [f"images/{i}.png" for i in range(4)]
    batch = batches[0]
    for image, control in zip(batch["image"], batch["control"]):
        # The stored control is Canny of the image: the two line up after resize and crop.
        rgb = ((image.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        redone = cv2.Canny(rgb, 100, 200) > 0
        stored = control[0].numpy() > 0.5
        assert (stored & cv2.dilate(redone.astype(np.uint8), np.ones((3, 3))).astype(bool)).sum() > 0.8 * stored.sum()


def test_controlnet_prompt_json(tmp_path):
    lines = []
    for i in range(3):
        write_rgb(tmp_path / "target" / f"{i}.png", make_photo(48, 48, seed=i))
        write_rgb(tmp_path / "source" / f"{i}.png", np.full((48, 48, 3), 60 * i, np.uint8))
        lines.append(json.dumps({"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": f"fill {i}"}))
    (tmp_path / "prompt.json").write_text("\n".join(lines))
    batches = load_all(tmp_path, PrecomputedControl(), batch_size=3)
    batch = batches[0]
    for key, caption, control in zip(batch["key"], batch["caption"], batch["control"]):
        i = int(key.split("/")[1][0])
        assert caption == f"fill {i}" and control.mean().item() == pytest.approx(60 * i / 255)


def test_explicit_format_overrides_detection(txt_folder):
    (txt_folder / "prompt.json").write_text("")  # would be detected first, and is empty
    assert len(keys(load_all(txt_folder, format="txt"))) == 6
    with pytest.raises(ValueError, match="no images found"):
        load_all(txt_folder)


def test_maps_beside_images_feed_depth_and_segmentation(tmp_path):
    for i in range(2):
        write_rgb(tmp_path / f"{i}.png", make_photo(40, 40, seed=i))
        (tmp_path / f"{i}.txt").write_text("a photo")
        depth = np.tile(np.linspace(0, 65535, 40).astype(np.uint16), (40, 1))
        cv2.imwrite(str(tmp_path / f"{i}.depth.png"), depth)
        labels = np.zeros((20, 20), np.uint8)  # half the image's size: resized to it
        labels[:, 10:] = 2
        cv2.imwrite(str(tmp_path / f"{i}.labels.png"), labels)
    (batch,) = load_all(tmp_path, DepthAnnotator(), crop="center")
    assert sorted(batch["key"]) == ["0.png", "1.png"]  # map files are not images
    assert batch["depth"].shape == (2, 1, 32, 32)
    np.testing.assert_allclose(batch["control"][:, 0], batch["depth"][:, 0], atol=1 / 255)
    assert (batch["depth"][:, 0, :, -1] > batch["depth"][:, 0, :, 0]).all()
    (batch,) = load_all(tmp_path, SegmentationAnnotator(), crop="center")
    assert set(batch["labels"].unique().tolist()) == {0, 2}
    assert (batch["labels"][:, :, :16] == 0).all() and (batch["labels"][:, :, 16:] == 2).all()


def test_required_map_missing_fails_at_setup(txt_folder):
    with pytest.raises(BadSampleError, match=r"img_0.jpg: no depth map \(expected img_0.depth"):
        load_all(txt_folder, DepthAnnotator())


def test_small_images_are_upscaled(tmp_path):
    write_rgb(tmp_path / "tiny.png", make_photo(10, 14))
    (tmp_path / "tiny.txt").write_text("tiny")
    (batch,) = load_all(tmp_path, resolution=64)
    assert batch["image"].shape == (1, 3, 64, 64)


def test_image_modes_are_converted_in_the_pipeline(tmp_path):
    photo = make_photo(40, 40)
    cv2.imwrite(str(tmp_path / "gray.png"), cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY))
    cv2.imwrite(str(tmp_path / "rgba.png"), np.dstack([photo, np.full((40, 40), 255, np.uint8)]))
    cv2.imwrite(str(tmp_path / "deep.png"), photo.astype(np.uint16) * 257)
    for name in ("gray", "rgba", "deep"):
        (tmp_path / f"{name}.txt").write_text(name)
    (batch,) = load_all(tmp_path, batch_size=3, resolution=40, crop="center")
    images = dict(zip(batch["key"], batch["image"]))
    assert (images["gray.png"][0] == images["gray.png"][2]).all()
    np.testing.assert_allclose(images["rgba.png"], images["deep.png"], atol=1e-6)


# --- bad input ---------------------------------------------------------------------------


def damage_first_image(root):
    path = root / "img_0.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path


def test_truncated_file_raises_with_its_name_under_error(txt_folder):
    damage_first_image(txt_folder)  # its header is intact: setup passes, decoding fails
    with pytest.raises(BadSampleError, match="img_0.jpg.*truncated"):
        load_all(txt_folder, batch_size=6)


def test_truncated_file_is_substituted_under_skip_and_logged(txt_folder, caplog):
    damage_first_image(txt_folder)
    with caplog.at_level(logging.WARNING):
        batches = load_all(txt_folder, batch_size=6, on_bad_sample="skip")
    loaded = keys(batches)
    assert len(loaded) == 6 and "img_0.jpg" not in loaded  # the epoch keeps its length
    assert loaded.count("img_1.jpg") == 2  # replaced by the next sample in index order
    assert "img_0.jpg" in caplog.text and "1 substituted" in caplog.text


BAD_LISTING_LINES = {
    "missing file": (json.dumps({"file_name": "images/absent.png", "text": "gone"}), r"absent.png \(listed at .*metadata.jsonl, line 5\): not a readable image"),
    "missing key": (json.dumps({"file_name": "images/0.png"}), "line 5: needs keys"),
    "not json": ("{file_name: images/0.png", "line 5: not valid JSON"),
    "empty caption": (json.dumps({"file_name": "images/0.png", "text": " "}), r"0.png \(listed at .*line 5\): missing or empty caption"),
    "missing caption": (json.dumps({"file_name": "images/0.png", "text": None}), r"0.png \(listed at .*line 5\): missing or empty caption"),
    "file_name null": (json.dumps({"file_name": None, "text": "x"}), "line 5: 'file_name' must be a file path .*got null"),
    "file_name number": (json.dumps({"file_name": 7, "text": "x"}), "line 5: 'file_name' must be a file path .*got 7"),
    "file_name empty": (json.dumps({"file_name": "", "text": "x"}), "line 5: 'file_name' must be a file path .*got \"\""),
    "file_name list": (json.dumps({"file_name": ["a.png"], "text": "x"}), "line 5: 'file_name' must be a file path"),
    "control number": (json.dumps({"file_name": "images/0.png", "text": "x", "conditioning_image": 3}), "line 5: 'conditioning_image' must be a file path .*got 3"),
    "caption number": (json.dumps({"file_name": "images/0.png", "text": 42}), "line 5: 'text' must be a string, got 42"),
    "not utf-8": ('{"file_name": "images/0.png", "text": "caf\xe9"}'.encode("latin-1"), "line 5: not UTF-8 text"),
}


@pytest.mark.parametrize("problem", BAD_LISTING_LINES)
def test_bad_listings_fail_setup_or_are_skipped(imagefolder, caplog, problem):
    bad, expected = BAD_LISTING_LINES[problem]
    listing = imagefolder / "metadata.jsonl"
    listing.write_bytes(listing.read_bytes() + (bad if isinstance(bad, bytes) else bad.encode()) + b"\n")
    with pytest.raises(BadSampleError, match=expected):
        load_all(imagefolder)
    with caplog.at_level(logging.WARNING):
        assert len(keys(load_all(imagefolder, on_bad_sample="skip"))) == 4
    assert "skipped 1 of 5 samples" in caplog.text


def test_a_listing_with_a_byte_order_mark_reads_as_without(imagefolder):
    """Editors on Windows start UTF-8 files with a BOM, which is no part of the first line's JSON."""
    listing = imagefolder / "metadata.jsonl"
    listing.write_bytes(b"\xef\xbb\xbf" + listing.read_bytes())
    assert keys(load_all(imagefolder)) == [f"images/{i}.png" for i in range(4)]


def test_a_file_that_fails_to_decode_names_its_listing_line(imagefolder):
    image = imagefolder / "images" / "2.png"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])  # header intact: fails at load
    with pytest.raises(BadSampleError, match=r"images/2.png \(listed at .*metadata.jsonl, line 3\)"):
        load_all(imagefolder)


def test_image_without_caption_file(txt_folder):
    (txt_folder / "img_3.txt").unlink()
    with pytest.raises(BadSampleError, match="img_3.jpg: missing or empty caption"):
        load_all(txt_folder)
    assert "img_3.jpg" not in keys(load_all(txt_folder, on_bad_sample="skip"))


def test_control_of_another_aspect_ratio_is_bad_same_aspect_is_resized(imagefolder):
    cv2.imwrite(str(imagefolder / "conditioning" / "1.png"), np.zeros((32, 48, 3), np.uint8))  # half size
    cv2.imwrite(str(imagefolder / "conditioning" / "2.png"), np.zeros((50, 50, 3), np.uint8))  # square
    with pytest.raises(BadSampleError, match=r"conditioning/2.png \(listed at .*line 3\): map of size 50×50 does not match image 96×64"):
        load_all(imagefolder, PrecomputedControl(), batch_size=4)
    loaded = keys(load_all(imagefolder, PrecomputedControl(), batch_size=4, on_bad_sample="skip"))
    assert "images/2.png" not in loaded and "images/1.png" in loaded


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda root: root / "absent", "data folder not found: .*absent"),
        (lambda root: root, "found no metadata.jsonl, prompt.json or image \\+ .txt"),
        (lambda root: (root / "notes.txt").write_text("x") and root, "found no metadata.jsonl"),
    ],
)
def test_misconfigured_folders_fail_at_setup_naming_the_path(tmp_path, setup, message):
    root = setup(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_all(root)


def test_unknown_format_and_policy_are_refused(txt_folder):
    with pytest.raises(ValueError, match="unknown data format 'csv'"):
        load_all(txt_folder, format="csv")
    with pytest.raises(ValueError, match="on_bad_sample"):
        load_all(txt_folder, on_bad_sample="ignore")


def test_folder_of_only_bad_samples_fails_at_setup(txt_folder):
    for caption in txt_folder.glob("*.txt"):
        caption.unlink()
    (txt_folder / "img_0.txt").write_text("")  # makes the folder look like txt pairs
    with pytest.raises(ValueError, match="every one of its 6 samples is bad"):
        load_all(txt_folder, on_bad_sample="skip")


def test_splits_are_disjoint_stable_and_cover_everything(tmp_path):
    for i in range(40):
        write_rgb(tmp_path / f"{i:02d}.png", np.full((8, 8, 3), i, np.uint8))
        (tmp_path / f"{i:02d}.txt").write_text("x")
    datamodule = FolderDataModule(CannyAnnotator(), str(tmp_path), resolution=8, val_fraction=0.25, test_fraction=0.25)
    datamodule.setup()
    splits = {name: {r.key for r in dataset.source.records} for name, dataset in datamodule.datasets.items()}
    assert sum(map(len, splits.values())) == 40 and set.union(*splits.values()) == {f"{i:02d}.png" for i in range(40)}
    assert 4 <= len(splits["val"]) <= 16 and 4 <= len(splits["test"]) <= 16
    again = FolderDataModule(
        CannyAnnotator(), str(tmp_path), resolution=8, val_fraction=0.25, test_fraction=0.25, seed=9
    )
    again.setup()
    assert {r.key for r in again.datasets["val"].source.records} == splits["val"]


def test_a_folder_that_fails_to_decode_throughout_stops_with_a_clear_error(txt_folder):
    for image in txt_folder.glob("*.jpg"):
        image.write_bytes(image.read_bytes()[: image.stat().st_size // 3])  # headers intact, data cut
    with pytest.raises(RuntimeError, match="6 consecutive bad samples"):
        load_all(txt_folder, on_bad_sample="skip")


def small_folder(root, count: int):
    for i in range(count):
        write_rgb(root / f"img_{i}.jpg", np.full((8, 8, 3), 10 * i, np.uint8))
        (root / f"img_{i}.txt").write_text(f"photo {i}")
    return root


def split_sizes(root, **settings) -> dict[str, int]:
    datamodule = FolderDataModule(CannyAnnotator(), str(root), resolution=8, **settings)
    datamodule.setup("fit")
    return {name: len(dataset) for name, dataset in datamodule.datasets.items()}


def test_two_images_mostly_for_validation_still_train(tmp_path):
    """Both keys hash into the 90 % val band: the hash alone would leave nothing to train on."""
    for i in range(2):
        write_rgb(tmp_path / f"{i}.png", np.full((8, 8, 3), 10 * i, np.uint8))
        (tmp_path / f"{i}.txt").write_text("x")
    assert split_sizes(tmp_path, val_fraction=0.9) == {"train": 1, "val": 1}


def test_nine_images_at_the_default_share_get_a_validation_image(tmp_path):
    """None of the nine keys hashes into the 5 % band; validation needs one all the same."""
    sizes = split_sizes(small_folder(tmp_path, 9))
    assert sizes == {"train": 8, "val": 1}
    assert split_sizes(tmp_path, val_fraction=0.0) == {"train": 9, "val": 0}  # none asked for, none made


def test_too_few_images_for_the_asked_splits_is_a_clear_error(tmp_path):
    with pytest.raises(EmptySplitError, match="1 sample.* cannot fill the val, train splits .*val_fraction=0.05"):
        split_sizes(small_folder(tmp_path, 1))
    with pytest.raises(EmptySplitError, match="2 sample.* cannot fill the test, val, train splits"):
        split_sizes(small_folder(tmp_path, 2), test_fraction=0.1)


def test_an_empty_split_is_a_loop_to_skip_for_lightning_and_an_error_for_evaluate(tmp_path):
    """`val_fraction=0` validates nothing, also in a fresh process's `validate` stage (a
    ddp_spawn run's final validation); `conftrl.evaluate split=test` of a run without a test
    split names the split and the settings."""
    folder = str(small_folder(tmp_path, 4))
    datamodule = FolderDataModule(CannyAnnotator(), folder, resolution=8, val_fraction=0.0, batch_size=2)
    datamodule.setup("validate")
    assert list(datamodule.val_dataloader()) == []
    with pytest.raises(EmptySplitError, match=f"the test split is empty in {tmp_path} .*test_fraction=0.0"):
        split_items(FolderDataModule(CannyAnnotator(), folder, resolution=8), "test", 2)
