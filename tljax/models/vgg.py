"""VGG (Simonyan & Zisserman 2015) in torchvision's layout, without batch norm (VGG-11/13/16/19).

Convolutions are named by stage and position, `conv{S}_{I}` (conv1_1 ... conv5_3
for VGG-16), the classifier MLP `fc6`, `fc7` and the last classifier Linear
`head`. As in torchvision the features are average-pooled adaptively to 7x7
before the classifier, so any input of at least 32x32 works.

Flattening differs: torchvision flattens (C, H, W), this module flattens
(H, W, C); the converter permutes `fc6`'s input rows accordingly.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

# depth: convolutions per stage; each stage ends in a 2x2/2 max pool.
CONFIGS = {
    11: (1, 1, 2, 2, 2),
    13: (2, 2, 2, 2, 2),
    16: (2, 2, 3, 3, 3),
    19: (2, 2, 4, 4, 4),
}
STAGE_WIDTHS = (64, 128, 256, 512, 512)


def _adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) averaging weights of PyTorch's adaptive average pooling along one axis.

    Output bin i averages inputs [floor(i * in / out), ceil((i + 1) * in / out)).
    """
    matrix = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def adaptive_avg_pool(x: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
    """PyTorch's AdaptiveAvgPool2d on NHWC input; separable, so two small matmuls."""
    ph = jnp.asarray(_adaptive_pool_matrix(x.shape[1], size[0]), x.dtype)
    pw = jnp.asarray(_adaptive_pool_matrix(x.shape[2], size[1]), x.dtype)
    return jnp.einsum("oh,nhwc,pw->nopc", ph, x, pw)


class VGG(nn.Module):
    """VGG backbone: `__call__(images, train)` -> (fc7 features, out).

    out: 'stage_1'..'stage_5', each convolution stage after its max pool (strides 2..32).
    """

    inputs: ClassVar[tuple[str, ...]] = ("image",)

    depth: int = 16
    dropout: float = 0.5
    bn_update: bool = False  # no batch norm here; kept for a uniform interface
    dtype: Any = jnp.float32

    def blocks(self) -> list[str]:
        """Regexes of parameter paths from the input to the output, one per block group."""
        stages = CONFIGS[self.depth]
        return [f"^conv{s + 1}_\\d+/" for s in range(len(stages))] + ["^fc6/", "^fc7/"]

    @nn.compact
    def __call__(self, images: jnp.ndarray, train: bool = False
                 ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
        if self.depth not in CONFIGS:
            raise ValueError(f"VGG depth={self.depth}: expected one of {sorted(CONFIGS)}.")
        x, out = images, {}
        for s, (n, width) in enumerate(zip(CONFIGS[self.depth], STAGE_WIDTHS, strict=True)):
            for i in range(n):
                x = nn.relu(nn.Conv(width, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                                    name=f"conv{s + 1}_{i + 1}")(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
            out[f"stage_{s + 1}"] = x
        x = adaptive_avg_pool(x, (7, 7))
        x = jnp.reshape(x, (x.shape[0], -1))
        for name in ("fc6", "fc7"):
            x = nn.relu(nn.Dense(4096, dtype=self.dtype, name=name)(x))
            x = nn.Dropout(self.dropout)(x, deterministic=not train)
        return x, out


def make(variant: str | None = None, **kwargs: Any) -> VGG:
    """A VGG from `depth=` (11, 13, 16, 19) or a variant name like 'vgg16'."""
    if variant:
        digits = "".join(ch for ch in variant if ch.isdigit())
        if not digits or int(digits) not in CONFIGS:
            raise ValueError(f"Unknown VGG variant {variant!r}: expected e.g. 'vgg16'.")
        kwargs = {"depth": int(digits), **kwargs}
    return VGG(**kwargs)
