"""T5 (Raffel et al. 2020) encoder-decoder with relative position buckets; v1.0 and v1.1.

Parameter tree ('/'-joined; N encoder and M decoder layers, width D, H heads of size d,
MLP width F, B buckets); HF `T5ForConditionalGeneration` names in brackets, with
E = encoder.block.i.layer, Y = decoder.block.i.layer (see tljax.pretrained.t5):

    embed/embedding                           (V, D)   shared embedding [shared]
    encoder/relative_attention_bias/embedding (B, H)   [encoder.block.0.layer.0.SelfAttention.
                                                        relative_attention_bias]
    encoder/layers_{i}/attn_norm/scale        (D,)     [E.0.layer_norm]
    encoder/layers_{i}/attn/{q,k,v}/kernel    (D, H*d) [E.0.SelfAttention.{q,k,v}]
    encoder/layers_{i}/attn/o/kernel          (H*d, D) [E.0.SelfAttention.o]
    encoder/layers_{i}/mlp_norm/scale         (D,)     [E.1.layer_norm]
    encoder/layers_{i}/mlp/up/kernel          (D, F)   [E.1.DenseReluDense.wi; gated: wi_1]
    encoder/layers_{i}/mlp/gate/kernel        (D, F)   [E.1.DenseReluDense.wi_0], gated only
    encoder/layers_{i}/mlp/down/kernel        (F, D)   [E.1.DenseReluDense.wo]
    encoder/norm/scale                        (D,)     [encoder.final_layer_norm]
    decoder/relative_attention_bias/embedding (B, H)
    decoder/layers_{i}/{attn_norm,attn}                causal self-attention [Y.0]
    decoder/layers_{i}/{cross_attn_norm,cross_attn}    attention to the encoder
                                                       [Y.1.layer_norm, Y.1.EncDecAttention]
    decoder/layers_{i}/{mlp_norm,mlp}                  [Y.2]
    decoder/norm/scale                        (D,)     [decoder.final_layer_norm]
    head/kernel                               (D, V)   [lm_head], only when untied (v1.1)

Rules (HF / mesh-tensorflow): norms are RMS norms without mean or bias (`lm.RMSNorm`);
attention scores q k^T are not scaled by d^-1/2; each stack adds to every layer's scores
the bias of the bucket of (key position - query position) (`relative_position_bucket`,
bidirectional in the encoder, causal in the decoder; cross-attention has none); the MLP
is relu (v1.0, `feed_forward_proj='relu'`) or gated GELU (v1.1, 'gated-gelu', tanh
approximation). The v1.0 output is tied to the embedding and multiplies the decoder
features by D^-1/2 first (`logit_scale`); v1.1 has its own `head` and no scale
(`scale_decoder_outputs` sets the scale apart from the tying, as transformers 5 does).
Dropout (`dropout`) on embeddings, attention probabilities, MLP hidden units, residual
branches and after the final norms, only with train=True. Relative positions depend on
slot differences only, so padding on either side leaves real tokens' states unchanged.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from tljax.models import lm

VARIANTS = {  # name: (d_model, layers, heads, d_ff, feed_forward_proj, tied)
    "small": (512, 6, 8, 2048, "relu", True),
    "base": (768, 12, 12, 3072, "relu", True),
    "large": (1024, 24, 16, 4096, "relu", True),
    "v1_1-small": (512, 8, 6, 1024, "gated-gelu", False),
    "v1_1-base": (768, 12, 12, 2048, "gated-gelu", False),
    "v1_1-large": (1024, 24, 16, 2816, "gated-gelu", False),
}


def decode_variant(variant: str) -> dict[str, Any]:
    if variant not in VARIANTS:
        raise ValueError(f"Unknown T5 variant {variant!r}; known: {', '.join(VARIANTS)}.")
    d_model, layers, heads, d_ff, proj, tied = VARIANTS[variant]
    return dict(hidden_size=d_model, num_layers=layers, num_heads=heads, intermediate_size=d_ff,
                feed_forward_proj=proj, tie_word_embeddings=tied)


def parse_feed_forward_proj(proj: str) -> tuple[str, bool]:
    """HF `feed_forward_proj` -> (activation, gated): 'relu' -> relu; 'gated-gelu' -> the
    tanh-approximate GELU (HF maps it to 'gelu_new'); 'gated-ACT' -> ACT."""
    parts = proj.split("-")
    gated = len(parts) == 2 and parts[0] == "gated"
    if len(parts) > 2 or (len(parts) == 2 and not gated):
        raise ValueError(f"feed_forward_proj={proj!r}: expected 'ACT' or 'gated-ACT'.")
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]
    lm.activation(act)
    return act, gated


def relative_position_bucket(relative_position: jnp.ndarray, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> jnp.ndarray:
    """T5's bucket of `relative_position` = key position - query position.

    Bidirectional: half the buckets for keys after the query. Of the remaining n buckets,
    distances below n/2 get one bucket each; larger ones share logarithmically spaced
    buckets up to `max_distance`, beyond which all fall into the last. Causal: keys after
    the query (never attended) count as distance 0. float32 arithmetic in HF's order, so
    the boundaries fall where HF's do.
    """
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).astype(relative_position.dtype) * num_buckets
        distance = jnp.abs(relative_position)
    else:
        distance = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    log_ratio = (jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
                 / np.float32(math.log(max_distance / max_exact)))
    large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(relative_position.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, distance, large)


class Block(nn.Module):
    """One T5 layer: self-attention, (decoder) cross-attention, MLP, each pre-norm with a
    residual: x = x + dropout(sublayer(rms(x)))."""

    num_heads: int
    head_dim: int
    intermediate_size: int
    activation: str
    gated: bool
    cross: bool
    norm_eps: float
    dropout: float
    decode: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, allowed: jnp.ndarray, bias: jnp.ndarray,
                 encoded: jnp.ndarray | None, encoder_allowed: jnp.ndarray | None,
                 index: jnp.ndarray | None, train: bool = False) -> jnp.ndarray:
        norm = lambda name: lm.RMSNorm(self.norm_eps, self.dtype, self.param_dtype, name=name)
        drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=not train)
        attention = functools.partial(
            lm.Attention, self.num_heads, self.num_heads, self.head_dim, scale=1.0,
            dropout=self.dropout, kernel_init=nn.initializers.lecun_normal(), dtype=self.dtype,
            param_dtype=self.param_dtype)
        y = attention(decode=self.decode, name="attn")(norm("attn_norm")(x), allowed, bias=bias,
                                                       index=index, train=train)
        x = x + drop(y)
        if self.cross:
            y = attention(name="cross_attn")(norm("cross_attn_norm")(x), encoder_allowed,
                                             context=encoded, train=train)
            x = x + drop(y)
        y = lm.Mlp(self.intermediate_size, self.activation, self.gated, dropout=self.dropout,
                   kernel_init=nn.initializers.lecun_normal(), dtype=self.dtype,
                   param_dtype=self.param_dtype, name="mlp")(norm("mlp_norm")(x), train)
        return x + drop(y)


class Stack(nn.Module):
    """The encoder (bidirectional) or decoder (causal, with cross-attention) stack; the
    input is the embedded tokens; the output is dropout(rms(x)) in float32."""

    num_layers: int
    num_heads: int
    head_dim: int
    intermediate_size: int
    activation: str
    gated: bool
    causal: bool
    num_buckets: int
    max_distance: int
    norm_eps: float
    dropout: float
    decode: bool = False
    remat: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, mask: jnp.ndarray, encoded: jnp.ndarray | None = None,
                 encoder_mask: jnp.ndarray | None = None, train: bool = False) -> jnp.ndarray:
        allowed, _, query_slots, index = lm.mask_and_positions(self, mask, self.causal,
                                                               self.decode)
        key_slots = jnp.arange(allowed.shape[-1])
        buckets = relative_position_bucket(key_slots[None, :] - query_slots[:, None],
                                           not self.causal, self.num_buckets, self.max_distance)
        bias = nn.Embed(self.num_buckets, self.num_heads, param_dtype=self.param_dtype,
                        embedding_init=nn.initializers.normal(1.0),
                        name="relative_attention_bias")(buckets)  # (L, S, H)
        bias = jnp.transpose(bias, (2, 0, 1))[None]
        encoder_allowed = None
        if encoded is not None:
            encoder_allowed = jnp.asarray(encoder_mask).astype(bool)[:, None, None, :]

        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        block = lm.block_class(Block, self.remat, 7)
        for i in range(self.num_layers):
            x = block(self.num_heads, self.head_dim, self.intermediate_size, self.activation,
                      self.gated, self.causal, self.norm_eps, self.dropout, self.decode,
                      self.dtype, self.param_dtype, name=f"layers_{i}")(
                          x, allowed, bias, encoded, encoder_allowed, index, train)
        x = lm.RMSNorm(self.norm_eps, lm.wide(self.dtype), self.param_dtype, name="norm")(x)
        return nn.Dropout(self.dropout)(x, deterministic=not train)


class T5(nn.Module):
    """T5 encoder-decoder; `__call__(inputs, train=False) -> (decoder features, out)`.

    `inputs`: {'input_ids', 'attention_mask' (encoder), 'decoder_input_ids',
    'decoder_attention_mask' (optional, default all ones)}, each (B, L_enc) or (B, L_dec).
    Decoder inputs are the targets shifted right behind `decoder_start_token_id`
    (`shift_right`). `out` = {'tokens': decoder features, 'encoder': encoder features,
    'embedding': shared table}. `encode(inputs)` runs the encoder alone; `__call__(...,
    encoded=...)` reuses its result (generation). `decode=True` caches the decoder's
    self-attention keys/values (tljax.models.lm).
    """

    inputs: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask", "decoder_input_ids",
                                         "decoder_attention_mask")

    vocab_size: int = 32128
    hidden_size: int = 512  # HF d_model
    num_layers: int = 6
    num_decoder_layers: int | None = None  # None: num_layers
    num_heads: int = 8
    head_dim: int = 64  # HF d_kv
    intermediate_size: int = 2048  # HF d_ff
    feed_forward_proj: str = "relu"
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_eps: float = 1e-6
    dropout: float = 0.1  # HF dropout_rate
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool | None = None  # None: as tie_word_embeddings (v1.0 / v1.1)
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    decode: bool = False
    remat: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @property
    def logit_scale(self) -> float:
        """T5 v1.0 (tied output) rescales decoder features by d_model^-1/2 before the LM head."""
        scale = self.scale_decoder_outputs
        scale = self.tie_word_embeddings if scale is None else scale
        return self.hidden_size**-0.5 if scale else 1.0

    def blocks(self) -> list[str]:
        """Groups input to output: shared embedding, encoder layers (layer 0 with the
        encoder's relative bias, as in HF), encoder norm, decoder layers, decoder norm, head."""
        decoder_layers = self.num_decoder_layers or self.num_layers
        stack = lambda name, n: ([f"^{name}/(layers_0|relative_attention_bias)/"]
                                 + [f"^{name}/layers_{i}/" for i in range(1, n)]
                                 + [f"^{name}/norm/"])
        return (["^embed/"] + stack("encoder", self.num_layers)
                + stack("decoder", decoder_layers) + ["^head/"])

    def setup(self) -> None:
        activation, gated = parse_feed_forward_proj(self.feed_forward_proj)
        self.embed = nn.Embed(self.vocab_size, self.hidden_size, dtype=self.dtype,
                              param_dtype=self.param_dtype,
                              embedding_init=nn.initializers.normal(1.0))
        stack = functools.partial(
            Stack, num_heads=self.num_heads, head_dim=self.head_dim,
            intermediate_size=self.intermediate_size, activation=activation, gated=gated,
            num_buckets=self.relative_attention_num_buckets,
            max_distance=self.relative_attention_max_distance, norm_eps=self.layer_norm_eps,
            dropout=self.dropout, remat=self.remat, dtype=self.dtype,
            param_dtype=self.param_dtype)
        self.encoder = stack(self.num_layers, causal=False)
        self.decoder = stack(self.num_decoder_layers or self.num_layers, causal=True,
                             decode=self.decode)

    def encode(self, inputs: Mapping[str, jnp.ndarray], train: bool = False) -> jnp.ndarray:
        """Encoder features (B, L_enc, D), float32."""
        ids = jnp.asarray(inputs["input_ids"], jnp.int32)
        return self.encoder(self.embed(ids), _mask(inputs, "attention_mask", ids), train=train)

    def __call__(self, inputs: Mapping[str, jnp.ndarray], train: bool = False,
                 encoded: jnp.ndarray | None = None
                 ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
        if encoded is None:
            encoded = self.encode(inputs, train)
        encoder_mask = _mask(inputs, "attention_mask", encoded[..., 0])
        ids = jnp.asarray(inputs["decoder_input_ids"], jnp.int32)
        x = self.decoder(self.embed(ids), _mask(inputs, "decoder_attention_mask", ids),
                         encoded.astype(self.dtype), encoder_mask, train=train)
        return x, {"tokens": x, "encoder": encoded, "embedding": self.embed.embedding}


def _mask(inputs: Mapping[str, Any], key: str, like: jnp.ndarray) -> jnp.ndarray:
    mask = inputs.get(key)
    return jnp.ones(like.shape, jnp.int32) if mask is None else jnp.asarray(mask)


def shift_right(labels: jnp.ndarray, decoder_start_token_id: int = 0, pad_token_id: int = 0,
                ignore_id: int = -100) -> jnp.ndarray:
    """Decoder inputs for teacher forcing: [start, y_0, ..., y_{L-2}], `ignore_id` -> pad."""
    labels = jnp.asarray(labels)
    start = jnp.full(labels.shape[:-1] + (1,), decoder_start_token_id, labels.dtype)
    shifted = jnp.concatenate([start, labels[..., :-1]], axis=-1)
    return jnp.where(shifted == ignore_id, pad_token_id, shifted)


def make(variant: str | None = None, **kwargs: Any) -> T5:
    """A T5 from a variant name ('small', 'base', 'v1_1-small', ...) plus keyword overrides."""
    return T5(**{**(decode_variant(variant) if variant else {}), **kwargs})
