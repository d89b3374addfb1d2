"""Vision Transformer (Dosovitskiy et al. 2021) with big_vision's parameter names.

The tree is `embedding`, `cls`, `pos_embedding`, `Transformer/encoderblock_{i}/
{LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0}`,
`Transformer/encoder_norm`, optional `MAPHead_0` and `pre_logits` (the task's head is
attached as `head` by `tljax.models.Model`), so a big_vision Linen checkpoint loads
without renaming. Attention kernels are (D, H, Dh) for query/key/value and (H, Dh, D) for out.

Speed and memory options, none of which changes the function computed:
  attention  'xla' | 'cudnn' | 'reference' (`tljax.models.attention`).
  remat      None | 'full' | 'dots' | 'dots_no_batch': recompute each encoder block's
             activations in the backward pass (`tljax.models.layers.REMAT_POLICIES`); the
             parameter names stay the same.
  scan       True: the encoder blocks are one `nn.scan` (compiled once, not `depth` times).
             The blocks' parameters are then stacked along a leading depth axis under
             `Transformer/encoderblock/...` (big_vision's scanned layout); `scan_params` and
             `unscan_params` convert between the two layouts, and pretrained checkpoints are
             converted on loading. Freeze presets and LLRD see the stack as one block group;
             LoRA adapters and the HF/timm export expect the unscanned layout.

Stochastic depth (Huang et al. 2016; `drop_path_rate` r): while training, each residual
branch (attention, MLP) of block i of D is dropped for a whole example with probability
r * i / (D - 1), the survivors scaled by 1 / (1 - rate), so the first block always runs and
the last is dropped most; evaluation computes every branch. It holds no parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from tljax import tree
from tljax.models.attention import MultiHeadDotProductAttention, check_implementation
from tljax.models.layers import matmul_dot_general, remat

VARIANTS = {  # name: (width, depth, mlp_dim, num_heads)
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
}


def decode_variant(variant: str) -> dict[str, Any]:
    """`'B/16'` -> width, depth, mlp_dim, num_heads and patch_size keyword arguments."""
    name, _, patch = variant.partition("/")
    if name not in VARIANTS or not patch.isdigit():
        raise ValueError(
            f"Unknown ViT variant {variant!r}: expected NAME/PATCH with NAME in "
            f"{sorted(VARIANTS)} and an integer patch size, e.g. 'B/16'."
        )
    width, depth, mlp_dim, num_heads = VARIANTS[name]
    return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads,
                patch_size=(int(patch), int(patch)))


def _gelu(approximate: bool):
    return lambda x: nn.gelu(x, approximate=approximate)


class MlpBlock(nn.Module):
    mlp_dim: int
    dropout: float = 0.0
    gelu_approximate: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        init = nn.initializers
        dense = lambda n: nn.Dense(n, dtype=self.dtype, kernel_init=init.xavier_uniform(),
                                   bias_init=init.normal(stddev=1e-6),
                                   dot_general=matmul_dot_general)
        width = x.shape[-1]
        x = _gelu(self.gelu_approximate)(dense(self.mlp_dim)(x))
        x = nn.Dropout(rate=self.dropout)(x, deterministic=not train)
        return dense(width)(x)


class Encoder1DBlock(nn.Module):
    mlp_dim: int
    num_heads: int
    dropout: float = 0.0
    layernorm_eps: float = 1e-6
    gelu_approximate: bool = True
    dtype: Any = jnp.float32
    attention: str = "xla"
    drop_path: float = 0.0  # probability of dropping each residual branch per example

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        # One draw per example (broadcast over tokens and channels) drops a whole branch.
        drop_path = lambda y: nn.Dropout(self.drop_path, broadcast_dims=(1, 2))(  # noqa: E731
            y, deterministic=not train)
        y = nn.LayerNorm(epsilon=self.layernorm_eps)(x)
        y = MultiHeadDotProductAttention(
            num_heads=self.num_heads, dtype=self.dtype, attention=self.attention,
            kernel_init=nn.initializers.xavier_uniform(),
            name="MultiHeadDotProductAttention_0")(y, y)
        x = x + drop_path(nn.Dropout(rate=self.dropout)(y, deterministic=not train))
        y = nn.LayerNorm(epsilon=self.layernorm_eps)(x)
        y = MlpBlock(self.mlp_dim, self.dropout, self.gelu_approximate, self.dtype)(y, train)
        return x + drop_path(nn.Dropout(rate=self.dropout)(y, deterministic=not train))


class Encoder(nn.Module):
    depth: int
    mlp_dim: int
    num_heads: int
    dropout: float = 0.0
    layernorm_eps: float = 1e-6
    gelu_approximate: bool = True
    dtype: Any = jnp.float32
    attention: str = "xla"
    remat: str | None = None
    scan: bool = False
    drop_path_rate: float = 0.0  # the last block's; block i of D gets rate * i / (D - 1)

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        block = remat(Encoder1DBlock, self.remat, static_argnums=(2,))
        args = (self.mlp_dim, self.num_heads, self.dropout, self.layernorm_eps,
                self.gelu_approximate, self.dtype, self.attention)
        if self.scan:
            if self.drop_path_rate:
                raise ValueError("drop_path_rate needs a rate per block, which scan=True cannot "
                                 "give its one repeated block: set scan=False.")
            # One block traced once and iterated; each parameter gains a leading depth axis.
            body = nn.scan(lambda module, carry: (module(carry, train), None),
                           variable_axes={"params": 0},
                           split_rngs={"params": True, "dropout": True}, length=self.depth)
            x, _ = body(block(*args, name="encoderblock"), x)
        else:
            for i in range(self.depth):
                rate = self.drop_path_rate * i / max(self.depth - 1, 1)
                x = block(*args, rate, name=f"encoderblock_{i}")(x, train)
        return nn.LayerNorm(epsilon=self.layernorm_eps, name="encoder_norm")(x)


class MAPHead(nn.Module):
    """Multihead attention pooling: one learned query attends over all tokens."""

    mlp_dim: int
    num_heads: int
    layernorm_eps: float = 1e-6
    gelu_approximate: bool = True
    dtype: Any = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, x.shape[-1]))
        probe = jnp.tile(probe, [x.shape[0], 1, 1]).astype(x.dtype)
        x = MultiHeadDotProductAttention(
            num_heads=self.num_heads, dtype=self.dtype, attention=self.attention,
            kernel_init=nn.initializers.xavier_uniform(),
            name="MultiHeadDotProductAttention_0")(probe, x)
        y = nn.LayerNorm(epsilon=self.layernorm_eps)(x)
        x = x + MlpBlock(self.mlp_dim, gelu_approximate=self.gelu_approximate, dtype=self.dtype)(y)
        return x[:, 0]


class ViT(nn.Module):
    """ViT backbone: `__call__(images, train)` -> (features, out).

    features: the pooled representation (after `pre_logits` when representation_size);
    out: 'tokens' (B, N, D) encoder output after the final norm (class token first with
    pool_type 'tok'), 'pre_logits' (the features).
    pool_type: 'tok' (class token), 'gap' (global average) or 'map' (attention pooling).
    """

    inputs: ClassVar[tuple[str, ...]] = ("image",)

    patch_size: Sequence[int] = (16, 16)
    width: int = 768
    depth: int = 12
    mlp_dim: int = 3072
    num_heads: int = 12
    pool_type: str = "tok"
    representation_size: int | None = None
    dropout: float = 0.0
    layernorm_eps: float = 1e-6
    gelu_approximate: bool = True
    dtype: Any = jnp.float32
    attention: str = "xla"
    remat: str | None = None
    scan: bool = False
    drop_path_rate: float = 0.0  # stochastic depth (see the module docstring)

    def blocks(self) -> list[str]:
        """Regexes of parameter paths from the input to the output, one per block group."""
        encoder = (["^Transformer/encoderblock/"] if self.scan else
                   [f"^Transformer/encoderblock_{i}/" for i in range(self.depth)])
        return (["^(embedding|cls|pos_embedding)(/|$)"] + encoder
                + ["^(Transformer/encoder_norm|MAPHead_0|pre_logits)/"])

    @nn.compact
    def __call__(self, images: jnp.ndarray, train: bool = False
                 ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
        if self.pool_type not in ("tok", "gap", "map"):
            raise ValueError(f"pool_type={self.pool_type!r}: expected 'tok', 'gap' or 'map'.")
        check_implementation(self.attention)
        x = nn.Conv(self.width, tuple(self.patch_size), strides=tuple(self.patch_size),
                    padding="VALID", dtype=self.dtype, name="embedding")(images)
        n, h, w, c = x.shape
        x = jnp.reshape(x, [n, h * w, c])
        x = x + self.param("pos_embedding", nn.initializers.normal(stddev=1 / np.sqrt(c)),
                           (1, h * w, c)).astype(x.dtype)
        if self.pool_type == "tok":
            cls = self.param("cls", nn.initializers.zeros, (1, 1, c)).astype(x.dtype)
            x = jnp.concatenate([jnp.tile(cls, [n, 1, 1]), x], axis=1)
        x = nn.Dropout(rate=self.dropout)(x, deterministic=not train)
        x = Encoder(self.depth, self.mlp_dim, self.num_heads, self.dropout, self.layernorm_eps,
                    self.gelu_approximate, self.dtype, self.attention, self.remat, self.scan,
                    self.drop_path_rate,
                    name="Transformer")(x, train)
        tokens = x
        if self.pool_type == "tok":
            x = x[:, 0]
        elif self.pool_type == "gap":
            x = jnp.mean(x, axis=1)
        else:
            x = MAPHead(self.mlp_dim, self.num_heads, self.layernorm_eps,
                        self.gelu_approximate, self.dtype, self.attention, name="MAPHead_0")(x)
        if self.representation_size:
            x = nn.tanh(nn.Dense(self.representation_size, dtype=self.dtype, name="pre_logits")(x))
        return x, {"tokens": tokens, "pre_logits": x}


def make(variant: str | None = None, **kwargs: Any) -> ViT:
    """A ViT from a variant name ('B/16') plus keyword overrides of any field."""
    return ViT(**{**(decode_variant(variant) if variant else {}), **kwargs})


SCANNED = "Transformer/encoderblock/"


def scan_params(params: dict[str, Any]) -> dict[str, Any]:
    """`Transformer/encoderblock_{i}/X` -> `Transformer/encoderblock/X` stacked on axis 0.

    Works on a params tree (or any collection with the same names, e.g. optimizer moments);
    the inverse of `unscan_params`.
    """
    flat = tree.flatten(params)
    blocks: dict[str, dict[int, Any]] = {}
    out = {}
    for name, value in flat.items():
        head, sep, rest = name.partition("Transformer/encoderblock_")
        if sep and not head:
            index, _, leaf = rest.partition("/")
            blocks.setdefault(leaf, {})[int(index)] = value
        else:
            out[name] = value
    for leaf, by_index in blocks.items():
        if sorted(by_index) != list(range(len(by_index))):
            raise ValueError(f"Encoder blocks {sorted(by_index)} of {leaf!r} are not 0..L-1.")
        out[SCANNED + leaf] = np.stack([np.asarray(by_index[i]) for i in range(len(by_index))])
    return tree.unflatten(out)


def unscan_params(params: dict[str, Any]) -> dict[str, Any]:
    """`Transformer/encoderblock/X` (leading depth axis) -> `Transformer/encoderblock_{i}/X`."""
    out = {}
    for name, value in tree.flatten(params).items():
        if name.startswith(SCANNED):
            for i in range(value.shape[0]):
                out[f"Transformer/encoderblock_{i}/{name[len(SCANNED):]}"] = value[i]
        else:
            out[name] = value
    return tree.unflatten(out)
