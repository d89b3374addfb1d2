"""Layers shared by model families."""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _same_padding(size: int, k: int, s: int) -> tuple[int, int, int]:
    """(output size, padding before, padding after) of TF/Flax 'SAME': the odd extra
    row/column goes at the bottom/right."""
    out = -(-size // s)
    pad = max((out - 1) * s + k - size, 0)
    return out, pad // 2, pad - pad // 2


def _taps(x: jnp.ndarray, kernel: jnp.ndarray, out_h: int, out_w: int, s: int) -> jnp.ndarray:
    """sum over (i, j) of x[:, i + s*o, j + s*p, :] * kernel[i, j]: x is already padded."""
    k = kernel.shape[0]
    out = None
    for i in range(k):
        for j in range(k):
            window = x[:, i:i + (out_h - 1) * s + 1:s, j:j + (out_w - 1) * s + 1:s, :]
            out = window * kernel[i, j] if out is None else out + window * kernel[i, j]
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise_conv(x: jnp.ndarray, kernel: jnp.ndarray, stride: int) -> jnp.ndarray:
    """Depthwise 'SAME' convolution of x (B, H, W, C) with kernel (k, k, C), as shifted slices.

    Gradients (out = sum_ij window_ij(pad(x)) * K_ij):
      dx = the same shifted-slice sum over the output gradient g, dilated by the stride and
           padded by k - 1, with the kernel flipped in both spatial axes;
      dK_ij = sum over (b, o, p) of window_ij * g (`_kernel_gradient`).
    """
    k = kernel.shape[0]
    out_h, top, bottom = _same_padding(x.shape[1], k, stride)
    out_w, left, right = _same_padding(x.shape[2], k, stride)
    x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    return _taps(x, kernel, out_h, out_w, stride)


def _depthwise_fwd(x: jnp.ndarray, kernel: jnp.ndarray, stride: int
                   ) -> tuple[jnp.ndarray, tuple[jnp.ndarray, jnp.ndarray]]:
    return depthwise_conv(x, kernel, stride), (x, kernel)


def _depthwise_bwd(stride: int, residuals: tuple[jnp.ndarray, jnp.ndarray], g: jnp.ndarray
                   ) -> tuple[jnp.ndarray, jnp.ndarray]:
    x, kernel = residuals
    k, s = kernel.shape[0], stride
    height, width = x.shape[1], x.shape[2]
    out_h, top, bottom = _same_padding(height, k, s)
    out_w, left, right = _same_padding(width, k, s)
    # dx[y] = sum_i gd[y + top - i] K[i], gd = g dilated by s: pad gd so that a stride-1
    # shifted-slice sum with the flipped kernel reads exactly those rows.
    low_h, low_w = k - 1 - top, k - 1 - left
    high_h = height + k - 1 - low_h - ((out_h - 1) * s + 1)
    high_w = width + k - 1 - low_w - ((out_w - 1) * s + 1)
    padded_g = jax.lax.pad(g, jnp.zeros((), g.dtype), ((0, 0, 0), (low_h, high_h, s - 1),
                                                       (low_w, high_w, s - 1), (0, 0, 0)))
    dx = _taps(padded_g, kernel[::-1, ::-1], height, width, 1)
    padding = ((0, 0), (top, bottom), (left, right), (0, 0))
    return dx.astype(x.dtype), _kernel_gradient(x, padding, g, k, s).astype(kernel.dtype)


# Images per step of the CPU kernel-gradient loop (0: no loop). Four keep a step's windows in
# the core's cache for every block of EfficientNet-Lite0..4 at the quickstart's sizes.
KERNEL_GRADIENT_IMAGES = 4


def _kernel_gradient(x: jnp.ndarray, padding: tuple, g: jnp.ndarray, k: int, s: int
                     ) -> jnp.ndarray:
    """dK_ij = sum over (b, o, p) of window_ij(pad(x)) * g, shape (k, k, C).

    Each tap's sum is a matmul of a ones vector with the product (XLA's CPU backend runs it
    as a matmul, faster than its reduction loops). On CPU the batch is visited a few images
    at a time: the k*k passes over one slice then stay in cache instead of streaming the
    whole batch from memory k*k times (3-6x faster for this gradient, measured on the
    quickstart's blocks). Only on a single CPU device: a loop over a batch sharded across
    devices would gather it.
    """
    batch, out_h, out_w, channels = g.shape
    images = KERNEL_GRADIENT_IMAGES

    def taps(x: jnp.ndarray, g: jnp.ndarray) -> jnp.ndarray:
        padded_x = jnp.pad(x, padding)  # fused into each product: never written out
        n = g.shape[0] * out_h * out_w
        ones = jnp.ones((n,), g.dtype)
        return jnp.stack([jnp.stack([
            ones @ (padded_x[:, i:i + (out_h - 1) * s + 1:s, j:j + (out_w - 1) * s + 1:s, :]
                    * g).reshape(n, channels) for j in range(k)]) for i in range(k)])

    if (jax.default_backend() != "cpu" or jax.device_count() > 1 or images <= 0
            or batch <= images or batch % images):
        return taps(x, g)
    steps = batch // images
    xs = x.reshape(images, steps, *x.shape[1:])
    gs = g.reshape(images, steps, *g.shape[1:])

    def add_step(step: jnp.ndarray, total: jnp.ndarray) -> jnp.ndarray:
        return total + taps(jax.lax.dynamic_index_in_dim(xs, step, 1, keepdims=False),
                            jax.lax.dynamic_index_in_dim(gs, step, 1, keepdims=False))

    return jax.lax.fori_loop(0, steps, add_step, jnp.zeros((k, k, channels), g.dtype))


depthwise_conv.defvjp(_depthwise_fwd, _depthwise_bwd)


class DepthwiseConv(nn.Module):
    """Depthwise k x k convolution with 'SAME' padding, as `nn.Conv(C, (k, k),
    feature_group_count=C, use_bias=False)` (same `kernel` of shape (k, k, 1, C)).

    Written as a sum of k*k shifted, strided slices times per-channel weights
    (`depthwise_conv`, with its gradients written out): XLA's CPU backend runs grouped
    convolutions (and above all their kernel gradient) 4-15x slower than this; on GPU/TPU
    both compile to similar code.
    """

    kernel_size: int
    strides: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, x.shape[-1]))
        return depthwise_conv(x.astype(self.dtype), kernel[:, :, 0].astype(self.dtype),
                              self.strides)


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


# False: `matmul_dot_general` is plain `lax.dot_general` (Flax's N-D contraction), for A/Bs
# such as the step benchmark's `tljax_nd_dense`. Read at trace time.
DENSE_AS_2D_MATMUL = True


def matmul_dot_general(lhs: jnp.ndarray, rhs: jnp.ndarray, dimension_numbers: Any,
                       precision: Any = None, preferred_element_type: Any = None
                       ) -> jnp.ndarray:
    """`lax.dot_general` for `nn.Dense` / `nn.DenseGeneral(dot_general=...)`: a contraction of
    the trailing input axes with the leading kernel axes runs as one 2-D matmul,
    (prod(batch), K) x (K, N), reshaped back; anything else goes to `lax.dot_general`.

    Same maths, other HLO: for (B, T, D) x (D, F) and the attention kernels (D, H, Dh) and
    (H, Dh, D), autodiff's gradients of the N-D contraction make XLA's CPU backend copy the
    kernels and the widest gradient into transposed layouts every step; the 2-D form needs
    none of those copies (ViT-S/16's CPU train step is ~4% faster).
    """
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    n = len(lhs_contract)
    if (not DENSE_AS_2D_MATMUL or lhs_batch or rhs_batch
            or tuple(lhs_contract) != tuple(range(lhs.ndim - n, lhs.ndim))
            or tuple(rhs_contract) != tuple(range(n))):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)
    depth = math.prod(rhs.shape[:n])
    out = jax.lax.dot_general(lhs.reshape(-1, depth), rhs.reshape(depth, -1),
                              (((1,), (0,)), ((), ())), precision=precision,
                              preferred_element_type=preferred_element_type)
    return out.reshape(lhs.shape[:lhs.ndim - n] + rhs.shape[n:])


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
