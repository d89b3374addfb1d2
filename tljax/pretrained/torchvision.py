"""torchvision ResNet and VGG state dicts -> tljax `resnet` / `vgg` variables.

ResNet mapping (torch -> tljax; Conv2d OIHW -> HWIO, Linear transposed):

    conv1.weight                    -> params/conv1/kernel
    bn1.{weight,bias}               -> params/bn1/{scale,bias}
    bn1.{running_mean,running_var}  -> batch_stats/bn1/{mean,var}
    layerK.J.convI / bnI            -> layerK_J/convI / bnI
    layerK.J.downsample.0 / .1      -> layerK_J/downsample_conv / downsample_bn
    fc                              -> head

VGG mapping (features.N numbered across ReLU/pool layers in torchvision):

    features.N (the i-th conv of stage s) -> conv{s}_{i}
    classifier.0 / classifier.3           -> fc6 / fc7
    classifier.6                          -> head

torchvision flattens the 7x7 pooled features as (C, H, W) before
classifier.0; tljax flattens (H, W, C), so fc6's input rows are permuted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from tljax import tree
from tljax.models import resnet as resnet_lib
from tljax.models import vgg as vgg_lib
from tljax.pretrained.common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SourceWeights,
    batch_norm,
    conv,
    dense,
    indices,
)
from tljax.pretrained.info import PretrainedInfo


def _imagenet_info(model_name: str, kwargs: dict[str, Any], num_classes: int | None
                   ) -> PretrainedInfo:
    return PretrainedInfo(source="torchvision", model_name=model_name, model_kwargs=kwargs,
                          num_classes=num_classes, resolution=224, mean=IMAGENET_MEAN,
                          std=IMAGENET_STD)


def resnet_depth(names: list[str]) -> int:
    """ResNet depth from the blocks per stage and the block kind found in a state dict."""
    counts = tuple(len(indices(names, rf"layer{k}\.(\d+)\.")) for k in range(1, 5))
    kind = "bottleneck" if "layer1.0.conv3.weight" in names else "basic"
    for depth, spec in resnet_lib.DEPTHS.items():
        if spec == (kind, counts):
            return depth
    raise ValueError(f"Not a torchvision ResNet layout: {kind} blocks with stage sizes {counts}.")


def convert_resnet(state_dict: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], PretrainedInfo]:
    """A torchvision ResNet state dict -> (tljax `resnet` variables, PretrainedInfo)."""
    src = SourceWeights(state_dict, "torchvision ResNet state dict")
    depth = resnet_depth(src.names())
    kind, counts = resnet_lib.DEPTHS[depth]
    out: dict[str, Any] = {"params/conv1/kernel": conv(src["conv1.weight"])}
    batch_norm(src, "bn1", "bn1", out)
    convs = 3 if kind == "bottleneck" else 2
    for k, n in enumerate(counts, start=1):
        for j in range(n):
            prefix, target = f"layer{k}.{j}", f"layer{k}_{j}"
            for i in range(1, convs + 1):
                out[f"params/{target}/conv{i}/kernel"] = conv(src[f"{prefix}.conv{i}.weight"])
                batch_norm(src, f"{prefix}.bn{i}", f"{target}/bn{i}", out)
            if f"{prefix}.downsample.0.weight" in src:
                out[f"params/{target}/downsample_conv/kernel"] = conv(
                    src[f"{prefix}.downsample.0.weight"])
                batch_norm(src, f"{prefix}.downsample.1", f"{target}/downsample_bn", out)
    num_classes = None
    if "fc.weight" in src:
        dense(src, "fc", "head", out)
        num_classes = int(out["params/head/bias"].shape[0])
    src.check_all_used()
    return tree.unflatten(out), _imagenet_info("resnet", {"depth": depth}, num_classes)


def convert_vgg(state_dict: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], PretrainedInfo]:
    """A torchvision VGG (no batch norm) state dict -> (tljax `vgg` variables, PretrainedInfo)."""
    src = SourceWeights(state_dict, "torchvision VGG state dict")
    if any(name.endswith("running_mean") for name in src.names()):
        raise ValueError("VGG with batch norm (vgg*_bn) is not supported; use the plain VGG.")
    conv_ids = indices(src.names(), r"features\.(\d+)\.weight")
    depth = {8: 11, 10: 13, 13: 16, 16: 19}.get(len(conv_ids))
    if depth is None:
        raise ValueError(f"Not a torchvision VGG layout: {len(conv_ids)} convolutions.")
    names = [f"conv{s + 1}_{i + 1}" for s, n in enumerate(vgg_lib.CONFIGS[depth])
             for i in range(n)]
    out: dict[str, Any] = {}
    for idx, name in zip(conv_ids, names, strict=True):
        out[f"params/{name}/kernel"] = conv(src[f"features.{idx}.weight"])
        out[f"params/{name}/bias"] = src[f"features.{idx}.bias"]
    # fc6: torch input index c*49 + h*7 + w; tljax's is (h*7 + w)*C + c.
    w = src["classifier.0.weight"]
    channels = vgg_lib.STAGE_WIDTHS[-1]
    w = w.reshape(w.shape[0], channels, 7, 7).transpose(2, 3, 1, 0).reshape(-1, w.shape[0])
    out["params/fc6/kernel"] = np.ascontiguousarray(w)
    out["params/fc6/bias"] = src["classifier.0.bias"]
    dense(src, "classifier.3", "fc7", out)
    num_classes = None
    if "classifier.6.weight" in src:
        dense(src, "classifier.6", "head", out)
        num_classes = int(out["params/head/bias"].shape[0])
    src.check_all_used()
    return tree.unflatten(out), _imagenet_info("vgg", {"depth": depth}, num_classes)


def convert(state_dict: Mapping[str, np.ndarray], arch: str | None = None
            ) -> tuple[dict[str, Any], PretrainedInfo]:
    """Dispatch on `arch` ('resnet50', 'vgg16', ...) or, when None, on the state dict's keys."""
    if arch is None:
        arch = "vgg" if any(k.startswith("features.") for k in state_dict) else "resnet"
    if arch.startswith("vgg"):
        variables, info = convert_vgg(state_dict)
    elif arch.startswith("resnet"):
        variables, info = convert_resnet(state_dict)
    else:
        raise ValueError(f"Unsupported torchvision architecture {arch!r}: expected resnet18/34/"
                         "50/101/152 or vgg11/13/16/19.")
    digits = "".join(ch for ch in arch if ch.isdigit())
    if digits and int(digits) != info.model_kwargs["depth"]:
        raise ValueError(f"The weights are a {info.model_name}{info.model_kwargs['depth']}, "
                         f"not a {arch}: check the file or the name in the spec.")
    return variables, info

