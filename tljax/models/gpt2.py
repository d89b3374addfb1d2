"""GPT-2 (Radford et al. 2019): learned positions, pre-LN decoder, tied output embedding.

Parameter tree ('/'-joined, `N` layers, width D, MLP width F):

    embed/embedding                          (V, D)   token embeddings (= output matrix)
    pos_embed/embedding                      (P, D)   learned positions, P = max_position_embeddings
    layers_{i}/attn_norm/{scale,bias}        (D,)     LayerNorm before attention (HF ln_1)
    layers_{i}/attn/{q,k,v,o}/{kernel,bias}  (D, D)   HF's fused c_attn split in q, k, v; o: c_proj
    layers_{i}/mlp_norm/{scale,bias}         (D,)     LayerNorm before the MLP (HF ln_2)
    layers_{i}/mlp/up/{kernel,bias}          (D, F)   HF mlp.c_fc
    layers_{i}/mlp/down/{kernel,bias}        (F, D)   HF mlp.c_proj
    norm/{scale,bias}                        (D,)     final LayerNorm (HF ln_f)
    head/kernel                              (D, V)   only with tie_word_embeddings=False

x_0 = embed[ids] + pos_embed[positions] (positions count real tokens, see
tljax.models.lm); each layer x = x + attn(ln(x)), x = x + mlp(ln(x)) with GELU (tanh
approximation, HF 'gelu_new'); features = norm(x). Dropout (embeddings, attention
probabilities, residual branches) only with train=True. `tljax.pretrained.gpt2`
converts HF checkpoints both ways.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from tljax.models import lm

VARIANTS = {  # name: (hidden_size, num_layers, num_heads)
    "small": (768, 12, 12),  # gpt2
    "medium": (1024, 24, 16),
    "large": (1280, 36, 20),
    "xl": (1600, 48, 25),
}


def decode_variant(variant: str) -> dict[str, Any]:
    if variant not in VARIANTS:
        raise ValueError(f"Unknown GPT-2 variant {variant!r}; known: {', '.join(VARIANTS)}.")
    hidden, layers, heads = VARIANTS[variant]
    return dict(hidden_size=hidden, num_layers=layers, num_heads=heads)


class GPT2(nn.Module):
    """GPT-2 decoder; `__call__(inputs, train=False) -> (features (B, L, D), out)`.

    `inputs`: {'input_ids': (B, L) int, optional 'attention_mask': (B, L), optional
    'segment_ids' (B, L) for packed rows (tljax.models.lm)}; `out` holds 'tokens',
    'embedding' and 'last_token' (B, D), the state of each row's last real token. `dtype` is
    the compute dtype, `param_dtype` the storage dtype; features are float32.
    `decode=True` reads and writes the KV cache (tljax.models.lm); `remat=True`
    recomputes each layer's activations in the backward pass.
    """

    inputs: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask", "segment_ids")

    vocab_size: int = 50257
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int | None = None  # None: 4 * hidden_size
    max_position_embeddings: int = 1024
    activation: str = "gelu_new"
    layer_norm_eps: float = 1e-5
    dropout: float = 0.1  # HF resid_pdrop and embd_pdrop
    attention_dropout: float = 0.1  # HF attn_pdrop
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 50256  # not used by the forward pass; kept for export
    eos_token_id: int | None = 50256
    decode: bool = False
    remat: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def blocks(self) -> list[str]:
        """Regexes of parameter paths from the input to the output, one per block group."""
        return (["^(embed|pos_embed)/"] + [f"^layers_{i}/" for i in range(self.num_layers)]
                + ["^norm/", "^head/"])

    @nn.compact
    def __call__(self, inputs: Mapping[str, jnp.ndarray], train: bool = False
                 ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads "
                             f"{self.num_heads}.")
        ids = jnp.asarray(inputs["input_ids"], jnp.int32)
        if ids.shape[1] > self.max_position_embeddings:  # also bounds a KV cache's length
            raise ValueError(f"Sequence length {ids.shape[1]} exceeds max_position_embeddings="
                             f"{self.max_position_embeddings}; truncate the inputs.")
        mask = inputs.get("attention_mask")
        mask = jnp.ones_like(ids) if mask is None else jnp.asarray(mask)
        segments = None if self.decode else inputs.get("segment_ids")
        allowed, positions, _, index = lm.mask_and_positions(self, mask, True, self.decode,
                                                             segments)

        embed = functools.partial(nn.Embed, features=self.hidden_size, dtype=self.dtype,
                                  param_dtype=self.param_dtype,
                                  embedding_init=nn.initializers.normal(self.initializer_range))
        tokens = embed(self.vocab_size, name="embed")
        x = tokens(ids) + embed(self.max_position_embeddings, name="pos_embed")(positions)
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        block = lm.block_class(lm.DecoderBlock, self.remat, 5)
        for i in range(self.num_layers):
            x = block(self.num_heads, self.num_heads, self.hidden_size // self.num_heads,
                      self.intermediate_size or 4 * self.hidden_size, self.activation,
                      norm="layer", norm_eps=self.layer_norm_eps, attention_bias=True,
                      mlp_bias=True, dropout=self.dropout,
                      attention_dropout=self.attention_dropout,
                      init_std=self.initializer_range, decode=self.decode, dtype=self.dtype,
                      param_dtype=self.param_dtype, name=f"layers_{i}")(
                          x, allowed, positions, index, train)
        x = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="norm")(x).astype(lm.wide(self.dtype))
        last = x[jnp.arange(x.shape[0]), lm.last_token_index(mask)]
        return x, {"tokens": x, "embedding": tokens.embedding, "last_token": last}


def make(variant: str | None = None, **kwargs: Any) -> GPT2:
    """A GPT-2 from a variant name ('small', 'medium', 'large', 'xl') plus keyword overrides."""
    return GPT2(**{**(decode_variant(variant) if variant else {}), **kwargs})
