"""The web demo: served on localhost, driven through Gradio's client and a real browser."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest

pytest.importorskip("gradio", reason="the demo is the optional extra conftrl[demo]")
from gradio_client import Client, handle_file  # noqa: E402

from conftrl.cli.demo import Demo, DemoInputError, build_page, newest_adapter  # noqa: E402
from conftrl.training.adapter import load_adapter  # noqa: E402

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


@pytest.fixture(scope="module")
def served(trained_run):
    """The page of a trained adapter, on a free localhost port; its URL."""
    page = build_page(Demo(load_adapter(trained_run / "adapter"), max_side=512), "conftrl test")
    page.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, show_error=True)
    yield page.local_url
    page.close()


def request(client: Client, image=None, drawing=None, num_images: int = 2):
    return client.predict(image, drawing, "a red circle", 0, 2, 4.0, 1.0, num_images, "auto", api_name="/generate")


@pytest.fixture
def photo(tmp_path):
    image = np.full((48, 80, 3), 128, np.uint8)
    cv2.circle(image, (40, 24), 12, (0, 0, 255), cv2.FILLED)
    cv2.imwrite(str(tmp_path / "photo.png"), image)
    return tmp_path / "photo.png"


def test_an_uploaded_photo_gives_its_edges_and_one_sample_per_image(served, photo):
    control, gallery = request(Client(served, verbose=False), handle_file(str(photo)), num_images=3)
    edges = cv2.imread(control)
    assert edges.shape[:2] == (32, 32)  # the adapter's training resolution (tests' tiny base)
    assert set(np.unique(edges)) <= {0, 255} and edges.any()  # Canny of the circle, not the photo
    samples = [cv2.imread(item["image"]) for item in gallery]
    assert len(samples) == 3 and all(s.shape == (32, 32, 3) for s in samples)
    assert not np.array_equal(samples[0], samples[1])  # seeds 0, 1, 2


def test_a_drawing_is_a_control(served, tmp_path):
    canvas = np.zeros((64, 64, 3), np.uint8)
    cv2.rectangle(canvas, (16, 16), (48, 48), (255, 255, 255), 2)
    cv2.imwrite(str(tmp_path / "drawing.png"), canvas)
    drawing = {"background": None, "layers": [], "composite": handle_file(str(tmp_path / "drawing.png"))}
    control, gallery = request(Client(served, verbose=False), drawing=drawing, num_images=1)
    assert cv2.imread(control).any() and len(gallery) == 1


@pytest.mark.parametrize("case", ["no image", "unreadable file", "huge image"])
def test_bad_input_is_a_message_and_the_server_keeps_serving(served, photo, tmp_path, case):
    client = Client(served, verbose=False)
    if case == "no image":
        image, expected = None, "no control image"
    elif case == "unreadable file":
        (tmp_path / "broken.png").write_bytes(b"not an image")
        image, expected = handle_file(str(tmp_path / "broken.png")), "cannot read the uploaded image"
    else:
        cv2.imwrite(str(tmp_path / "huge.png"), np.zeros((600, 700, 3), np.uint8))
        image, expected = handle_file(str(tmp_path / "huge.png")), "700×600 px; the demo takes up to 512"
    with pytest.raises(Exception, match=expected):
        request(client, image)
    control, gallery = request(client, handle_file(str(photo)), num_images=1)  # still serving
    assert len(gallery) == 1


def test_the_newest_adapter_is_found_or_a_clear_message_given(trained_run, tmp_path):
    with pytest.raises(DemoInputError, match="no trained adapter under .*make train"):
        newest_adapter(tmp_path)
    for run, written in (("runs/b", 1_000), ("runs/a", 2_000), ("multiruns/x/0", 1_500)):
        adapter = shutil.copytree(trained_run / "adapter", tmp_path / run / "adapter")
        os.utime(adapter / "conftrl.yaml", (written, written))
    assert newest_adapter(tmp_path) == tmp_path / "runs/a/adapter"


def test_the_command_without_an_adapter_says_what_to_do(tmp_path):
    done = subprocess.run([sys.executable, "-m", "conftrl.demo"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "conftrl.demo: no trained adapter under" in done.stderr


def test_the_page_renders_its_controls_in_a_browser(served, tmp_path):
    browser = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    if browser is None:
        pytest.skip("no headless browser installed (Debian's `chromium` package)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000", "--run-all-compositor-stages-before-draw"]
    dom = subprocess.run([browser, *flags, "--dump-dom", served], capture_output=True, text=True, timeout=120).stdout
    for label in ("Control image or photo", "Draw", "Prompt", "Seed", "Steps", "CFG scale", "Control scale", "Generate", "Samples"):
        assert label in dom, label
    screenshot = tmp_path / "demo.png"
    subprocess.run([browser, *flags, "--window-size=1280,900", f"--screenshot={screenshot}", served],
                   capture_output=True, timeout=120)
    assert cv2.imread(str(screenshot)).std() > 0  # a rendered page, not a blank one
