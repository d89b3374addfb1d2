"""BERT-family text encoder (BERT, MiniLM) with Hugging Face's parameter names.

Parameter tree ('/'-joined, `L` layers); every name is the HF `BertModel`
name with '.' -> '/', `layer.i` -> `layer_i`, `attention.self.` dropped, and
Flax leaf names (`kernel` = transposed torch `weight`, `scale`/`bias` for
LayerNorm, `embedding` for embedding tables):

    embeddings/{word,position,token_type}_embeddings/embedding   (N, D)
    embeddings/LayerNorm/{scale,bias}
    encoder/layer_i/attention/{query,key,value}/{kernel,bias}     (D, D)
    encoder/layer_i/attention/output/dense/{kernel,bias}           (D, D)
    encoder/layer_i/attention/output/LayerNorm/{scale,bias}
    encoder/layer_i/intermediate/dense/{kernel,bias}               (D, F)
    encoder/layer_i/output/dense/{kernel,bias}                     (F, D)
    encoder/layer_i/output/LayerNorm/{scale,bias}
    pooler/dense/{kernel,bias}          only with use_pooler=True  (D, D)

(a task's head is attached as `head/...` by `tljax.models.Model`).

`tljax.pretrained.bert` converts HF checkpoints to this tree and back.

Inputs are a dict `{'input_ids': (B, L) int, 'attention_mask': (B, L) int,
optional 'token_type_ids': (B, L) int}`; mask 1 = real token, 0 = padding.
`__call__` returns `(features, out)`: the pooled features (see `Bert`) and
`out = {'tokens': (B, L, D) last hidden states}`.

Speed and memory options (the function computed is the same): `attention` picks the
attention kernel ('xla', 'cudnn' or 'reference', see `tljax.models.attention`; attention
dropout in training needs the probabilities, so it runs the reference formula unless
`attention_dropout=0`), `remat` recomputes each layer's activations in the backward pass
(None, 'full', 'dots', 'dots_no_batch'; `tljax.models.layers.REMAT_POLICIES`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from tljax.models.attention import attention, check_implementation
from tljax.models.layers import matmul_dot_general, remat

VARIANTS = {  # name: (hidden_size, num_layers, num_heads, intermediate_size)
    "tiny": (128, 2, 2, 512),
    "mini": (256, 4, 4, 1024),
    "small": (512, 4, 8, 2048),
    "medium": (512, 8, 8, 2048),
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
    "minilm-l6": (384, 6, 12, 1536),  # all-MiniLM-L6-v2
    "minilm-l12": (384, 12, 12, 1536),
}

POOLINGS = ("cls", "mean", "none")

# HF `hidden_act` names -> activation. 'gelu' is the exact erf form (what BERT
# was trained with); jax's `nn.gelu` defaults to the tanh approximation.
ACTIVATIONS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
}


def decode_variant(variant: str) -> dict[str, Any]:
    """`'base'` -> hidden_size, num_layers, num_heads and intermediate_size keyword arguments."""
    if variant not in VARIANTS:
        raise ValueError(f"Unknown BERT variant {variant!r}; known: {', '.join(VARIANTS)}.")
    hidden, layers, heads, inter = VARIANTS[variant]
    return dict(hidden_size=hidden, num_layers=layers, num_heads=heads, intermediate_size=inter)


def _dense(features: int, dtype: Any, init_std: float, name: str) -> nn.Dense:
    # BERT initialises every linear layer N(0, initializer_range), biases zero.
    return nn.Dense(features, dtype=dtype, kernel_init=nn.initializers.normal(init_std),
                    dot_general=matmul_dot_general, name=name)


class Embeddings(nn.Module):
    """LayerNorm(word[ids] + position[0..L-1] + token_type[type_ids]), then dropout."""

    vocab_size: int
    hidden_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    dropout: float
    init_std: float
    dtype: Any

    @nn.compact
    def __call__(self, input_ids: jnp.ndarray, token_type_ids: jnp.ndarray,
                 train: bool) -> jnp.ndarray:
        length = input_ids.shape[1]
        if length > self.max_position_embeddings:
            raise ValueError(f"Sequence length {length} exceeds max_position_embeddings="
                             f"{self.max_position_embeddings}; truncate the inputs.")
        embed = lambda n, name: nn.Embed(n, self.hidden_size, dtype=self.dtype, name=name,
                                         embedding_init=nn.initializers.normal(self.init_std))
        x = embed(self.vocab_size, "word_embeddings")(input_ids)
        x = x + embed(self.type_vocab_size, "token_type_embeddings")(token_type_ids)
        x = x + embed(self.max_position_embeddings, "position_embeddings")(
            jnp.arange(length)[None])
        x = nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(x)
        return nn.Dropout(self.dropout)(x, deterministic=not train)


class AddNorm(nn.Module):
    """HF `BertSelfOutput` / `BertOutput`: LayerNorm(residual + dropout(dense(x))) (post-LN)."""

    hidden_size: int
    layer_norm_eps: float
    dropout: float
    init_std: float
    dtype: Any

    @nn.compact
    def __call__(self, x: jnp.ndarray, residual: jnp.ndarray, train: bool) -> jnp.ndarray:
        x = _dense(self.hidden_size, self.dtype, self.init_std, "dense")(x)
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        return nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(x + residual)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a key padding mask, followed by `AddNorm` ('output').

    softmax(q k^T / sqrt(d_head) + mask) v per head, where padded keys get zero weight
    (as HF); the logits and softmax are float32 even under a bfloat16 `dtype`. The kernel
    is `tljax.models.attention.attention` with `implementation`.
    """

    num_heads: int
    layer_norm_eps: float
    dropout: float
    attention_dropout: float
    init_std: float
    dtype: Any
    implementation: str = "xla"

    @nn.compact
    def __call__(self, x: jnp.ndarray, mask: jnp.ndarray, train: bool) -> jnp.ndarray:
        batch, length, hidden = x.shape
        if hidden % self.num_heads:
            raise ValueError(f"hidden_size {hidden} is not divisible by num_heads "
                             f"{self.num_heads}.")
        head_dim = hidden // self.num_heads
        split = lambda t: t.reshape(batch, length, self.num_heads, head_dim)
        q, k, v = (split(_dense(hidden, self.dtype, self.init_std, n)(x))
                   for n in ("query", "key", "value"))
        dropout = None
        if train and self.attention_dropout > 0:
            dropout = lambda probs: nn.Dropout(self.attention_dropout)(probs,
                                                                       deterministic=False)
        y = attention(q, k, v, mask, implementation=self.implementation, dropout=dropout)
        y = y.reshape(batch, length, hidden)
        return AddNorm(hidden, self.layer_norm_eps, self.dropout, self.init_std, self.dtype,
                       name="output")(y, x, train)


class Intermediate(nn.Module):
    """HF `BertIntermediate`: act(dense(x)), expanding to intermediate_size."""

    intermediate_size: int
    hidden_act: str
    init_std: float
    dtype: Any

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = _dense(self.intermediate_size, self.dtype, self.init_std, "dense")(x)
        return ACTIVATIONS[self.hidden_act](x)


class Layer(nn.Module):
    """One post-LN encoder layer: x = AddNorm(attn(x), x); x = AddNorm(mlp(x), x)."""

    num_heads: int
    intermediate_size: int
    hidden_act: str
    layer_norm_eps: float
    dropout: float
    attention_dropout: float
    init_std: float
    dtype: Any
    attention: str = "xla"

    @nn.compact
    def __call__(self, x: jnp.ndarray, mask: jnp.ndarray, train: bool) -> jnp.ndarray:
        x = SelfAttention(self.num_heads, self.layer_norm_eps, self.dropout,
                          self.attention_dropout, self.init_std, self.dtype, self.attention,
                          name="attention")(x, mask, train)
        y = Intermediate(self.intermediate_size, self.hidden_act, self.init_std, self.dtype,
                         name="intermediate")(x)
        return AddNorm(x.shape[-1], self.layer_norm_eps, self.dropout, self.init_std, self.dtype,
                       name="output")(y, x, train)


class Encoder(nn.Module):
    """`num_layers` stacked `Layer`s named layer_0 .. layer_{L-1} (no final LayerNorm)."""

    num_layers: int
    num_heads: int
    intermediate_size: int
    hidden_act: str
    layer_norm_eps: float
    dropout: float
    attention_dropout: float
    init_std: float
    dtype: Any
    attention: str = "xla"
    remat: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, mask: jnp.ndarray, train: bool) -> jnp.ndarray:
        layer = remat(Layer, self.remat, static_argnums=(3,))
        for i in range(self.num_layers):
            x = layer(self.num_heads, self.intermediate_size, self.hidden_act,
                      self.layer_norm_eps, self.dropout, self.attention_dropout,
                      self.init_std, self.dtype, self.attention,
                      name=f"layer_{i}")(x, mask, train)
        return x


class Pooler(nn.Module):
    """HF `BertPooler`: tanh(dense(h_cls)), trained by next-sentence prediction."""

    init_std: float
    dtype: Any

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = _dense(x.shape[-1], self.dtype, self.init_std, "dense")(x)
        return jnp.tanh(x).astype(jnp.float32)


class Bert(nn.Module):
    """BERT encoder + pooling: `__call__(inputs, train)` -> (features, {'tokens': ...}).

    pooling:
      'cls'  - the first token's hidden state h[:, 0]; with `use_pooler=True`
               BERT's pooler tanh(dense(h[:, 0])) (HF `pooler_output`).
      'mean' - masked mean sum_t m_t h_t / max(sum_t m_t, 1e-9) over real tokens
               (sentence-transformers), so padding never changes the result.
      'none' - the whole sequence (B, L, D) (HF `last_hidden_state`).
    `normalize=True` L2-normalises the pooled features, x / max(||x||, 1e-12)
    (sentence embeddings). Dropout (hidden states and attention probabilities)
    is active only with train=True and uses the 'dropout' rng. `dtype` is the
    compute dtype (e.g. bfloat16); params stay float32 and outputs are float32.
    """

    inputs: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask", "token_type_ids")

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1  # HF hidden_dropout_prob
    attention_dropout: float = 0.1  # HF attention_probs_dropout_prob
    initializer_range: float = 0.02
    pad_token_id: int = 0  # not used by the forward pass; kept for export to HF
    pooling: str = "cls"
    use_pooler: bool = False
    normalize: bool = False
    dtype: Any = jnp.float32
    attention: str = "xla"
    remat: str | None = None

    def blocks(self) -> list[str]:
        """Regexes of parameter paths from the input to the output, one per block group."""
        return (["^embeddings/"]
                + [f"^encoder/layer_{i}/" for i in range(self.num_layers)]
                + ["^pooler/"])

    def _check(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r}: expected one of {POOLINGS}.")
        if self.use_pooler and self.pooling != "cls":
            raise ValueError("use_pooler=True applies BERT's pooler to the [CLS] token: "
                             f"it needs pooling='cls', got {self.pooling!r}.")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r}: supported {sorted(ACTIVATIONS)}.")
        check_implementation(self.attention)

    @nn.compact
    def __call__(self, inputs: Mapping[str, jnp.ndarray], train: bool = False
                 ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
        self._check()
        if "input_ids" not in inputs:
            raise KeyError(f"BERT inputs need 'input_ids' (got keys {sorted(inputs)}).")
        ids = jnp.asarray(inputs["input_ids"], jnp.int32)
        mask = inputs.get("attention_mask")
        mask = jnp.ones_like(ids, bool) if mask is None else jnp.asarray(mask) > 0
        types = inputs.get("token_type_ids")
        types = jnp.zeros_like(ids) if types is None else jnp.asarray(types, jnp.int32)

        x = Embeddings(self.vocab_size, self.hidden_size, self.max_position_embeddings,
                       self.type_vocab_size, self.layer_norm_eps, self.dropout,
                       self.initializer_range, self.dtype, name="embeddings")(ids, types, train)
        x = Encoder(self.num_layers, self.num_heads, self.intermediate_size, self.hidden_act,
                    self.layer_norm_eps, self.dropout, self.attention_dropout,
                    self.initializer_range, self.dtype, self.attention, self.remat,
                    name="encoder")(x, mask, train)
        x = tokens = x.astype(jnp.float32)  # pooling and normalisation in float32

        if self.pooling == "cls":
            x = x[:, 0]
            if self.use_pooler:
                x = Pooler(self.initializer_range, self.dtype, name="pooler")(x)
        elif self.pooling == "mean":
            m = mask[..., None].astype(jnp.float32)
            x = jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
        if self.normalize:
            x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        return x, {"tokens": tokens}


def make(variant: str | None = None, **kwargs: Any) -> Bert:
    """A BERT from a variant name ('base', 'minilm-l6', ...) plus keyword overrides."""
    return Bert(**{**(decode_variant(variant) if variant else {}), **kwargs})
