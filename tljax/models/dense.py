"""Heads for dense prediction over a backbone's named outputs (attached as `head`).

Segmentation heads return per-pixel logits at the resolution of the finest feature map they
read (the task upsamples them, bilinearly, to the target's size, as torchvision's models do):

  FCNHead        torchvision's FCNHead: conv 3x3 (no bias) -> batch norm -> ReLU -> dropout
                 -> conv 1x1. Given several feature maps (multi-scale, finest first) each is
                 first projected by `lateral_{i}` (1x1 conv), upsampled bilinearly to the
                 finest map and summed (FCN-8s-style fusion).
                 Tree: head/[lateral_{i}/], conv, bn, classifier.
  DeepLabV3Head  torchvision's DeepLabHead: ASPP (1x1, three 3x3 atrous rates, image
                 pooling; concatenated, projected 1x1, dropout 0.5) -> conv 3x3 -> bn -> ReLU
                 -> conv 1x1. Tree: head/aspp_conv_{0..3}, aspp_bn_{0..3}, aspp_pool_conv,
                 aspp_pool_bn, aspp_project, aspp_project_bn, conv, bn, classifier.
  ViTSegHead     over patch tokens (B, N, D): drops the `prefix_tokens` leading tokens (the
                 class token with pool_type 'tok'), lays the rest on their (h, w) grid and
                 either a linear map per token (Segmenter's linear decoder, SETR-naive:
                 'linear') or `num_upsamples` x (conv 3x3 -> ReLU -> 2x bilinear) then a
                 1x1 conv (SETR-PUP: 'progressive'). Tree: head/norm, [conv_{i}/], classifier.

Detection (FCOS, Tian et al. 2019, in torchvision's layout):

  FPN            lateral 1x1 convs `inner_{i}`, top-down sum with nearest upsampling
                 (torch's floor(i * in / out) indexing), 3x3 output convs `layer_{i}`, and
                 P6 = conv 3x3/2 of P5's output, P7 = conv 3x3/2 of ReLU(P6) (torchvision's
                 LastLevelP6P7 with equal widths).
  FCOSHead       FPN, then per level (weights shared across levels) a classification tower
                 (`num_convs` x conv 3x3 -> GroupNorm(32) -> ReLU) -> `cls_logits`, and a
                 regression tower -> `bbox_reg` (ReLU: distances l, t, r, b in units of the
                 level's stride) and `bbox_ctrness`. Returns per level lists:
                 {'cls_logits': (B, H, W, K), 'box_regression': (B, H, W, 4),
                  'centerness': (B, H, W, 1)}.
                 Tree: head/fpn/{inner_i, layer_i, p6, p7}, head/classification/{tower/
                 {conv_j, gn_j}, cls_logits}, head/regression/{tower/{conv_j, gn_j},
                 bbox_reg, bbox_ctrness}.

Initialisation follows torchvision (FPN: Kaiming uniform a=1; FCOS towers and outputs:
normal(0.01), classification bias -log((1 - 0.01) / 0.01)). Batch norms in the heads use
batch statistics while training (the head is new), running averages in evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

BN_EPS, BN_MOMENTUM = 1e-5, 0.9  # torchvision's BatchNorm2d (momentum 0.1)


def _as_tuple(x: Any) -> tuple[jnp.ndarray, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def resize_bilinear(x: jnp.ndarray, hw: Sequence[int]) -> jnp.ndarray:
    """(B, H, W, C) -> (B, h, w, C), half-pixel centres (torch's align_corners=False)."""
    if tuple(x.shape[1:3]) == tuple(hw):
        return x
    return jax.image.resize(x, (x.shape[0], *hw, x.shape[3]), "bilinear", antialias=False)


def resize_nearest_torch(x: jnp.ndarray, hw: Sequence[int]) -> jnp.ndarray:
    """torch's F.interpolate(mode='nearest'): source index floor(i * in / out)."""
    h, w = x.shape[1:3]
    rows = jnp.asarray([min(int(i * h / hw[0]), h - 1) for i in range(hw[0])])
    cols = jnp.asarray([min(int(j * w / hw[1]), w - 1) for j in range(hw[1])])
    return x[:, rows][:, :, cols]


def _conv(features: int, kernel: int, name: str, dtype: Any, *, stride: int = 1,
          dilation: int = 1, bias: bool = True, kernel_init: Any = None,
          bias_init: Any = nn.initializers.zeros) -> nn.Conv:
    """torch-style conv: symmetric padding dilation * (kernel // 2)."""
    pad = dilation * (kernel // 2)
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), kernel_dilation=(dilation, dilation),
                   use_bias=bias, dtype=dtype, name=name, bias_init=bias_init,
                   kernel_init=kernel_init or nn.initializers.variance_scaling(
                       2.0, "fan_out", "normal"))


def _bn(train: bool, name: str, dtype: Any) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPS,
                        dtype=dtype, name=name)


class FCNHead(nn.Module):
    """See the module docstring."""

    num_classes: int
    width: int = 512
    lateral_width: int = 128
    dropout: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Any, train: bool = False) -> jnp.ndarray:
        features = _as_tuple(x)
        if len(features) > 1:
            hw = features[0].shape[1:3]
            y = sum(resize_bilinear(_conv(self.lateral_width, 1, f"lateral_{i}", self.dtype)(f),
                                    hw) for i, f in enumerate(features))
        else:
            y = features[0]
        y = _conv(self.width, 3, "conv", self.dtype, bias=False)(y)
        y = nn.relu(_bn(train, "bn", self.dtype)(y))
        y = nn.Dropout(self.dropout)(y, deterministic=not train)
        return _conv(self.num_classes, 1, "classifier", self.dtype)(y).astype(jnp.float32)


class DeepLabV3Head(nn.Module):
    """See the module docstring."""

    num_classes: int
    width: int = 256
    rates: tuple[int, int, int] = (12, 24, 36)
    dropout: float = 0.5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Any, train: bool = False) -> jnp.ndarray:
        (x,) = _as_tuple(x)[-1:]
        branches = []
        for i, rate in enumerate((None, *self.rates)):
            kernel, dilation = (1, 1) if rate is None else (3, rate)
            y = _conv(self.width, kernel, f"aspp_conv_{i}", self.dtype, dilation=dilation,
                      bias=False)(x)
            branches.append(nn.relu(_bn(train, f"aspp_bn_{i}", self.dtype)(y)))
        pooled = jnp.mean(x, axis=(1, 2), keepdims=True)
        pooled = _conv(self.width, 1, "aspp_pool_conv", self.dtype, bias=False)(pooled)
        pooled = nn.relu(_bn(train, "aspp_pool_bn", self.dtype)(pooled))
        branches.append(jnp.broadcast_to(pooled, (*x.shape[:3], self.width)))
        y = _conv(self.width, 1, "aspp_project", self.dtype, bias=False)(
            jnp.concatenate(branches, axis=-1))
        y = nn.relu(_bn(train, "aspp_project_bn", self.dtype)(y))
        y = nn.Dropout(self.dropout)(y, deterministic=not train)
        y = _conv(self.width, 3, "conv", self.dtype, bias=False)(y)
        y = nn.relu(_bn(train, "bn", self.dtype)(y))
        return _conv(self.num_classes, 1, "classifier", self.dtype)(y).astype(jnp.float32)


def token_grid(num_tokens: int, prefix_tokens: int | None) -> tuple[int, int, int]:
    """(prefix, h, w) of a square token grid; prefix None: 1 when N - 1 is a square, else 0."""
    if prefix_tokens is None:
        prefix_tokens = 1 if math.isqrt(num_tokens - 1) ** 2 == num_tokens - 1 else 0
    side = math.isqrt(num_tokens - prefix_tokens)
    if side * side != num_tokens - prefix_tokens:
        raise ValueError(f"{num_tokens} tokens with {prefix_tokens} prefix tokens do not form "
                         "a square grid; set the task's prefix_tokens.")
    return prefix_tokens, side, side


class ViTSegHead(nn.Module):
    """See the module docstring."""

    num_classes: int
    decoder: str = "linear"
    width: int = 256
    num_upsamples: int = 2
    prefix_tokens: int | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        if self.decoder not in ("linear", "progressive"):
            raise ValueError(f"ViT decoder {self.decoder!r}: expected 'linear' or "
                             "'progressive'.")
        prefix, h, w = token_grid(tokens.shape[1], self.prefix_tokens)
        x = tokens[:, prefix:].reshape(tokens.shape[0], h, w, tokens.shape[-1])
        x = nn.LayerNorm(name="norm", dtype=self.dtype)(x)
        if self.decoder == "progressive":
            for i in range(self.num_upsamples):
                x = nn.relu(_conv(self.width, 3, f"conv_{i}", self.dtype)(x))
                x = resize_bilinear(x, (x.shape[1] * 2, x.shape[2] * 2))
        # Zero-initialised like the classification head: uniform predictions at step 0.
        return _conv(self.num_classes, 1, "classifier", self.dtype,
                     kernel_init=nn.initializers.zeros)(x).astype(jnp.float32)


_FPN_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")  # kaiming_uniform(a=1)
_NORMAL_001 = nn.initializers.normal(0.01)


class FPN(nn.Module):
    """See the module docstring; returns P3.. (len(inputs) levels) plus P6, P7."""

    width: int = 256
    extra_levels: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jnp.ndarray]) -> list[jnp.ndarray]:
        conv = lambda k, name, **kw: _conv(self.width, k, name, self.dtype,
                                           kernel_init=_FPN_INIT, **kw)
        n = len(features)
        last = conv(1, f"inner_{n - 1}")(features[-1])
        results = [conv(3, f"layer_{n - 1}")(last)]
        for i in range(n - 2, -1, -1):
            lateral = conv(1, f"inner_{i}")(features[i])
            last = lateral + resize_nearest_torch(last, lateral.shape[1:3])
            results.insert(0, conv(3, f"layer_{i}")(last))
        if self.extra_levels:
            p6 = conv(3, "p6", stride=2)(results[-1])
            results += [p6, conv(3, "p7", stride=2)(nn.relu(p6))]
        return results


class _Tower(nn.Module):
    num_convs: int
    width: int
    groups: int
    dtype: Any

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        for j in range(self.num_convs):
            x = _conv(self.width, 3, f"conv_{j}", self.dtype, kernel_init=_NORMAL_001)(x)
            x = nn.GroupNorm(num_groups=self.groups, epsilon=1e-5, dtype=self.dtype,
                             name=f"gn_{j}")(x)
            x = nn.relu(x)
        return x


class FCOSClassification(nn.Module):
    num_classes: int
    num_convs: int
    width: int
    groups: int
    prior: float = 0.01
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, levels: Sequence[jnp.ndarray]) -> list[jnp.ndarray]:
        tower = _Tower(self.num_convs, self.width, self.groups, self.dtype, name="tower")
        logits = _conv(self.num_classes, 3, "cls_logits", self.dtype, kernel_init=_NORMAL_001,
                       bias_init=nn.initializers.constant(-math.log((1 - self.prior)
                                                                    / self.prior)))
        return [logits(tower(x)).astype(jnp.float32) for x in levels]


class FCOSRegression(nn.Module):
    num_convs: int
    width: int
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, levels: Sequence[jnp.ndarray]) -> tuple[list, list]:
        tower = _Tower(self.num_convs, self.width, self.groups, self.dtype, name="tower")
        reg = _conv(4, 3, "bbox_reg", self.dtype, kernel_init=_NORMAL_001)
        ctr = _conv(1, 3, "bbox_ctrness", self.dtype, kernel_init=_NORMAL_001)
        boxes, centerness = [], []
        for x in levels:
            y = tower(x)
            boxes.append(nn.relu(reg(y)).astype(jnp.float32))
            centerness.append(ctr(y).astype(jnp.float32))
        return boxes, centerness


class FCOSHead(nn.Module):
    """See the module docstring."""

    num_classes: int
    width: int = 256
    num_convs: int = 4
    groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Any, train: bool = False) -> dict[str, list[jnp.ndarray]]:
        del train
        levels = FPN(self.width, dtype=self.dtype, name="fpn")(_as_tuple(x))
        logits = FCOSClassification(self.num_classes, self.num_convs, self.width, self.groups,
                                    dtype=self.dtype, name="classification")(levels)
        boxes, centerness = FCOSRegression(self.num_convs, self.width, self.groups,
                                           self.dtype, name="regression")(levels)
        return {"cls_logits": logits, "box_regression": boxes, "centerness": centerness}
