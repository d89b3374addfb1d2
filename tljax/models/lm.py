"""Building blocks of the language-model families (GPT-2, Llama, T5) and their LM head.

Backbone contract. `model.apply(variables, inputs, train=False) -> (features, out)`:
`features` are the final hidden states (B, L, D), float32, after the final norm; `out`
holds named intermediates: 'tokens' (= features), 'embedding' (the input embedding table,
(V, D)), for the decoders 'last_token' (B, D) (each row's last real token, what a
sequence classifier reads) and, for T5, 'encoder' (the encoder's final states).

The LM head. `LMHead` is a task head (`tljax.models.Model` attaches it as `head`, reading
head_input ('features', 'embedding'); `with_lm_head(backbone)` builds that model, which is
what `load_pretrained` returns and the `causal_lm` / `seq2seq` tasks train):

    logits = (s * features) @ E^T     tied output (s = 1, or d_model^-1/2 for T5 v1.0),
    logits = features @ W (+ b)       untied: W = params['head']['kernel'] (D, V),

so an untied head's parameters sit under `head/` like any task head, and a tied model has
none. `lm_logits(model, variables, features, out)` applies the head of a bare backbone or
of a `Model` to features computed apart (generation feeds it one position at a time).

Masks and positions. `attention_mask` (B, L) marks real tokens with 1; padding may be on
either side. Query i attends to key j iff mask[j] and, for causal models, j <= i. Padded
keys get the most negative float32 before the float32 softmax (zero weight); rows of
padded queries are computed but meaningless. Absolute positions (GPT-2's learned table,
Llama's RoPE) count real tokens, `position = max(cumsum(mask) - 1, 0)`, what HF computes
in `generate` (cumsum - 1, padding filled with 1), so a real token's state is the same
whether its sequence is left-padded, right-padded or alone. (Forward calls of HF models
without `position_ids` use 0..L-1 instead; parity tests pass these positions to HF.)
Packed rows (several documents in one row, `tljax.data.text.pack`) add `segment_ids`
(B, L): a query attends only to keys of its own segment, and positions restart at 0 at
each segment's first token, so every document's logits equal those it has alone.

KV cache (the flax examples' `decode=True` pattern). A model built with `decode=True`
keeps, in the 'cache' collection, per attention layer the keys and values of every slot
(`key`, `value`: (B, S, KV heads, head dim)) and at the top the write index (`index`) and
the mask of the filled slots (`mask`, (B, S)). `init_cache(model, batch, S)` makes an empty
cache; each `apply(..., mutable=['cache'])` writes its chunk of L tokens at slots
[index, index + L) and attends to every filled, unmasked slot up to its own. Positions
continue from the cached mask, so prefilling a padded prompt and then feeding one token
at a time gives the logits of recomputing the whole sequence (tests: <= 1e-4). Writing
past S is not checked under jit (XLA clamps the slice): size S for prompt + new tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tljax.models.bert import ACTIVATIONS as _BERT_ACTIVATIONS
from tljax.models.layers import matmul_dot_general
from tljax.models.model import Model

# HF `hidden_act` / `activation_function` names -> activation ('gelu' is exact erf,
# 'gelu_new' / 'gelu_pytorch_tanh' the tanh approximation).
ACTIVATIONS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    **_BERT_ACTIVATIONS, "silu": nn.silu, "swish": nn.silu}
NEG_INF = float(np.finfo(np.float32).min)


def wide(dtype: Any) -> Any:
    """The dtype of numerically sensitive steps (norms, softmax, RoPE angles, features,
    logits): float32, or float64 when computing in float64."""
    return jnp.promote_types(dtype, jnp.float32)


def activation(name: str) -> Callable[[jnp.ndarray], jnp.ndarray]:
    if name not in ACTIVATIONS:
        raise ValueError(f"Activation {name!r} is not supported; supported: "
                         f"{sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


def positions_from_mask(mask: jnp.ndarray, segment_ids: jnp.ndarray | None = None
                        ) -> jnp.ndarray:
    """(B, L) 0/1 mask -> positions max(cumsum(mask) - 1, 0) counting real tokens only.

    With `segment_ids` (packed rows) the count restarts where the segment id changes, so
    each packed document has the positions it would have alone.
    """
    mask = mask.astype(jnp.int32)
    counts = jnp.cumsum(mask, axis=-1)
    if segment_ids is None:
        return jnp.maximum(counts - 1, 0)
    previous = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    # Real tokens before each segment's start; counts only grow, so a running max carries
    # the latest start's value forward.
    before = jax.lax.cummax(jnp.where(segment_ids != previous, counts - mask, 0), axis=1)
    return jnp.maximum(counts - 1 - before, 0)


def last_token_index(mask: jnp.ndarray) -> jnp.ndarray:
    """(B,) index of each row's last real token (rows padded on either side)."""
    length = mask.shape[1]
    return length - 1 - jnp.argmax(mask[:, ::-1] > 0, axis=1)


def mask_and_positions(module: nn.Module, mask: jnp.ndarray, causal: bool, decode: bool,
                       segment_ids: jnp.ndarray | None = None
                       ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray | None]:
    """(allowed (B, 1, L, S) bool, positions (B, L), query slots (L,), cache index or None).

    Without a cache S = L. With `decode` (and a cache already made), the chunk's mask is
    written into the cached slot mask at the cache index, S is the cache length, and the
    positions and causal order continue from the cached slots; `module` owns the
    'cache' variables `index` and `mask`. At `init` the cache is created, sized by the
    input, and the call is an ordinary forward pass. `segment_ids` (B, L) (packed rows,
    no cache) further restrict attention to keys of the query's own segment.
    """
    batch, length = mask.shape
    mask = mask.astype(bool)
    if decode:
        ready = module.has_variable("cache", "index")
        index = module.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        slots = module.variable("cache", "mask", lambda: jnp.zeros((batch, length), bool))
        if ready:
            start = index.value
            full = jax.lax.dynamic_update_slice(slots.value, mask, (0, start))
            slots.value, index.value = full, start + length
            positions = jax.lax.dynamic_slice_in_dim(positions_from_mask(full), start, length,
                                                     axis=1)
            query_slots = start + jnp.arange(length)
            key_slots = jnp.arange(full.shape[1])
            allowed = full[:, None, None, :]
            if causal:
                allowed = allowed & (key_slots[None, :] <= query_slots[:, None])[None, None]
            return allowed, positions, query_slots, start
    allowed = mask[:, None, None, :]
    if causal:
        allowed = allowed & jnp.tril(jnp.ones((length, length), bool))[None, None]
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids, jnp.int32)
        allowed = allowed & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return allowed, positions_from_mask(mask, segment_ids), jnp.arange(length), None


def rope(x: jnp.ndarray, positions: jnp.ndarray, theta: float) -> jnp.ndarray:
    """Rotary position embedding (Su et al. 2021) in HF's rotate-half layout.

    x: (B, L, H, d), positions: (B, L). With inv_freq_i = theta^(-2i/d), i < d/2, and
    angles a = position * [inv_freq, inv_freq] (d values), returns
    x * cos(a) + rotate_half(x) * sin(a), rotate_half([x1, x2]) = [-x2, x1]: dimension i
    is paired with i + d/2 (not with its neighbour, as in the paper's interleaved form).
    Angles are computed in float32 whatever the dtype, as HF does.
    """
    dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = x[..., :dim // 2], x[..., dim // 2:]
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * scale, in float32 (Llama's RMSNorm and T5's LayerNorm,
    which subtracts no mean and has no bias). The result is cast to `dtype`."""

    epsilon: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x = x.astype(wide(x.dtype))
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.epsilon)
        return (x * scale.astype(x.dtype)).astype(self.dtype)


def norm_layer(kind: str, epsilon: float, dtype: Any, param_dtype: Any, name: str) -> nn.Module:
    """'layer': LayerNorm with scale and bias (GPT-2); 'rms': RMSNorm (Llama, T5)."""
    if kind == "layer":
        return nn.LayerNorm(epsilon, dtype=dtype, param_dtype=param_dtype, name=name)
    return RMSNorm(epsilon, dtype=dtype, param_dtype=param_dtype, name=name)


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads, optional RoPE, additive bias and cache.

    Params: q (D, H*d), k and v (D, KV*d), o (H*d, D), as `nn.Dense` kernels (+ biases with
    `use_bias`). Query head h reads key/value head h // (H / KV) (HF `repeat_kv`).
    scores = scale * q k^T (+ bias, e.g. T5's relative positions), masked, softmax in
    float32; scale defaults to d^-1/2 (T5 uses 1: its init absorbs it). `context` gives
    the keys/values of cross-attention (never cached: they are recomputed from the
    encoder states at each call). With `decode`, self-attention keys/values are written
    into the cache at `index` and read back for all S slots.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    use_bias: bool = False
    rope_theta: float | None = None
    scale: float | None = None
    dropout: float = 0.0
    decode: bool = False
    kernel_init: Callable = nn.initializers.normal(0.02)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, allowed: jnp.ndarray, positions: jnp.ndarray | None = None,
                 bias: jnp.ndarray | None = None, context: jnp.ndarray | None = None,
                 index: jnp.ndarray | None = None, train: bool = False) -> jnp.ndarray:
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        if heads % kv_heads:
            raise ValueError(f"num_heads={heads} is not a multiple of num_kv_heads={kv_heads}.")
        dense = functools.partial(nn.Dense, use_bias=self.use_bias, dtype=self.dtype,
                                  param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                                  dot_general=matmul_dot_general)
        batch, length, width = x.shape
        source = x if context is None else context
        q = dense(heads * dim, name="q")(x).reshape(batch, length, heads, dim)
        k = dense(kv_heads * dim, name="k")(source).reshape(batch, -1, kv_heads, dim)
        v = dense(kv_heads * dim, name="v")(source).reshape(batch, -1, kv_heads, dim)
        if self.rope_theta is not None:
            q, k = rope(q, positions, self.rope_theta), rope(k, positions, self.rope_theta)
        if self.decode and context is None:
            ready = self.has_variable("cache", "key")
            cached_k = self.variable("cache", "key", jnp.zeros, k.shape, k.dtype)
            cached_v = self.variable("cache", "value", jnp.zeros, v.shape, v.dtype)
            if ready:
                k = jax.lax.dynamic_update_slice(cached_k.value, k, (0, index, 0, 0))
                v = jax.lax.dynamic_update_slice(cached_v.value, v, (0, index, 0, 0))
                cached_k.value, cached_v.value = k, v

        groups = heads // kv_heads
        q = q.reshape(batch, length, kv_heads, groups, dim)
        # float32 scores even from bfloat16 q, k: T5's unscaled scores are large.
        scores = jnp.einsum("blkgd,bskd->bkgls", q, k.astype(q.dtype),
                            preferred_element_type=wide(self.dtype))
        scores = scores.reshape(batch, heads, length, k.shape[1])
        scores = scores * (dim**-0.5 if self.scale is None else self.scale)
        if bias is not None:
            scores = scores + bias.astype(scores.dtype)
        scores = jnp.where(allowed, scores, NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1)
        probs = nn.Dropout(self.dropout)(probs, deterministic=not train)
        probs = probs.astype(self.dtype).reshape(batch, kv_heads, groups, length, -1)
        y = jnp.einsum("bkgls,bskd->blkgd", probs, v.astype(self.dtype))
        return dense(width, name="o")(y.reshape(batch, length, heads * dim))


class Mlp(nn.Module):
    """Feed-forward block: down(act(up(x))), or gated down(act(gate(x)) * up(x)) (SwiGLU
    for Llama, gated-GELU for T5 v1.1). Params: up and gate (D, F), down (F, D).
    `dropout` acts on the hidden units (T5)."""

    intermediate_size: int
    activation: str
    gated: bool = False
    use_bias: bool = False
    dropout: float = 0.0
    kernel_init: Callable = nn.initializers.normal(0.02)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        dense = functools.partial(nn.Dense, use_bias=self.use_bias, dtype=self.dtype,
                                  param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                                  dot_general=matmul_dot_general)
        act = activation(self.activation)
        h = dense(self.intermediate_size, name="up")(x)
        if self.gated:
            h = act(dense(self.intermediate_size, name="gate")(x)) * h
        else:
            h = act(h)
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        return dense(x.shape[-1], name="down")(h)


class DecoderBlock(nn.Module):
    """Pre-norm causal decoder layer (GPT-2, Llama):

        x = x + dropout(attn(attn_norm(x)));  x = x + dropout(mlp(mlp_norm(x))).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    activation: str
    norm: str = "rms"  # 'layer' or 'rms'
    norm_eps: float = 1e-6
    gated: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    rope_theta: float | None = None
    dropout: float = 0.0
    attention_dropout: float = 0.0
    init_std: float = 0.02
    decode: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, allowed: jnp.ndarray, positions: jnp.ndarray,
                 index: jnp.ndarray | None, train: bool = False) -> jnp.ndarray:
        norm = functools.partial(norm_layer, self.norm, self.norm_eps, self.dtype,
                                 self.param_dtype)
        drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=not train)
        y = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.attention_bias,
                      self.rope_theta, None, self.attention_dropout, self.decode,
                      nn.initializers.normal(self.init_std), self.dtype, self.param_dtype,
                      name="attn")(norm("attn_norm")(x), allowed, positions, index=index,
                                   train=train)
        x = x + drop(y)
        y = Mlp(self.intermediate_size, self.activation, self.gated, self.mlp_bias, 0.0,
                nn.initializers.normal(self.init_std), self.dtype, self.param_dtype,
                name="mlp")(norm("mlp_norm")(x), train)
        return x + drop(y)


def block_class(cls: type[nn.Module], remat: bool, train_argnum: int) -> type[nn.Module]:
    """`cls`, or `nn.remat(cls)` (activations recomputed in the backward pass) with the
    boolean `train` argument (position `train_argnum`, `self` being 0) static."""
    return nn.remat(cls, static_argnums=(train_argnum,)) if remat else cls


# ---------------------------------------------------------------------------------------------
# LM head, logits, cache.


class LMHead(nn.Module):
    """Next-token logits from features (see the module docstring); float32 output.

    A task head like any other: `head(x, train=...)` with x = (features, embedding) (a
    `Model` with head_input ('features', 'embedding') passes that tuple; any leading shape,
    e.g. (B, L, D) or the (B, D) of 'last_token') or the features alone (untied only).
    Tied: logits = (scale * features) @ embedding^T with the backbone's table. Untied: its
    own `kernel` (D, V) (+ `bias`) directly under this module's name, `head`.
    """

    vocab_size: int
    tied: bool = True
    use_bias: bool = False
    scale: float = 1.0
    init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Any, train: bool = False) -> jnp.ndarray:
        del train  # no dropout at the output
        features, embedding = x if isinstance(x, (tuple, list)) else (x, None)
        x = features.astype(self.dtype)
        if self.scale != 1.0:
            x = x * jnp.asarray(self.scale, self.dtype)
        if self.tied:
            if embedding is None:
                raise ValueError("A tied LM head needs the embedding table (out['embedding']).")
            return jnp.einsum("...d,vd->...v", x, embedding.astype(self.dtype)).astype(
                wide(self.dtype))
        kernel = self.param("kernel", nn.initializers.normal(self.init_std),
                            (x.shape[-1], self.vocab_size), self.param_dtype)
        logits = x @ kernel.astype(self.dtype)
        if self.use_bias:
            logits = logits + self.param("bias", nn.initializers.zeros, (self.vocab_size,),
                                         self.param_dtype).astype(self.dtype)
        return logits.astype(wide(self.dtype))


HEAD_INPUT = ("features", "embedding")  # what an LM head reads from a backbone (Model)


def lm_head(model: nn.Module, dtype: Any = None) -> LMHead:
    """The LM head that belongs to backbone `model` (tied or not, T5's output scale,
    dtypes; `dtype` overrides the compute dtype)."""
    return LMHead(model.vocab_size, tied=model.tie_word_embeddings,
                  scale=getattr(model, "logit_scale", 1.0),
                  init_std=getattr(model, "initializer_range", 0.02),
                  dtype=model.dtype if dtype is None else dtype, param_dtype=model.param_dtype)


def with_lm_head(backbone: nn.Module) -> Model:
    """`Model(backbone, its LM head)`: `apply(variables, inputs)` gives next-token logits."""
    return Model(backbone=backbone, head=lm_head(backbone), head_input=HEAD_INPUT)


def _unwrap(model: Any) -> tuple[Any, Any]:
    """(model without a LoRA wrapper, the wrapper or None)."""
    from tljax.models import lora

    return (model.base, model) if isinstance(model, lora.LoRA) else (model, None)


def backbone_of(model: Any) -> nn.Module:
    """The bare LM backbone of a backbone, a `Model`, or either wrapped in LoRA."""
    model, _ = _unwrap(model)
    return model.backbone if isinstance(model, Model) else model


def head_of(model: Any) -> nn.Module:
    """The head that turns `model`'s features into logits: a `Model`'s own head, else the
    backbone's LM head."""
    model, _ = _unwrap(model)
    return model.head if isinstance(model, Model) else lm_head(model)


def decoding_parts(model: Any, **fields: Any) -> tuple[Any, nn.Module]:
    """(backbone with `fields` replaced, head) of any form `backbone_of` takes. A LoRA
    wrapper stays around the backbone, so its adapters apply: the backbone's parameter
    names are the same alone and inside a `Model` (which shares its scope)."""
    inner, wrapper = _unwrap(model)
    backbone = backbone_of(inner).clone(**fields) if fields else backbone_of(inner)
    if wrapper is not None:
        backbone = dataclasses.replace(wrapper, base=backbone)
    return backbone, head_of(inner)


def lm_logits(model: Any, variables: Mapping[str, Any], features: jnp.ndarray,
              out: Mapping[str, Any]) -> jnp.ndarray:
    """Next-token logits (..., V) float32 for `features` of `model` (see LMHead).

    `model` is a backbone or a `Model` (LoRA-wrapped or not); `variables` are the full
    model variables (an untied or task head reads params['head']).
    """
    head = head_of(model)
    params = variables["params"].get("head")
    head_variables = {"params": params} if params is not None else {}
    return head.apply(head_variables, (features, out.get("embedding")))


def example_inputs(model: nn.Module, batch_size: int = 1, length: int = 1
                   ) -> dict[str, jnp.ndarray]:
    """Zeros for every input the model reads (`model.inputs`), int32 (batch_size, length)."""
    return {k: jnp.zeros((batch_size, length), jnp.int32) for k in model.inputs}


def init(model: Any, rng: jax.Array, batch_size: int = 1, length: int = 1) -> dict[str, Any]:
    """Fresh variables of `model`: a `Model` as it is; a backbone plus, for an untied output,
    the LM head at params['head']."""
    variables = model.init(rng, example_inputs(model, batch_size, length))
    variables = {k: v for k, v in variables.items() if k != "cache"}
    if isinstance(model, Model):
        return variables
    head = lm_head(model)
    if not head.tied:
        width = model.hidden_size
        head_params = head.init(jax.random.fold_in(rng, 1), jnp.zeros((1, 1, width)))
        variables["params"] = {**variables["params"], "head": head_params["params"]}
    return variables


def abstract_variables(model: Any) -> dict[str, Any]:
    """Shapes (jax.ShapeDtypeStruct) of `init(model, ...)`, computing nothing."""
    return jax.eval_shape(lambda: init(model, jax.random.key(0)))


def init_cache(model: Any, batch_size: int, max_length: int) -> dict[str, Any]:
    """An empty 'cache' collection for the backbone of `model` with decode=True, holding
    `max_length` slots."""
    decoder = backbone_of(model).clone(decode=True)
    shapes = jax.eval_shape(lambda: decoder.init(
        jax.random.key(0), example_inputs(decoder, batch_size, max_length)))["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
