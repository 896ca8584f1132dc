"""Tiny local estimators built offline: an ONNX depth net for `cv2.dnn` and random-weight
transformers DPT / SegFormer folders."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch


def save_brightness_onnx(path: Path) -> Path:
    """A 1-conv ONNX 'depth' net: ReLU of the mean of the input channels."""
    conv = torch.nn.Conv2d(3, 1, 1, bias=False)
    conv.weight.data.fill_(1 / 3)
    net = torch.nn.Sequential(conv, torch.nn.ReLU())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, torch.zeros(1, 3, 32, 32), path, dynamo=False, input_names=["image"])
    return path


def save_transformers_estimators(root: Path) -> Path:
    """Random-weight DPT (`root/dpt`, depth) and SegFormer (`root/segformer`, 5 classes)."""
    from transformers import (
        DPTConfig,
        DPTForDepthEstimation,
        DPTImageProcessor,
        SegformerConfig,
        SegformerForSemanticSegmentation,
        SegformerImageProcessor,
    )

    torch.manual_seed(0)
    depth_config = DPTConfig(
        hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32, image_size=32,
        patch_size=8, neck_hidden_sizes=[8, 8, 8, 8], fusion_hidden_size=8, head_hidden_size=8,
        backbone_out_indices=[0, 1, 2, 3],
    )  # fmt: skip
    DPTForDepthEstimation(depth_config).save_pretrained(root / "dpt")
    DPTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "dpt")
    segmentation_config = SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[7, 3],
        strides=[4, 2], num_attention_heads=[1, 1], mlp_ratios=[2, 2], decoder_hidden_size=16, num_labels=5,
    )  # fmt: skip
    SegformerForSemanticSegmentation(segmentation_config).save_pretrained(root / "segformer")
    SegformerImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "segformer")
    return root
