"""BiT ResNetV2 weights -> tljax `resnetv2` variables, from timm or from BiT's own .npz.

timm `resnetv2_*_bit` state dict (torch -> tljax; StdConv2d OIHW -> HWIO):

    stem.conv                        -> stem_conv
    stages.S.blocks.B.normI          -> stageS_blockB/normI  (weight/bias -> scale/bias)
    stages.S.blocks.B.convI          -> stageS_blockB/convI
    stages.S.blocks.B.downsample.conv -> stageS_blockB/downsample
    norm                             -> norm
    head.fc (1x1 Conv2d)             -> head (Dense)

BiT .npz (google-research/big_transfer, HWIO kernels already):

    resnet/root_block/standardized_conv2d      -> stem_conv
    resnet/block{S+1}/unit{B+1:02d}/{a,b,c}/group_norm -> stageS_blockB/norm{1,2,3}
    .../{a,b,c}/standardized_conv2d            -> stageS_blockB/conv{1,2,3}
    .../a/proj/standardized_conv2d             -> stageS_blockB/downsample
    resnet/group_norm                          -> norm
    resnet/head/conv2d                         -> head
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from tljax import tree
from tljax.models import resnetv2 as resnetv2_lib
from tljax.pretrained.common import SourceWeights, conv, indices
from tljax.pretrained.info import PretrainedInfo

VALUE_RANGE = (-1.0, 1.0)  # BiT: mean 0.5, std 0.5 on 0..1 pixels


def _depth(counts: tuple[int, ...]) -> int:
    for depth, spec in resnetv2_lib.DEPTHS.items():
        if tuple(spec) == counts:
            return depth
    raise ValueError(f"Not a BiT ResNetV2 layout: stage sizes {counts}.")


def _info(source: str, depth: int, width: int, num_classes: int | None) -> PretrainedInfo:
    return PretrainedInfo(source=source, model_name="resnetv2",
                          model_kwargs={"depth": depth, "width": width},
                          num_classes=num_classes,
                          value_range=VALUE_RANGE)


def convert_timm(state_dict: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], PretrainedInfo]:
    """A timm `resnetv2_*_bit` state dict -> (tljax variables, PretrainedInfo)."""
    src = SourceWeights(state_dict, "timm ResNetV2 state dict")
    names = src.names()
    counts = tuple(len(indices(names, rf"stages\.{s}\.blocks\.(\d+)\.")) for s in range(4))
    depth = _depth(counts)
    out: dict[str, Any] = {"params/stem_conv/kernel": conv(src["stem.conv.weight"])}
    width = out["params/stem_conv/kernel"].shape[-1] // 64
    for s, n in enumerate(counts):
        for b in range(n):
            p, t = f"stages.{s}.blocks.{b}", f"params/stage{s}_block{b}"
            for i in (1, 2, 3):
                out[f"{t}/conv{i}/kernel"] = conv(src[f"{p}.conv{i}.weight"])
                out[f"{t}/norm{i}/scale"] = src[f"{p}.norm{i}.weight"]
                out[f"{t}/norm{i}/bias"] = src[f"{p}.norm{i}.bias"]
            if f"{p}.downsample.conv.weight" in src:
                out[f"{t}/downsample/kernel"] = conv(src[f"{p}.downsample.conv.weight"])
    out["params/norm/scale"], out["params/norm/bias"] = src["norm.weight"], src["norm.bias"]
    num_classes = None
    if "head.fc.weight" in src:
        out["params/head/kernel"] = np.ascontiguousarray(src["head.fc.weight"][:, :, 0, 0].T)
        out["params/head/bias"] = src["head.fc.bias"]
        num_classes = int(out["params/head/bias"].shape[0])
    src.check_all_used()
    return tree.unflatten(out), _info("timm", depth, width, num_classes)


def convert_bit_npz(weights: Mapping[str, np.ndarray], prefix: str = "resnet/"
                    ) -> tuple[dict[str, Any], PretrainedInfo]:
    """A BiT .npz (big_transfer's JAX/TF layout) -> (tljax variables, PretrainedInfo)."""
    src = SourceWeights(weights, "BiT .npz checkpoint")
    names = src.names()
    counts = tuple(len(indices(names, rf"{prefix}block{s + 1}/unit(\d+)/")) for s in range(4))
    depth = _depth(counts)
    out: dict[str, Any] = {
        "params/stem_conv/kernel": src[f"{prefix}root_block/standardized_conv2d/kernel"]}
    width = out["params/stem_conv/kernel"].shape[-1] // 64
    for s, n in enumerate(counts):
        for b in range(n):
            p, t = f"{prefix}block{s + 1}/unit{b + 1:02d}", f"params/stage{s}_block{b}"
            for i, unit in enumerate("abc", start=1):
                out[f"{t}/conv{i}/kernel"] = src[f"{p}/{unit}/standardized_conv2d/kernel"]
                out[f"{t}/norm{i}/scale"] = src[f"{p}/{unit}/group_norm/gamma"].reshape(-1)
                out[f"{t}/norm{i}/bias"] = src[f"{p}/{unit}/group_norm/beta"].reshape(-1)
            if f"{p}/a/proj/standardized_conv2d/kernel" in src:
                out[f"{t}/downsample/kernel"] = src[f"{p}/a/proj/standardized_conv2d/kernel"]
    out["params/norm/scale"] = src[f"{prefix}group_norm/gamma"].reshape(-1)
    out["params/norm/bias"] = src[f"{prefix}group_norm/beta"].reshape(-1)
    num_classes = None
    if f"{prefix}head/conv2d/kernel" in src:
        kernel = src[f"{prefix}head/conv2d/kernel"]
        out["params/head/kernel"] = kernel.reshape(kernel.shape[-2], kernel.shape[-1])
        out["params/head/bias"] = src[f"{prefix}head/conv2d/bias"]
        num_classes = int(out["params/head/bias"].shape[0])
    src.check_all_used()
    return tree.unflatten(out), _info("bit", depth, width, num_classes)
