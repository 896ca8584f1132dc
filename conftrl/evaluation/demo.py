"""A web page to try a trained adapter: upload or draw a control, type a prompt, see samples.

The page shows the control as the model sees it (annotated by the adapter's own annotator
when the image is a photo, as `conftrl.generate` does) and one sample per seed, from `seed`
on. A bad image (none, unreadable, too large) gives a message in the page, and the server
keeps serving. Gradio is the optional extra `conftrl[demo]`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from conftrl.control.inputs import control_from_image
from conftrl.training.adapter import CONFIG_FILE, TrainedAdapter
from conftrl.utils.images import to_uint8
from datamodules import BadSampleError
from datamodules.decode import read_rgb

ANNOTATE = {"auto": "auto", "annotate": True, "use as is": False}


class DemoInputError(ValueError):
    """What the page tells its user instead of sampling."""


def newest_adapter(root: str | Path) -> Path:
    """The most recently written adapter folder under `root` (a run's `adapter/`)."""
    adapters = sorted(Path(root).glob(f"**/adapter/{CONFIG_FILE}"), key=lambda path: path.stat().st_mtime)
    if not adapters:
        raise DemoInputError(
            f"no trained adapter under {str(Path(root).resolve())!r}; train one (`make train`) or pass adapter=<folder>"
        )
    return adapters[-1].parent


class Demo:
    """What the page does, without the page: testable on its own."""

    def __init__(self, adapter: TrainedAdapter, max_side: int = 4096):
        self.adapter, self.max_side = adapter, max_side
        self.annotator = adapter.build("annotator")
        self.resolution = int(adapter.config.data.resolution)

    def control(self, image_path: str | None, drawing: dict | None, annotate: str) -> torch.Tensor:
        """The control (1×3×R×R in [0, 1]) of an uploaded file, else of the drawing."""
        image, name = self._image(image_path, drawing)
        if max(image.shape[:2]) > self.max_side:
            raise DemoInputError(f"{name} is {image.shape[1]}×{image.shape[0]} px; the demo takes up to {self.max_side} a side")
        try:
            return control_from_image(image, name, self.annotator, self.resolution, ANNOTATE[annotate])
        except BadSampleError as error:
            raise DemoInputError(str(error)) from error

    def _image(self, image_path: str | None, drawing: dict | None) -> tuple[np.ndarray, str]:
        if image_path:
            try:
                return read_rgb(Path(image_path)), Path(image_path).name
            except BadSampleError as error:
                raise DemoInputError(f"cannot read the uploaded image: {error}") from error
        composite = (drawing or {}).get("composite")
        if composite is not None and np.asarray(composite)[..., :3].any():
            return np.ascontiguousarray(np.asarray(composite)[..., :3], dtype=np.uint8), "the drawing"
        raise DemoInputError("no control image: upload one or draw on the canvas")

    def generate(
        self, image_path: str | None, drawing: dict | None, prompt: str, seed: int, steps: int, cfg_scale: float,
        control_scale: float, num_images: int, annotate: str,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        control = self.control(image_path, drawing, annotate)
        seeds = [int(seed) + i for i in range(int(num_images))]
        images = self.adapter.sample(
            [prompt] * len(seeds), control.repeat(len(seeds), 1, 1, 1), seeds,
            steps=int(steps), cfg_scale=float(cfg_scale), control_scale=float(control_scale),
        )
        return to_uint8(control)[0], list(images)


def build_page(demo: Demo, title: str):
    """The Gradio page around `demo`; its `generate` event is also the API `/generate`."""
    import gradio as gr

    sampling = demo.adapter.sampling()

    def generate(*inputs):
        try:
            return demo.generate(*inputs)
        except DemoInputError as error:
            raise gr.Error(str(error)) from None

    with gr.Blocks(title=title) as page:
        gr.Markdown(f"## {title}\nUpload an image or draw a control, type a prompt, and generate.")
        with gr.Row():
            with gr.Column():
                with gr.Tab("Upload"):
                    # A file, not gr.Image: an unreadable upload then reaches `Demo`, which names the problem.
                    image = gr.File(label="Control image or photo", file_types=["image"], type="filepath")
                with gr.Tab("Draw"):
                    drawing = gr.Sketchpad(label="Draw a control", type="numpy", image_mode="RGB")
                prompt = gr.Textbox(label="Prompt", value="a red circle on a gray background")
                with gr.Row():
                    seed = gr.Number(label="Seed", value=0, precision=0)
                    num_images = gr.Slider(1, 8, value=4, step=1, label="Images")
                steps = gr.Slider(1, 100, value=sampling["steps"], step=1, label="Steps")
                cfg_scale = gr.Slider(1.0, 15.0, value=sampling["cfg_scale"], step=0.5, label="CFG scale")
                control_scale = gr.Slider(0.0, 3.0, value=sampling["control_scale"], step=0.05, label="Control scale")
                annotate = gr.Radio(list(ANNOTATE), value="auto", label="Annotate the image")
                button = gr.Button("Generate", variant="primary")
            with gr.Column():
                control = gr.Image(label="Control as the model sees it", type="numpy", interactive=False, format="png")
                gallery = gr.Gallery(label="Samples", columns=4, format="png")
        button.click(
            generate, [image, drawing, prompt, seed, steps, cfg_scale, control_scale, num_images, annotate],
            [control, gallery], api_name="generate",
        )
    return page
