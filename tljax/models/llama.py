"""Llama (Touvron et al. 2023): RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention.

Parameter tree ('/'-joined, `N` layers, width D, H query heads and KV key/value heads of
size d, MLP width F); names mirror HF `LlamaForCausalLM` (see tljax.pretrained.llama):

    embed/embedding                    (V, D)     HF model.embed_tokens
    layers_{i}/attn_norm/scale         (D,)       HF input_layernorm
    layers_{i}/attn/q/kernel           (D, H*d)   HF self_attn.q_proj (transposed)
    layers_{i}/attn/{k,v}/kernel       (D, KV*d)  HF self_attn.{k,v}_proj
    layers_{i}/attn/o/kernel           (H*d, D)   HF self_attn.o_proj
    layers_{i}/attn/{q,k,v,o}/bias                only with attention_bias=True
    layers_{i}/mlp_norm/scale          (D,)       HF post_attention_layernorm
    layers_{i}/mlp/{gate,up}/kernel    (D, F)     HF mlp.{gate,up}_proj
    layers_{i}/mlp/down/kernel         (F, D)     HF mlp.down_proj (biases with mlp_bias=True)
    norm/scale                         (D,)       HF model.norm
    head/kernel                        (D, V)     HF lm_head, only when tie_word_embeddings=False

Each layer: x = x + attn(rms(x)), x = x + down(silu(gate(h)) * up(h)) with h = rms(x);
features = rms(x). q and k are rotated by RoPE with base `rope_theta` in HF's rotate-half
layout (tljax.models.lm.rope) at positions that count real tokens; query head j uses
key/value head j // (H / KV). Only the default RoPE (no rope_scaling) is implemented.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from tljax.models import lm

VARIANTS = {  # name: HF config fields that differ from the defaults below
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9,
                         num_kv_heads=3, intermediate_size=1536, max_position_embeddings=8192,
                         rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2),
    "smollm2-360m": dict(vocab_size=49152, hidden_size=960, num_layers=32, num_heads=15,
                         num_kv_heads=5, intermediate_size=2560, max_position_embeddings=8192,
                         rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2),
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, num_layers=22, num_heads=32,
                           num_kv_heads=4, intermediate_size=5632, rms_norm_eps=1e-5),
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
                      intermediate_size=11008, max_position_embeddings=4096, rms_norm_eps=1e-5),
}


class Llama(nn.Module):
    """Llama decoder; `__call__(inputs, train=False) -> (features (B, L, D), out)`.

    `inputs`: {'input_ids': (B, L) int, optional 'attention_mask': (B, L), optional
    'segment_ids' (B, L) for packed rows (tljax.models.lm)}; `out` holds 'tokens',
    'embedding' and 'last_token' (B, D), the state of each row's last real token.
    `num_kv_heads` None means multi-head attention (KV = H); `head_dim` None means
    hidden_size / num_heads. `dtype` is the compute dtype, `param_dtype` the storage
    dtype (norms, softmax and features in float32). `decode=True` reads and writes the KV
    cache (tljax.models.lm); `remat=True` recomputes each layer in the backward pass.
    """

    inputs: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask", "segment_ids")

    vocab_size: int = 32000
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int = 11008
    max_position_embeddings: int = 2048  # RoPE has no table: the trained context, for info
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1  # not used by the forward pass; kept for export
    eos_token_id: int | None = 2
    decode: bool = False
    remat: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def blocks(self) -> list[str]:
        """Regexes of parameter paths from the input to the output, one per block group."""
        return (["^embed/"] + [f"^layers_{i}/" for i in range(self.num_layers)]
                + ["^norm/", "^head/"])

    @nn.compact
    def __call__(self, inputs: Mapping[str, jnp.ndarray], train: bool = False
                 ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
        head_dim = self.head_dim or self.hidden_size // self.num_heads
        ids = jnp.asarray(inputs["input_ids"], jnp.int32)
        mask = inputs.get("attention_mask")
        mask = jnp.ones_like(ids) if mask is None else jnp.asarray(mask)
        segments = None if self.decode else inputs.get("segment_ids")
        allowed, positions, _, index = lm.mask_and_positions(self, mask, True, self.decode,
                                                             segments)

        tokens = nn.Embed(self.vocab_size, self.hidden_size, dtype=self.dtype,
                          param_dtype=self.param_dtype,
                          embedding_init=nn.initializers.normal(self.initializer_range),
                          name="embed")
        x = tokens(ids)
        block = lm.block_class(lm.DecoderBlock, self.remat, 5)
        for i in range(self.num_layers):
            x = block(self.num_heads, self.num_kv_heads or self.num_heads, head_dim,
                      self.intermediate_size, self.hidden_act, norm="rms",
                      norm_eps=self.rms_norm_eps, gated=True, attention_bias=self.attention_bias,
                      mlp_bias=self.mlp_bias, rope_theta=self.rope_theta,
                      attention_dropout=self.attention_dropout, init_std=self.initializer_range,
                      decode=self.decode, dtype=self.dtype, param_dtype=self.param_dtype,
                      name=f"layers_{i}")(x, allowed, positions, index, train)
        x = lm.RMSNorm(self.rms_norm_eps, dtype=lm.wide(self.dtype), param_dtype=self.param_dtype,
                       name="norm")(x)
        last = x[jnp.arange(x.shape[0]), lm.last_token_index(mask)]
        return x, {"tokens": x, "embedding": tokens.embedding, "last_token": last}


def make(variant: str | None = None, **kwargs: Any) -> Llama:
    """A Llama from a variant name (e.g. 'smollm2-135m') plus keyword overrides."""
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"Unknown Llama variant {variant!r}; known: {', '.join(VARIANTS)}.")
    return Llama(**{**(VARIANTS[variant] if variant else {}), **kwargs})
