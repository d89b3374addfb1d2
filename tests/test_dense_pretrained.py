"""torchvision's FCOS, FCN and DeepLabV3 (ResNet-50) against tljax's converted models.

Each reference is initialised randomly (batch-norm statistics and affine parameters
randomised too, `randomize`), converted from its state dict, and compared on the same random
input before post-processing: FCOS's per-level class logits, box regressions and centerness
(model.backbone then model.head, without the resizing transform), the segmentation models'
upsampled logits `model(x)['out']`. Tolerance: max abs difference <= 1e-4 in float32.
Small inputs (64 px) keep these fast.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tv = pytest.importorskip("torchvision")

from tests.test_models_vision import images, randomize, state_dict_numpy  # noqa: E402
from tljax import models, tasks  # noqa: E402
from tljax.data import DatasetInfo, Feature  # noqa: E402
from tljax.pretrained import torchvision_dense  # noqa: E402
from tljax.tasks.detection import flatten_levels  # noqa: E402
from tljax.tasks.segmentation import upsample_logits  # noqa: E402

TOL = 1e-4


def _names(n: int) -> tuple[str, ...]:
    return tuple(f"c{i}" for i in range(n))


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def _report(name: str, ours: np.ndarray, theirs: np.ndarray) -> float:
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    diff = float(np.abs(ours - theirs).max())
    print(f"{name}: max |diff| = {diff:.2e} (scale {np.abs(theirs).max():.2f})")
    return diff


def test_fcos_resnet50_fpn_parity():
    torch.manual_seed(0)
    ref = tv.models.detection.fcos_resnet50_fpn(weights=None, weights_backbone=None,
                                                num_classes=7)
    # The body calibrates its batch norms alone (the detector wants targets in train mode);
    # FPN and head get random biases and norm scales as well.
    for part in (ref.backbone.body, ref.backbone.fpn, ref.head):
        randomize(part)
    ref.eval()
    variables, info = torchvision_dense.convert(state_dict_numpy(ref))
    assert info.task == "detection" and info.num_classes == 7
    dataset = DatasetInfo("t", {"classes": Feature("box_classes", _names(7))}, {})
    task = tasks.build_task({"name": "detection"}, dataset)  # torchvision's head sizes
    model = models.build(info.model_name, info.model_kwargs, head=task.head(),
                         head_input=task.head_input)
    x = images(2, 64)
    cls, reg, ctr = (np.asarray(a) for a in flatten_levels(jax.jit(model.apply)(variables, x)))
    with torch.no_grad():
        features = list(ref.backbone(_nchw(x)).values())
        theirs = ref.head(features)
    assert len(features) == 5  # P3..P7
    diffs = [_report("cls_logits", cls, theirs["cls_logits"].numpy()),
             _report("bbox_regression", reg, theirs["bbox_regression"].numpy()),
             _report("bbox_ctrness", ctr, theirs["bbox_ctrness"].numpy()[..., 0])]
    assert max(diffs) <= TOL, diffs


@pytest.mark.parametrize("arch", ["fcn_resnet50", "deeplabv3_resnet50"])
def test_segmentation_model_parity(arch):
    torch.manual_seed(0)
    builder = getattr(tv.models.segmentation, arch)
    ref = randomize(builder(weights=None, weights_backbone=None, num_classes=5, aux_loss=True))
    state = state_dict_numpy(ref)
    assert any(k.startswith("aux_classifier.") for k in state)  # converted without it
    variables, info = torchvision_dense.convert(state)
    assert info.model_kwargs["replace_stride_with_dilation"] == (False, True, True)
    dataset = DatasetInfo("t", {"segmentation": Feature("segmentation", _names(5))}, {})
    head = "fcn" if arch.startswith("fcn") else "deeplabv3"
    task = tasks.build_task({"name": "segmentation", "head": head, "head_input": "stage_4"},
                            dataset)
    model = models.build(info.model_name, info.model_kwargs, head=task.head(),
                         head_input=task.head_input)
    x = images(2, 64)
    logits = jax.jit(model.apply)(variables, x)
    assert logits.shape == (2, 8, 8, 5)  # stride 8 with the dilated stages
    ours = np.asarray(upsample_logits(logits, (64, 64))).transpose(0, 3, 1, 2)
    with torch.no_grad():
        theirs = ref(_nchw(x))["out"].numpy()
    assert _report(arch, ours, theirs) <= TOL


def test_convert_names_what_it_cannot_place():
    torch.manual_seed(0)
    ref = tv.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None,
                                              num_classes=3, aux_loss=False)
    state = state_dict_numpy(ref)
    state["classifier.9.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"classifier\.9\.weight"):
        torchvision_dense.convert(state)
    with pytest.raises(ValueError, match="Unsupported torchvision dense architecture"):
        torchvision_dense.convert(state, "maskrcnn_resnet50_fpn")
