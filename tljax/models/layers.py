"""Layers shared by model families."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class DepthwiseConv(nn.Module):
    """Depthwise k x k convolution with 'SAME' padding, as `nn.Conv(C, (k, k),
    feature_group_count=C, use_bias=False)` (same `kernel` of shape (k, k, 1, C)).

    Written as a sum of k*k shifted, strided slices times per-channel weights:
    XLA's CPU backend runs grouped convolutions (and above all their kernel
    gradient) 5-15x slower than this; on GPU/TPU both compile to similar code.
    """

    kernel_size: int
    strides: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        k, s = self.kernel_size, self.strides
        channels = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, channels))
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        height, width = x.shape[1], x.shape[2]
        out_h, out_w = -(-height // s), -(-width // s)
        # TF/Flax 'SAME': the odd extra padding row/column goes at the bottom/right.
        pad_h = max((out_h - 1) * s + k - height, 0)
        pad_w = max((out_w - 1) * s + k - width, 0)
        x = jnp.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2),
                        (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
        out = jnp.zeros((x.shape[0], out_h, out_w, channels), self.dtype)
        for i in range(k):
            for j in range(k):
                window = x[:, i:i + (out_h - 1) * s + 1:s, j:j + (out_w - 1) * s + 1:s, :]
                out = out + window * kernel[i, j, 0]
        return out


def classifier_head(num_classes: int, zero_init: bool = True, dtype: Any = jnp.float32,
                    kernel_init: Any = None) -> nn.Dense:
    """The `head` Dense every model ends with: zero-initialised by default, so a
    fresh head starts from uniform predictions and gives no gradient noise to the
    pretrained body. Callers cast its output to float32 for the loss."""
    if kernel_init is None:
        kernel_init = nn.initializers.zeros if zero_init else nn.initializers.lecun_normal()
    return nn.Dense(num_classes, dtype=dtype, kernel_init=kernel_init, name="head")
