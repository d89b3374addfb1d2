"""BiT ResNet v2 (Kolesnikov et al. 2020): pre-activation bottlenecks with group norm
(32 groups) and weight-standardised convolutions, e.g. R50x1.

Parameter names mirror timm's `resnetv2_*_bit` state dict:

    stem_conv, stage{S}_block{B}/{norm1,conv1,norm2,conv2,norm3,conv3[,downsample]},
    norm

(S, B 0-based like timm's `stages.S.blocks.B`). There is no batch norm, hence
no `batch_stats`; `bn_update` is accepted for a uniform interface and ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}

GN_GROUPS = 32
GN_EPS = 1e-5
WS_EPS = 1e-8  # weight-standardisation epsilon of BiT (timm uses it for the *_bit models)


class StdConv(nn.Module):
    """Convolution with a weight-standardised kernel, no bias.

    Each output filter of the HWIO kernel is normalised over (H, W, I):
    w <- (w - mean) / sqrt(var + eps), with the biased variance. Padding is
    symmetric, ((stride - 1) + (kernel - 1)) // 2 per side, as in timm.
    """

    features: int
    kernel_size: int
    stride: int = 1
    eps: float = WS_EPS
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (k, k, x.shape[-1], self.features))
        mean = jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
        var = jnp.var(kernel, axis=(0, 1, 2), keepdims=True)
        kernel = (kernel - mean) / jnp.sqrt(var + self.eps)
        pad = ((self.stride - 1) + (k - 1)) // 2
        return jax.lax.conv_general_dilated(
            x.astype(self.dtype), kernel.astype(self.dtype), (self.stride, self.stride),
            ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _group_norm(name: str) -> nn.GroupNorm:
    # Two-pass variance: closer to PyTorch than E[x^2] - E[x]^2.
    return nn.GroupNorm(num_groups=GN_GROUPS, epsilon=GN_EPS, use_fast_variance=False, name=name)


class PreActBottleneck(nn.Module):
    """x -> GN-ReLU -> (projection shortcut) ; 1x1, GN-ReLU, 3x3 (stride), GN-ReLU, 1x1; add."""

    features: int
    stride: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        mid = self.features // 4
        x_preact = nn.relu(_group_norm("norm1")(x))
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.features:
            shortcut = StdConv(self.features, 1, self.stride, dtype=self.dtype,
                               name="downsample")(x_preact)
        y = StdConv(mid, 1, dtype=self.dtype, name="conv1")(x_preact)
        y = StdConv(mid, 3, self.stride, dtype=self.dtype,
                    name="conv2")(nn.relu(_group_norm("norm2")(y)))
        y = StdConv(self.features, 1, dtype=self.dtype,
                    name="conv3")(nn.relu(_group_norm("norm3")(y)))
        return y + shortcut


class ResNetV2(nn.Module):
    """BiT ResNet v2 backbone: `__call__(images, train)` -> (features, out).

    features: the global average after the final norm; out: 'stage_1'..'stage_4', the
    output of each stage (strides 4, 8, 16, 32; the last one after the final norm + ReLU).
    """

    inputs: ClassVar[tuple[str, ...]] = ("image",)

    depth: int = 50
    width: int = 1
    bn_update: bool = False  # no batch norm here; kept for a uniform interface
    dtype: Any = jnp.float32

    @property
    def stage_sizes(self) -> Sequence[int]:
        if self.depth not in DEPTHS:
            raise ValueError(f"ResNetV2 depth={self.depth}: expected one of {sorted(DEPTHS)}.")
        return DEPTHS[self.depth]

    def blocks(self) -> list[str]:
        """Regexes of parameter paths from the input to the output, one per block group."""
        return (["^stem_conv/"]
                + [f"^stage{s}_block{b}/" for s, n in enumerate(self.stage_sizes)
                   for b in range(n)]
                + ["^norm/"])

    @nn.compact
    def __call__(self, images: jnp.ndarray, train: bool = False
                 ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
        x = StdConv(64 * self.width, 7, 2, dtype=self.dtype, name="stem_conv")(images)
        # BiT's 'fixed' stem: zero padding of 1, then a 3x3/2 max pool without padding.
        x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
        out = {}
        for s, n in enumerate(self.stage_sizes):
            for b in range(n):
                stride = 2 if (s > 0 and b == 0) else 1
                x = PreActBottleneck(256 * self.width * 2 ** s, stride, self.dtype,
                                     name=f"stage{s}_block{b}")(x)
            out[f"stage_{s + 1}"] = x
        x = nn.relu(_group_norm("norm")(x))
        out[f"stage_{len(self.stage_sizes)}"] = x
        return jnp.mean(x, axis=(1, 2)), out


def make(variant: str | None = None, **kwargs: Any) -> ResNetV2:
    """A BiT ResNetV2 from `depth=`/`width=` or a variant name like 'R50x1' or 'resnetv2_50x1'."""
    if variant:
        name = variant.lower().replace("resnetv2_", "r").replace("_bit", "")
        depth, _, width = name.lstrip("r").partition("x")
        if not (depth.isdigit() and width.isdigit()):
            raise ValueError(f"Unknown ResNetV2 variant {variant!r}: expected e.g. 'R50x1'.")
        kwargs = {"depth": int(depth), "width": int(width), **kwargs}
    return ResNetV2(**kwargs)
