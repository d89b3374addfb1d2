"""ResNet v1 (He et al. 2016) in torchvision's layout: ResNet-18/34 (basic) and 50/101/152.

torchvision's variant ("v1.5") puts the stride on the 3x3 convolution of a
bottleneck. Parameter names mirror torchvision's state dict with '.' -> '/'
and the block index folded into the layer name:

    conv1, bn1, layer{K}_{J}/{conv1,bn1,conv2,bn2[,conv3,bn3][,downsample_conv,
    downsample_bn]}

so `layer2.0.downsample.0.weight` becomes `layer2_0/downsample_conv/kernel`.
Batch-norm statistics live in the `batch_stats` collection.

Dilation (`replace_stride_with_dilation`, as torchvision's argument of the same name): a
stage marked True keeps the resolution of the previous one and dilates its 3x3 convolutions
instead of striding (the first block keeps the previous dilation), as the segmentation
models (FCN, DeepLabV3) use with (False, True, True): stride 8, same parameters.

Batch norm and `bn_update`: with `bn_update=False` (the fine-tuning default)
batch norm always normalises with the running averages, also when
`train=True`, and `batch_stats` come back unchanged; with `bn_update=True` and
`train=True` it normalises with batch statistics and updates the averages.

`remat` (None, 'full', 'dots', 'dots_no_batch'; `tljax.models.layers.REMAT_POLICIES`)
recomputes each residual block's activations in the backward pass; names are unchanged.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from tljax.models.layers import remat

# depth: (block kind, blocks per stage)
DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
STAGE_WIDTHS = (64, 128, 256, 512)

# torchvision: BatchNorm2d(eps=1e-5, momentum=0.1); Flax's momentum is the decay, 1 - 0.1.
BN_EPS = 1e-5
BN_MOMENTUM = 0.9


def batch_norm(train: bool, bn_update: bool, name: str, dtype: Any = jnp.float32,
               epsilon: float = BN_EPS, momentum: float = BN_MOMENTUM) -> nn.BatchNorm:
    """Batch norm that uses batch statistics only when training *and* `bn_update` is set."""
    return nn.BatchNorm(use_running_average=not (train and bn_update), momentum=momentum,
                        epsilon=epsilon, dtype=dtype, name=name)


def _conv(features: int, kernel: int, stride: int, name: str, dtype: Any,
          dilation: int = 1) -> nn.Conv:
    """torchvision conv: symmetric padding dilation * (kernel // 2), no bias (batch norm
    follows)."""
    pad = dilation * (kernel // 2)
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), kernel_dilation=(dilation, dilation),
                   use_bias=False, dtype=dtype,
                   kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                   name=name)


class ResidualBlock(nn.Module):
    """Basic (two 3x3) or bottleneck (1x1, 3x3 with the stride, 1x1 x4) residual block."""

    width: int
    stride: int = 1
    bottleneck: bool = True
    bn_update: bool = False
    dtype: Any = jnp.float32
    dilation: int = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        bn = lambda name: batch_norm(train, self.bn_update, name, self.dtype)
        d = self.dilation
        out_features = self.width * 4 if self.bottleneck else self.width
        if self.bottleneck:
            y = nn.relu(bn("bn1")(_conv(self.width, 1, 1, "conv1", self.dtype)(x)))
            y = nn.relu(bn("bn2")(_conv(self.width, 3, self.stride, "conv2", self.dtype, d)(y)))
            y = bn("bn3")(_conv(out_features, 1, 1, "conv3", self.dtype)(y))
        else:
            y = nn.relu(bn("bn1")(_conv(self.width, 3, self.stride, "conv1", self.dtype, d)(x)))
            y = bn("bn2")(_conv(self.width, 3, 1, "conv2", self.dtype, d)(y))
        if self.stride != 1 or x.shape[-1] != out_features:
            x = bn("downsample_bn")(
                _conv(out_features, 1, self.stride, "downsample_conv", self.dtype)(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """ResNet v1 backbone: `__call__(images, train)` -> (features, out).

    features: the global average of the last stage; out: 'stage_1'..'stage_4', the
    output of each stage (strides 4, 8, 16, 32; torchvision's C2..C5; 4, 8, 8, 8 with
    replace_stride_with_dilation=(False, True, True)).
    """

    inputs: ClassVar[tuple[str, ...]] = ("image",)

    depth: int = 50
    bn_update: bool = False
    dtype: Any = jnp.float32
    remat: str | None = None
    replace_stride_with_dilation: tuple[bool, bool, bool] = (False, False, False)

    def blocks(self) -> list[str]:
        """Regexes of parameter paths from the input to the output, one per block group."""
        _, counts = DEPTHS[self.depth]
        return (["^(conv1|bn1)/"]
                + [f"^layer{k + 1}_{j}/" for k, n in enumerate(counts) for j in range(n)])

    @nn.compact
    def __call__(self, images: jnp.ndarray, train: bool = False
                 ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
        if self.depth not in DEPTHS:
            raise ValueError(f"ResNet depth={self.depth}: expected one of {sorted(DEPTHS)}.")
        kind, counts = DEPTHS[self.depth]
        x = _conv(64, 7, 2, "conv1", self.dtype)(images)
        x = nn.relu(batch_norm(train, self.bn_update, "bn1", self.dtype)(x))
        # torchvision pads the max pool with -inf (padding=1), as Flax's max_pool does.
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        out = {}
        block = remat(ResidualBlock, self.remat, static_argnums=(2,))
        dilation = 1
        for k, (width, n) in enumerate(zip(STAGE_WIDTHS, counts, strict=True)):
            stride, previous = (2 if k > 0 else 1), dilation
            if k > 0 and self.replace_stride_with_dilation[k - 1]:
                dilation, stride = dilation * stride, 1
            for j in range(n):
                x = block(width, stride if j == 0 else 1, kind == "bottleneck",
                          self.bn_update, self.dtype, previous if j == 0 else dilation,
                          name=f"layer{k + 1}_{j}")(x, train)
            out[f"stage_{k + 1}"] = x
        return jnp.mean(x, axis=(1, 2)), out


def make(variant: str | None = None, **kwargs: Any) -> ResNet:
    """A ResNet from `depth=` (18, 34, 50, 101, 152) or a variant name like 'resnet50'."""
    if variant:
        digits = "".join(ch for ch in variant if ch.isdigit())
        if not digits or int(digits) not in DEPTHS:
            raise ValueError(f"Unknown ResNet variant {variant!r}: expected e.g. 'resnet50'.")
        kwargs = {"depth": int(digits), **kwargs}
    return ResNet(**kwargs)
