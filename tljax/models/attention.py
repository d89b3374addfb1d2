"""Scaled dot-product attention with a selectable implementation, and the multi-head layer.

    out = attention(q, k, v, mask, implementation='xla')      # q (B, T, H, Dh), k, v (B, S, H, Dh)

computes, per head, softmax(q k^T / sqrt(Dh) + where(mask, 0, -inf)) v, with the logits and the
softmax in float32 whatever the input dtype (bfloat16 inputs give bfloat16 outputs). `mask` is
boolean, True where a key may be attended to: (B, S) for a key padding mask, or anything
broadcastable to (B, H, T, S). The implementations compute the same function:

  'xla'        `jax.nn.dot_product_attention(implementation='xla')`: one fused expression XLA
               compiles on any backend (the default of every model family). On CPU it is the
               reference formula below: jax.nn's version (a vmap over query groups) costs
               XLA's CPU backend extra layout copies (ViT-S/16's train step 1.7% slower).
  'cudnn'      `jax.nn.dot_product_attention(implementation='cudnn')`: cuDNN's flash attention
               on NVIDIA GPUs; needs bfloat16/float16 inputs (`compute_dtype='bfloat16'`) and a
               head dimension that is a multiple of 8 (<= 128, or 256 on Hopper); it never
               materialises the (T, S) probabilities. A mask becomes an additive bias there,
               which in training needs even T and S; with jax 0.11.2 and cuDNN 9.19 training
               needs even T and S with no mask too (ViT-B/16's 197 tokens are refused, its
               forward pass is not). Unsupported shapes raise a ValueError at trace time.
  'reference'  the formula written out with einsums: what the fused kernels are tested
               against, and the path that supports dropout on the attention probabilities.

`dropout`, a function applied to the probabilities (BERT's attention dropout in training),
needs the probabilities themselves: 'xla' then computes the reference formula (the same
function), 'cudnn' refuses.

`MultiHeadDotProductAttention` is Flax's layer of the same name with `attention=` added: the
same parameters (`query`, `key`, `value` kernels (D, H, Dh) and biases (H, Dh); `out` kernel
(H, Dh, D) and bias (D,)), the same initialisers and names, so checkpoints and seeds carry over.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tljax.models.layers import matmul_dot_general

IMPLEMENTATIONS = ("xla", "cudnn", "reference")
XLA_IS_REFERENCE_ON_CPU = True  # 'xla' on CPU computes the reference formula (module doc)


def check_implementation(implementation: str) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention={implementation!r}: expected one of "
                         f"{', '.join(IMPLEMENTATIONS)}.")


def _as_4d_mask(mask: jnp.ndarray | None) -> jnp.ndarray | None:
    if mask is None:
        return None
    mask = jnp.asarray(mask, bool)
    if mask.ndim == 2:  # (B, S) key padding mask
        return mask[:, None, None, :]
    if mask.ndim != 4:
        raise ValueError(f"attention mask of shape {mask.shape}: expected (B, S) or a shape "
                         "broadcastable to (B, H, T, S).")
    return mask


def reference_attention(query: jnp.ndarray, key: jnp.ndarray, value: jnp.ndarray,
                        mask: jnp.ndarray | None = None,
                        dropout: Callable[[jnp.ndarray], jnp.ndarray] | None = None
                        ) -> jnp.ndarray:
    """softmax(q k^T / sqrt(Dh) + mask) v with float32 logits and softmax (see module doc)."""
    scale = query.shape[-1] ** -0.5
    # Half-precision inputs, float32 logits: name the algorithm (half x half, f32 accumulate)
    # so that the backward pass, whose cotangent is float32, still multiplies in half
    # precision instead of falling back to float32 matmuls (as jax.nn's 'xla' path does).
    precision = {jnp.dtype(jnp.bfloat16): jax.lax.DotAlgorithmPreset.BF16_BF16_F32,
                 jnp.dtype(jnp.float16): jax.lax.DotAlgorithmPreset.F16_F16_F32}.get(
                     jnp.dtype(query.dtype))
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, precision=precision,
                        preferred_element_type=jnp.float32) * scale
    mask = _as_4d_mask(mask)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    if dropout is not None:
        probs = dropout(probs)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(value.dtype), value)


def attention(query: jnp.ndarray, key: jnp.ndarray, value: jnp.ndarray,
              mask: jnp.ndarray | None = None, *, implementation: str = "xla",
              dropout: Callable[[jnp.ndarray], jnp.ndarray] | None = None) -> jnp.ndarray:
    """Multi-head attention over (B, T, H, Dh) queries; see the module docstring."""
    check_implementation(implementation)
    if dropout is not None:
        if implementation == "cudnn":
            raise ValueError("attention='cudnn' cannot apply dropout to the attention "
                             "probabilities: set the model's attention_dropout to 0, or use "
                             "attention='xla'.")
        implementation = "reference"
    if implementation == "reference" or (implementation == "xla" and XLA_IS_REFERENCE_ON_CPU
                                         and jax.default_backend() == "cpu"):
        return reference_attention(query, key, value, mask, dropout)
    if implementation == "cudnn" and query.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention='cudnn' needs bfloat16 or float16 inputs, got "
                         f"{query.dtype}: set compute_dtype='bfloat16' or attention='xla'.")
    try:
        return jax.nn.dot_product_attention(query, key, value, mask=_as_4d_mask(mask),
                                            implementation=implementation)
    except NotImplementedError as e:  # cuDNN's shape checks, raised while tracing
        if implementation != "cudnn":
            raise
        raise ValueError(
            f"attention='cudnn' cannot take queries {query.shape} and keys {key.shape} "
            f"(batch, tokens, heads, head dim): {e} cuDNN's training kernel needs even token "
            f"counts (a ViT at 224 px has 197: 196 patches and the class token) and a head dim "
            f"that is a multiple of 8; set attention='xla' for these shapes.") from e


class MultiHeadDotProductAttention(nn.Module):
    """Flax's `nn.MultiHeadDotProductAttention` (same parameters) with a choice of kernel.

    `__call__(inputs_q, inputs_kv, mask=None)`: queries from `inputs_q` (B, T, D), keys and
    values from `inputs_kv` (B, S, D); returns (B, T, D).
    """

    num_heads: int
    dtype: Any = jnp.float32
    kernel_init: Callable[..., Any] = nn.linear.default_kernel_init
    bias_init: Callable[..., Any] = nn.initializers.zeros_init()
    attention: str = "xla"

    @nn.compact
    def __call__(self, inputs_q: jnp.ndarray, inputs_kv: jnp.ndarray,
                 mask: jnp.ndarray | None = None) -> jnp.ndarray:
        features = inputs_q.shape[-1]
        if features % self.num_heads:
            raise ValueError(f"width {features} is not divisible by num_heads "
                             f"{self.num_heads}.")
        head_dim = features // self.num_heads
        dense = lambda name: nn.DenseGeneral(
            features=(self.num_heads, head_dim), axis=-1, dtype=self.dtype,
            kernel_init=self.kernel_init, bias_init=self.bias_init,
            dot_general=matmul_dot_general, name=name)
        query = dense("query")(inputs_q)
        key, value = dense("key")(inputs_kv), dense("value")(inputs_kv)
        x = attention(query, key, value, mask, implementation=self.attention)
        return nn.DenseGeneral(features=features, axis=(-2, -1), dtype=self.dtype,
                               kernel_init=self.kernel_init, bias_init=self.bias_init,
                               dot_general=matmul_dot_general, name="out")(x)
