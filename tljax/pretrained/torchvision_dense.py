"""torchvision's dense models -> a tljax ResNet backbone with the matching `head`.

    fcos_resnet50_fpn                 -> resnet(50) + FCOSHead (task 'detection')
    fcn_resnet50, deeplabv3_resnet50  -> resnet(50, replace_stride_with_dilation=(False,
                                         True, True)) + FCNHead / DeepLabV3Head
                                         (task 'segmentation', head_input 'stage_4')

Mapping (torch -> tljax; convolutions OIHW -> HWIO, batch norm as in `torchvision.py`):

    backbone.body.* (FCOS), backbone.* (FCN, DeepLabV3)  -> the ResNet names (convert_resnet)
    backbone.fpn.inner_blocks.I.0 / layer_blocks.I.0     -> head/fpn/inner_I / layer_I
    backbone.fpn.extra_blocks.p6 / p7                    -> head/fpn/p6 / p7
    head.classification_head.conv.{3j} / .{3j+1}         -> head/classification/tower/conv_j
                                                            / gn_j (GroupNorm weight -> scale)
    head.classification_head.cls_logits                  -> head/classification/cls_logits
    head.regression_head.conv.*, bbox_reg, bbox_ctrness  -> head/regression/...
    classifier.0 / .1 / .4 (FCN)                         -> head/conv / bn / classifier
    classifier.0.convs.I.0 / .1 (DeepLabV3 ASPP, I<4)    -> head/aspp_conv_I / aspp_bn_I
    classifier.0.convs.4.1 / .2 (image pooling)          -> head/aspp_pool_conv / aspp_pool_bn
    classifier.0.project.0 / .1                          -> head/aspp_project / _bn
    classifier.1 / .2 / .4 (DeepLabV3)                   -> head/conv / bn / classifier

The auxiliary FCN head of the segmentation checkpoints (`aux_classifier.*`, a training-time
loss on layer3) has no place in the tljax model and is left out, on purpose.
torchvision's FrozenBatchNorm2d (in the COCO checkpoints) has the same four tensors as
BatchNorm2d and converts the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from tljax import tree
from tljax.pretrained.common import IMAGENET_MEAN, IMAGENET_STD, SourceWeights, batch_norm, conv
from tljax.pretrained.info import PretrainedInfo
from tljax.pretrained.torchvision import convert_resnet

ARCHS = ("fcos_resnet50_fpn", "fcn_resnet50", "deeplabv3_resnet50")
DILATED = (False, True, True)


def _backbone(state_dict: Mapping[str, np.ndarray], prefix: str) -> dict[str, Any]:
    body = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    variables, info = convert_resnet(body)
    if info.model_kwargs["depth"] != 50:
        raise ValueError(f"Expected a ResNet-50 backbone, found depth {info.model_kwargs}.")
    return tree.flatten(variables)


def _conv(src: SourceWeights, prefix: str, target: str, out: dict[str, Any]) -> None:
    out[f"params/{target}/kernel"] = conv(src[f"{prefix}.weight"])
    if f"{prefix}.bias" in src:
        out[f"params/{target}/bias"] = src[f"{prefix}.bias"]


def _info(task: str, num_classes: int, dilated: bool) -> PretrainedInfo:
    kwargs: dict[str, Any] = {"depth": 50}
    if dilated:
        kwargs["replace_stride_with_dilation"] = DILATED
    return PretrainedInfo(source="torchvision", model_name="resnet", model_kwargs=kwargs,
                          num_classes=num_classes, task=task,
                          head_input=None if task == "detection" else "stage_4",
                          mean=IMAGENET_MEAN, std=IMAGENET_STD)


def convert_fcos(state_dict: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], PretrainedInfo]:
    """torchvision fcos_resnet50_fpn -> (variables, info); the head is FCOSHead(num_classes,
    width 256, 4 convolutions, 32 groups) over stages 2-4."""
    src = SourceWeights(state_dict, "torchvision fcos_resnet50_fpn state dict")
    out = _backbone(state_dict, "backbone.body.")
    for name in state_dict:
        if name.startswith("backbone.body."):
            src.used.add(name)
    for kind in ("inner", "layer"):
        for i in range(3):
            _conv(src, f"backbone.fpn.{kind}_blocks.{i}.0", f"head/fpn/{kind}_{i}", out)
    for level in ("p6", "p7"):
        _conv(src, f"backbone.fpn.extra_blocks.{level}", f"head/fpn/{level}", out)
    for torch_name, name in (("classification_head", "classification"),
                             ("regression_head", "regression")):
        for j in range(4):
            prefix = f"head.{torch_name}.conv"
            _conv(src, f"{prefix}.{3 * j}", f"head/{name}/tower/conv_{j}", out)
            out[f"params/head/{name}/tower/gn_{j}/scale"] = src[f"{prefix}.{3 * j + 1}.weight"]
            out[f"params/head/{name}/tower/gn_{j}/bias"] = src[f"{prefix}.{3 * j + 1}.bias"]
    _conv(src, "head.classification_head.cls_logits", "head/classification/cls_logits", out)
    _conv(src, "head.regression_head.bbox_reg", "head/regression/bbox_reg", out)
    _conv(src, "head.regression_head.bbox_ctrness", "head/regression/bbox_ctrness", out)
    src.check_all_used()
    num_classes = int(out["params/head/classification/cls_logits/bias"].shape[0])
    return tree.unflatten(out), _info("detection", num_classes, dilated=False)


def _take_backbone(src: SourceWeights, state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
    out = _backbone(state_dict, "backbone.")
    for name in state_dict:
        if name.startswith("backbone."):
            src.used.add(name)
    return out


def convert_fcn(state_dict: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], PretrainedInfo]:
    """torchvision fcn_resnet50 -> (variables, info); head FCNHead(num_classes, width 512)."""
    src = SourceWeights(state_dict, "torchvision fcn_resnet50 state dict")
    out = _take_backbone(src, state_dict)
    _conv(src, "classifier.0", "head/conv", out)
    batch_norm(src, "classifier.1", "head/bn", out)
    _conv(src, "classifier.4", "head/classifier", out)
    src.check_all_used(ignore=["^aux_classifier\\."])
    num_classes = int(out["params/head/classifier/bias"].shape[0])
    return tree.unflatten(out), _info("segmentation", num_classes, dilated=True)


def convert_deeplabv3(state_dict: Mapping[str, np.ndarray]
                      ) -> tuple[dict[str, Any], PretrainedInfo]:
    """torchvision deeplabv3_resnet50 -> (variables, info); head DeepLabV3Head(num_classes)."""
    src = SourceWeights(state_dict, "torchvision deeplabv3_resnet50 state dict")
    out = _take_backbone(src, state_dict)
    for i in range(4):
        _conv(src, f"classifier.0.convs.{i}.0", f"head/aspp_conv_{i}", out)
        batch_norm(src, f"classifier.0.convs.{i}.1", f"head/aspp_bn_{i}", out)
    _conv(src, "classifier.0.convs.4.1", "head/aspp_pool_conv", out)
    batch_norm(src, "classifier.0.convs.4.2", "head/aspp_pool_bn", out)
    _conv(src, "classifier.0.project.0", "head/aspp_project", out)
    batch_norm(src, "classifier.0.project.1", "head/aspp_project_bn", out)
    _conv(src, "classifier.1", "head/conv", out)
    batch_norm(src, "classifier.2", "head/bn", out)
    _conv(src, "classifier.4", "head/classifier", out)
    src.check_all_used(ignore=["^aux_classifier\\."])
    num_classes = int(out["params/head/classifier/bias"].shape[0])
    return tree.unflatten(out), _info("segmentation", num_classes, dilated=True)


def convert(state_dict: Mapping[str, np.ndarray], arch: str | None = None
            ) -> tuple[dict[str, Any], PretrainedInfo]:
    """Dispatch on `arch` (one of ARCHS) or, when None, on the state dict's keys."""
    if arch is None:
        if "backbone.fpn.extra_blocks.p6.weight" in state_dict:
            arch = "fcos_resnet50_fpn"
        elif "classifier.0.project.0.weight" in state_dict:
            arch = "deeplabv3_resnet50"
        elif "classifier.4.weight" in state_dict:
            arch = "fcn_resnet50"
        else:
            raise ValueError("Not a torchvision fcos_resnet50_fpn, fcn_resnet50 or "
                             "deeplabv3_resnet50 state dict.")
    converters = {"fcos_resnet50_fpn": convert_fcos, "fcn_resnet50": convert_fcn,
                  "deeplabv3_resnet50": convert_deeplabv3}
    if arch not in converters:
        raise ValueError(f"Unsupported torchvision dense architecture {arch!r}: expected one "
                         f"of {', '.join(ARCHS)}.")
    return converters[arch](state_dict)
