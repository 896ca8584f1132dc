"""Orthogonal Finetuning (OFT / COFT) for any torch model: the seed's API, the paper's maths.

Knows nothing of diffusion or Lightning, so it can be used and tested on its own.
"""

from conftrl.oft.config import OFTConfig
from conftrl.oft.layer import Conv2d, Linear, OFTLayer
from conftrl.oft.model import DEFAULT_TARGET_MODULES, OFTModel
from conftrl.oft.recompute import checkpoint_keeping_rotations
from conftrl.oft.rotation import OFTRotation

__all__ = ["OFTConfig", "OFTModel", "OFTLayer", "OFTRotation", "Linear", "Conv2d", "DEFAULT_TARGET_MODULES",
           "checkpoint_keeping_rotations"]
