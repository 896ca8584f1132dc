"""`conftrl.generate`: a trained adapter, a control image and a prompt → PNGs."""

from __future__ import annotations

import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
from support.training_runs import compose_config

from conftrl.cli.generate import generate
from conftrl.control.inputs import should_annotate
from conftrl.training.adapter import AdapterError
from datamodules import BadSampleError
from datamodules.annotators import CannyAnnotator, DepthAnnotator, PrecomputedControl


def write_rgb(path, image: np.ndarray):
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return path


@pytest.fixture
def photo(tmp_path):
    """A red disc on gray: not a control yet."""
    image = np.full((48, 48, 3), 128, np.uint8)
    cv2.circle(image, (24, 24), 12, (220, 30, 30), -1)
    return write_rgb(tmp_path / "disc.png", image)


def read_rgb(path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def run_generate(trained_run, tmp_path, *overrides):
    cfg = compose_config("cli/generate", [f"adapter={trained_run / 'adapter'}", "prompt=a red circle", *overrides], tmp_path)
    return generate(cfg)


def test_images_per_seed_at_the_training_resolution(trained_run, tmp_path, photo):
    paths = run_generate(trained_run, tmp_path / "out", f"control={photo}", "seeds=[3,4,3]", "steps=2", "cfg_scale=2.5")
    assert [p.name for p in paths] == ["disc_seed3.png", "disc_seed4.png", "disc_seed3.png"]
    first, second = read_rgb(paths[0]), read_rgb(paths[1])
    assert first.shape == (32, 32, 3)  # data.resolution of the run
    assert np.abs(first.astype(int) - second).mean() > 5  # another seed, another image
    again = run_generate(trained_run, tmp_path / "again", f"control={photo}", "seeds=[3]", "steps=2", "cfg_scale=2.5")
    # A seed fixes the image, up to a rounding flip: BLAS kernels may block a batch of 3 and
    # a batch of 1 differently.
    assert np.abs(read_rgb(again[0]).astype(int) - first).max() <= 1


def test_a_photo_is_annotated_and_an_edge_map_used_as_is(trained_run, tmp_path, photo):
    run_generate(trained_run, tmp_path / "photo", f"control={photo}", "steps=1")
    resized = cv2.resize(read_rgb(photo), (32, 32), interpolation=cv2.INTER_AREA)
    annotated = read_rgb(tmp_path / "photo" / "disc_control.png")
    assert np.array_equal(annotated[..., 0], cv2.Canny(resized, 100, 200))

    edges = np.zeros((32, 32, 3), np.uint8)
    cv2.rectangle(edges, (8, 8), (24, 24), (255, 255, 255), 1)
    run_generate(trained_run, tmp_path / "edges", f"control={write_rgb(tmp_path / 'edges.png', edges)}", "steps=1")
    assert np.array_equal(read_rgb(tmp_path / "edges" / "edges_control.png"), edges)

    run_generate(trained_run, tmp_path / "forced", f"control={photo}", "steps=1", "annotate=false")
    assert np.array_equal(read_rgb(tmp_path / "forced" / "disc_control.png"), resized)


def test_the_recorded_annotator_decides_what_auto_does():
    photo, edges = np.full((8, 8, 3), 90, np.uint8), np.zeros((8, 8, 3), np.uint8)
    assert should_annotate(CannyAnnotator(), photo) and not should_annotate(CannyAnnotator(), edges)
    assert not should_annotate(DepthAnnotator(), photo)  # no estimator: the image is the depth map
    assert not should_annotate(PrecomputedControl(), photo)


def test_missing_and_corrupt_inputs_are_named(trained_run, tmp_path, photo):
    with pytest.raises(AdapterError, match="nowhere.*not a conftrl adapter folder"):
        run_generate(tmp_path / "nowhere", tmp_path / "out", f"control={photo}")
    with pytest.raises(BadSampleError, match="missing.png"):
        run_generate(trained_run, tmp_path, f"control={tmp_path / 'missing.png'}")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(BadSampleError, match="notes.png.*cannot decode"):
        run_generate(trained_run, tmp_path, f"control={tmp_path / 'notes.png'}")

    broken = shutil.copytree(trained_run / "adapter", tmp_path / "broken" / "adapter")
    (broken / "unet" / "adapter_model.safetensors").write_bytes(b"truncated")
    with pytest.raises(AdapterError, match="cannot apply the adapter"):
        run_generate(broken.parent, tmp_path, f"control={photo}")
    (broken / "conftrl.yaml").write_text("method: [unclosed")
    with pytest.raises(AdapterError, match="conftrl.yaml.*corrupt"):
        run_generate(broken.parent, tmp_path, f"control={photo}")


@pytest.mark.slow
def test_command_line_help_and_one_line_errors(tmp_path):
    help_text = subprocess.run(
        [sys.executable, "-m", "conftrl.generate", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "python -m conftrl.generate adapter=" in help_text and "cfg_scale" in help_text
    failed = subprocess.run(
        [sys.executable, "-m", "conftrl.generate", f"adapter={tmp_path}", "control=x.png", "prompt=a circle",
         f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True,
    )
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines()[-1].startswith("conftrl.generate: ")
    assert "Traceback" not in failed.stderr
