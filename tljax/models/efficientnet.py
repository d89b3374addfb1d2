"""EfficientNet-Lite0..4 (Tan & Le 2019; the "lite" edge variants of TF's reference).

Lite differs from EfficientNet-B*: ReLU6 instead of swish, no squeeze-excite,
and the stem (32 filters), the head convolution (1280 filters) and the repeats
of the first and last stage are not scaled. Convolutions use TF 'SAME' padding
(for an odd total the extra row/column goes at the bottom/right, as in Flax's
'SAME'), batch norm has eps 1e-3 and decay 0.99.

Parameter names (reference state-dict name in brackets):

    stem_conv [_conv_stem], stem_bn [_bn0],
    block{N}/expand_conv [_blocks.N._expand_conv], expand_bn [_bn0],
             depthwise_conv [_depthwise_conv], depthwise_bn [_bn1],
             project_conv [_project_conv], project_bn [_bn2],
    top_conv [_conv_head], top_bn [_bn1], head [_fc]

Batch norm and `bn_update`: see `tljax.models.resnet`; statistics are frozen
unless `bn_update=True` and `train=True`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from tljax.models.layers import DepthwiseConv, PointwiseConv
from tljax.models.resnet import batch_norm

# variant: (width multiplier, depth multiplier, resolution, dropout before the head)
VARIANTS = {
    "lite0": (1.0, 1.0, 224, 0.2),
    "lite1": (1.0, 1.1, 240, 0.2),
    "lite2": (1.1, 1.2, 260, 0.3),
    "lite3": (1.2, 1.4, 280, 0.3),
    "lite4": (1.4, 1.8, 300, 0.3),
}

# One row per stage: (repeats, kernel, stride, expand ratio, input filters, output filters).
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_FILTERS = 32
TOP_FILTERS = 1280
BN_EPS = 1e-3
BN_MOMENTUM = 0.99  # TF's decay; PyTorch ports write momentum=1 - 0.99


@dataclasses.dataclass(frozen=True)
class BlockArgs:
    kernel: int
    stride: int
    expand: int
    in_filters: int
    out_filters: int


def round_filters(filters: int, multiplier: float, divisor: int = 8) -> int:
    """TF's rounding: nearest multiple of `divisor` to filters * multiplier, never 10% below."""
    scaled = filters * multiplier
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def block_args(width: float, depth: float) -> list[BlockArgs]:
    """The MBConv blocks of one variant, in order (the stride sits on each stage's first)."""
    blocks = []
    last = len(STAGES) - 1
    for i, (repeats, kernel, stride, expand, in_f, out_f) in enumerate(STAGES):
        in_f, out_f = round_filters(in_f, width), round_filters(out_f, width)
        if i == 0:
            in_f = STEM_FILTERS  # the stem is not scaled
        if i not in (0, last):  # first and last stage keep their repeats
            repeats = int(math.ceil(depth * repeats))
        for r in range(repeats):
            blocks.append(BlockArgs(kernel, stride if r == 0 else 1, expand,
                                    in_f if r == 0 else out_f, out_f))
    return blocks


class MBConv(nn.Module):
    """Inverted bottleneck: 1x1 expand, kxk depthwise (stride), 1x1 project; residual if shapes
    match, with drop-connect (per-example stochastic depth) while training."""

    args: BlockArgs
    drop_connect_rate: float = 0.0
    bn_update: bool = False
    dtype: Any = jnp.float32
    bn_momentum: float = BN_MOMENTUM

    @nn.compact
    def __call__(self, inputs: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        a = self.args
        bn = lambda name: batch_norm(train, self.bn_update, name, self.dtype, BN_EPS,
                                     self.bn_momentum)
        conv = lambda n, name: PointwiseConv(n, (1, 1), use_bias=False, dtype=self.dtype,
                                             name=name)
        x = inputs
        hidden = a.in_filters * a.expand
        if a.expand != 1:
            x = nn.relu6(bn("expand_bn")(conv(hidden, "expand_conv")(x)))
        x = DepthwiseConv(a.kernel, a.stride, self.dtype, name="depthwise_conv")(x)
        x = nn.relu6(bn("depthwise_bn")(x))
        x = bn("project_bn")(conv(a.out_filters, "project_conv")(x))
        if a.stride == 1 and a.in_filters == a.out_filters:
            if self.drop_connect_rate:
                # One Bernoulli draw per example, survivors scaled by 1 / keep probability.
                x = nn.Dropout(self.drop_connect_rate, broadcast_dims=(1, 2, 3))(
                    x, deterministic=not train)
            x = x + inputs
        return x


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite backbone: `__call__(images, train)` -> (features, out).

    features: the global average of the top convolution, with the variant's dropout
    (`dropout`) applied while training, as the reference applies it before its classifier;
    out: 'stage_1'..'stage_5', the last block output at strides 2, 4, 8, 16 and the top
    convolution's output at stride 32.
    Expects images as (x - 127) / 128 of 0..255 pixels (`value_range=(-1, 1)` roughly).
    """

    inputs: ClassVar[tuple[str, ...]] = ("image",)

    variant: str = "lite0"
    dropout: float | None = None  # None: the variant's rate
    drop_connect_rate: float = 0.2
    bn_update: bool = False
    # Decay of the running statistics when bn_update: short runs from scratch need
    # a faster one (0.9) than the reference's 0.99, or evaluation sees stale averages.
    bn_momentum: float = BN_MOMENTUM
    dtype: Any = jnp.float32

    def _config(self) -> tuple[float, float, int, float]:
        if self.variant not in VARIANTS:
            raise ValueError(f"EfficientNet variant={self.variant!r}: expected one of "
                             f"{sorted(VARIANTS)}.")
        return VARIANTS[self.variant]

    def blocks(self) -> list[str]:
        """Regexes of parameter paths from the input to the output, one per block group."""
        width, depth, _, _ = self._config()
        n = len(block_args(width, depth))
        return (["^(stem_conv|stem_bn)/"] + [f"^block{i}/" for i in range(n)]
                + ["^(top_conv|top_bn)/"])

    @nn.compact
    def __call__(self, images: jnp.ndarray, train: bool = False
                 ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
        width, depth, _, dropout = self._config()
        bn = lambda name: batch_norm(train, self.bn_update, name, self.dtype, BN_EPS,
                                     self.bn_momentum)
        x = nn.Conv(STEM_FILTERS, (3, 3), strides=(2, 2), padding="SAME", use_bias=False,
                    dtype=self.dtype, name="stem_conv")(images)
        x = nn.relu6(bn("stem_bn")(x))
        blocks = block_args(width, depth)
        out = {}
        for i, args in enumerate(blocks):
            if args.stride > 1:  # the previous block closed a stage
                out[f"stage_{len(out) + 1}"] = x
            # Drop-connect grows linearly with depth, as in the reference.
            rate = self.drop_connect_rate * i / len(blocks)
            x = MBConv(args, rate, self.bn_update, self.dtype, self.bn_momentum,
                       name=f"block{i}")(x, train)
        x = PointwiseConv(TOP_FILTERS, (1, 1), use_bias=False, dtype=self.dtype,
                          name="top_conv")(x)
        x = nn.relu6(bn("top_bn")(x))
        out[f"stage_{len(out) + 1}"] = x
        x = jnp.mean(x, axis=(1, 2))
        rate = dropout if self.dropout is None else self.dropout
        return nn.Dropout(rate)(x, deterministic=not train), out


def resolution(variant: str) -> int:
    """The input resolution a variant was trained at (224 for lite0 ... 300 for lite4)."""
    return VARIANTS[variant][2]


def make(variant: str = "lite0", **kwargs: Any) -> EfficientNetLite:
    """EfficientNet-Lite from `variant=` ('lite0'..'lite4'; 'efficientnet-lite0' also works)."""
    variant = variant.replace("efficientnet", "").replace("_", "").replace("-", "")
    return EfficientNetLite(variant=variant, **kwargs)
