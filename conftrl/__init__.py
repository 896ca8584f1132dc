"""conftrl: controllable text-to-image generation by Orthogonal Finetuning (OFT / COFT)."""

from conftrl.oft import OFTConfig, OFTModel

__all__ = ["OFTConfig", "OFTModel"]
__version__ = "0.1.0"
