"""Layers shared by model families."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
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


class PointwiseConv(nn.Conv):
    """A 1 x 1, stride 1 `nn.Conv` (same fields, `kernel` of shape (1, 1, Cin, Cout) and
    `bias`) computed as y = x W over the channel axis.

    Same maths, other HLO: XLA's CPU backend brackets a 1 x 1 convolution (forward and
    backward) with layout transposes that a dot over the last axis does not need; the
    EfficientNet-Lite0 train step of the quickstart is ~15% faster on CPU this way.
    """

    @nn.compact
    def __call__(self, inputs: jnp.ndarray) -> jnp.ndarray:
        size = (self.kernel_size,) if isinstance(self.kernel_size, int) else self.kernel_size
        strides = (self.strides,) if isinstance(self.strides, int) else self.strides or (1,)
        if (any(k != 1 for k in size) or any(s != 1 for s in strides)
                or self.feature_group_count != 1 or self.mask is not None):
            raise ValueError(f"PointwiseConv is a 1 x 1, stride 1, ungrouped convolution; "
                             f"got kernel_size={self.kernel_size}, strides={self.strides}, "
                             f"feature_group_count={self.feature_group_count}.")
        kernel = self.param("kernel", self.kernel_init,
                            (*size, inputs.shape[-1], self.features), self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        y = jnp.dot(inputs, kernel.reshape(kernel.shape[-2:]), precision=self.precision)
        return y + bias if bias is not None else y


class LinearHead(nn.Module):
    """The `head` most tasks attach: y = x W + b over the last axis, float32 out.

    Zero-initialised by default, so a fresh head starts from uniform predictions and sends
    no gradient noise into the pretrained body. Works on pooled features (B, D) and per
    token / per pixel features (..., D) alike. Parameters `kernel` (D, C) and `bias` (C,),
    named like `nn.Dense`'s so checkpoints read `head/kernel`, `head/bias`.
    """

    num_outputs: int
    zero_init: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        del train
        kernel_init = nn.initializers.zeros if self.zero_init else nn.initializers.lecun_normal()
        kernel = self.param("kernel", kernel_init, (x.shape[-1], self.num_outputs))
        bias = self.param("bias", nn.initializers.zeros, (self.num_outputs,))
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return (jnp.dot(x, kernel) + bias).astype(jnp.float32)


# Rematerialisation policies (`config.model.remat`): what the backward pass keeps of a block's
# forward activations; everything else it recomputes from the block's input.
REMAT_POLICIES = {
    "full": "nothing_saveable",  # keep only the block inputs: least memory, one extra forward
    "dots": "checkpoint_dots",  # keep every matmul output, recompute norms and activations
    "dots_no_batch": "dots_with_no_batch_dims_saveable",  # keep x @ W outputs, recompute the
    # attention matmuls (batched) and elementwise ops
}


def remat(module: type[nn.Module], policy: str | None, static_argnums: tuple[int, ...]
          ) -> type[nn.Module]:
    """`module` rematerialised with `policy` (a key of REMAT_POLICIES); None/'none': as is.

    Parameter names do not change (`nn.remat` keeps the submodule's name), so checkpoints load
    either way. `static_argnums` count `self` as 0 (e.g. (2,) for `__call__(self, x, train)`).
    """
    if policy in (None, "none"):
        return module
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat={policy!r}: expected None or one of "
                         f"{', '.join(REMAT_POLICIES)}.")
    return nn.remat(module, policy=getattr(jax.checkpoint_policies, REMAT_POLICIES[policy]),
                    static_argnums=static_argnums)
