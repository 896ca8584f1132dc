"""Control encoders and the paths by which control reaches the frozen UNet."""

from conftrl.control.encoder import ControlEncoder, encoder_for_unet
from conftrl.control.paths import (
    CONTROL_PATHS,
    ControlNetControl,
    EncoderControl,
    build_control_path,
    load_control_path,
)

__all__ = [
    "CONTROL_PATHS",
    "ControlEncoder",
    "ControlNetControl",
    "EncoderControl",
    "build_control_path",
    "encoder_for_unet",
    "load_control_path",
]
