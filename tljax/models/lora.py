"""LoRA (Hu et al. 2022): low-rank adapters on the Dense and convolution kernels of any
Flax Linen model.

For a target kernel W, flattened to (d_in, d_out), the adapted layer computes

    y = x W + b + (alpha / r) (x A) B,    A: (d_in, r),  B: (r, d_out),

with A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) and B = 0, so at initialisation the model is
exactly the base model. Convolutions are linear in their kernel, so the same update
W' = W + (alpha / r) reshape(A B) is a convolution added to the layer's output:
  * `nn.Conv` (kh x kw, Cin -> Cout): d_in = kh kw Cin, d_out = Cout, computed factorised
    as conv(x, A as a kh x kw x Cin x r kernel) B - r channels instead of Cout;
  * depthwise (`tljax.models.layers.DepthwiseConv`, kernel k x k x 1 x C) and grouped
    convolutions: d_in = k k (per group), d_out = C; the rank-r kernel A B is formed and
    convolved (it is no larger than the layer's own).
The base model is not modified: `LoRA.apply` intercepts the `__call__` of every targeted
`nn.Dense` / `nn.DenseGeneral` / `nn.Conv` / `DepthwiseConv` (`nn.intercept_methods`)
and adds the low-rank term. Adapters live in their own subtree of `params`,

    params['lora'][<module path>]['lora_a' | 'lora_b']
    e.g. 'lora/Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/lora_a',

next to the untouched base parameters (the `lora(...)` freeze preset trains `^lora/`
and the head, and freezes every base kernel). `merge` folds the adapters into the base
kernels, W' = W + (alpha / r) A B (in the wider of the kernel's and the adapters'
dtypes), and returns the variables of the plain model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tljax import tree

# Attention q/k/v/out and the MLP of ViT (big_vision names), BERT (HF names) and the
# language models (GPT-2, Llama, T5: attn or cross_attn q/k/v/o, mlp gate/up/down); the
# convolutions inside the blocks of the CNNs (EfficientNet's expand, depthwise and project
# convolutions; ResNet's and BiT's conv1..3).
DEFAULT_TARGETS = (
    r"/(MultiHeadDotProductAttention_\d+|attention)/(query|key|value|out|output/dense)/kernel$",
    r"/(MlpBlock_\d+/Dense_\d+|intermediate/dense|layer_\d+/output/dense)/kernel$",
    r"(^|/)(cross_)?attn/(q|k|v|o)/kernel$",
    r"(^|/)mlp/(gate|up|down)/kernel$",
    r"^block\d+/(expand|depthwise|project)_conv/kernel$",
    r"^(layer\d+_\d+|stage\d+_block\d+)/conv\d/kernel$",
)
COLLECTION = "lora"


def _input_axes(module: nn.Module, ndim: int) -> int:
    """How many trailing input axes `module` contracts (DenseGeneral may contract several)."""
    if isinstance(module, nn.DenseGeneral):
        axes = module.axis if isinstance(module.axis, Sequence) else (module.axis,)
        axes = sorted(a % ndim for a in axes)
        if axes != list(range(ndim - len(axes), ndim)) or module.batch_dims:
            raise ValueError(f"LoRA supports DenseGeneral contracting trailing axes only; "
                             f"{'/'.join(module.path)} has axis={module.axis}.")
        return len(axes)
    return 1


def _conv_like(module: nn.Module) -> bool:
    from tljax.models.layers import DepthwiseConv

    return isinstance(module, (nn.Conv, DepthwiseConv))


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Dense, nn.DenseGeneral)) or _conv_like(module)


def conv_delta(module: nn.Module, x: jnp.ndarray, a: jnp.ndarray, b: jnp.ndarray,
               kernel_shape: tuple, scale: float) -> jnp.ndarray:
    """The output of convolution `module` with kernel scale * reshape(A B) (see the module
    docstring), through the module's own padding and striding (an unbound clone)."""
    rank = a.shape[-1]
    if isinstance(module, nn.Conv) and module.feature_group_count == 1:
        low = module.clone(parent=None, features=rank, use_bias=False)
        y = low.apply({"params": {"kernel": a.reshape(*kernel_shape[:-1], rank)}}, x)
        return (y @ b.astype(y.dtype)) * jnp.asarray(scale, y.dtype)
    delta = (scale * (a.astype(jnp.float32) @ b.astype(jnp.float32))).reshape(kernel_shape)
    updates = {"use_bias": False} if isinstance(module, nn.Conv) else {}
    return module.clone(parent=None, **updates).apply({"params": {"kernel": delta}}, x)


def lora_delta(x: jnp.ndarray, a: jnp.ndarray, b: jnp.ndarray, n_in: int, out_shape: tuple,
               scale: float) -> jnp.ndarray:
    """scale * (x A) B, with x's last `n_in` axes flattened and the output unflattened."""
    x = x.reshape(x.shape[:x.ndim - n_in] + (-1,))
    y = (x @ a.astype(x.dtype)) @ b.astype(x.dtype) * jnp.asarray(scale, x.dtype)
    return y.reshape(x.shape[:-1] + tuple(out_shape))


@dataclasses.dataclass(frozen=True)
class LoRA:
    """`base` with adapters of rank `rank` on the kernels matching `targets` (regexes).

    Mirrors the `nn.Module` calls the trainer uses: `init`, `apply`, `blocks()`;
    other attributes (e.g. `dtype`) are the base model's.
    """

    base: nn.Module
    rank: int = 8
    alpha: float = 16.0
    targets: Sequence[str] | None = None

    def __post_init__(self) -> None:
        # Hashable (jit's static arguments): a config's list of targets becomes a tuple.
        if self.targets is not None:
            object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)

    def blocks(self) -> list[str]:
        return self.base.blocks()

    def _adaptable_modules(self, variables: Any, *args: Any, **kwargs: Any) -> dict[str, int]:
        """{module path: number of kernel axes flattened into d_in} of every Dense and
        convolution the model calls (all but the output axis for a convolution)."""
        found: dict[str, int] = {}

        def record(next_fun, call_args, call_kwargs, context):
            module = context.module
            if context.method_name == "__call__" and _adaptable(module):
                path = "/".join(module.path)
                if _conv_like(module):
                    found[path] = -1  # resolved against the kernel's rank below
                else:
                    found[path] = _input_axes(module, np.ndim(call_args[0]))
            return next_fun(*call_args, **call_kwargs)

        with nn.intercept_methods(record):
            jax.eval_shape(lambda v: self.base.apply(v, *args, **kwargs), variables)
        return found

    def add_adapters(self, variables: Any, rng: jax.Array, *args: Any, **kwargs: Any) -> dict:
        """`variables` of the base model plus fresh adapters (B = 0) under params['lora'].

        `args`/`kwargs` are a sample call (e.g. a batch of inputs): they show which kernels
        belong to Dense and convolution layers.
        """
        targets = list(self.targets or DEFAULT_TARGETS)
        params = variables["params"]
        adaptable = self._adaptable_modules(variables, *args, **kwargs)
        kernels = {n: x for n, x in tree.flatten(params).items()
                   if tree.first_match(n, targets) is not None}
        if not kernels:
            raise ValueError(f"LoRA targets {targets} match no parameter.")
        other = [n for n in kernels if not n.endswith("/kernel")
                 or n[:-len("/kernel")] not in adaptable]
        if other:
            raise ValueError(f"LoRA targets must select Dense, DenseGeneral, Conv or "
                             f"DepthwiseConv kernels; these are not: {', '.join(other[:5])}.")
        adapters = {}
        for i, (name, kernel) in enumerate(sorted(kernels.items())):
            path = name[:-len("/kernel")]
            n_in = adaptable[path] if adaptable[path] >= 0 else kernel.ndim - 1
            d_in = int(np.prod(kernel.shape[:n_in]))
            d_out = int(np.prod(kernel.shape[n_in:]))
            bound = 1.0 / np.sqrt(d_in)
            adapters[f"{path}/lora_a"] = jax.random.uniform(
                jax.random.fold_in(rng, i), (d_in, self.rank), kernel.dtype, -bound, bound)
            adapters[f"{path}/lora_b"] = jnp.zeros((self.rank, d_out), kernel.dtype)
        return {**variables, "params": {**params, COLLECTION: tree.unflatten(adapters)}}

    def init(self, rngs: Any, *args: Any, **kwargs: Any) -> dict:
        variables = self.base.init(rngs, *args, **kwargs)
        rng = rngs["params"] if isinstance(rngs, dict) else rngs
        kwargs.pop("mutable", None)
        return self.add_adapters(variables, jax.random.fold_in(rng, 1), *args, **kwargs)

    def apply(self, variables: Any, *args: Any, **kwargs: Any) -> Any:
        """The base model's `apply`, each targeted Dense adding (alpha/r) (x A) B."""
        params = dict(variables["params"])
        adapters = tree.flatten(params.pop(COLLECTION, {}))
        by_module: dict[str, dict[str, Any]] = {}
        for name, leaf in adapters.items():
            path, _, kind = name.rpartition("/")
            by_module.setdefault(path, {})[kind] = leaf

        def add_low_rank(next_fun, call_args, call_kwargs, context):
            y = next_fun(*call_args, **call_kwargs)
            module = context.module
            if context.method_name != "__call__" or not _adaptable(module):
                return y
            pair = by_module.get("/".join(module.path))
            if pair is None:
                return y
            x = call_args[0]
            if _conv_like(module):
                shape = module.variables["params"]["kernel"].shape
                delta = conv_delta(module, x, pair["lora_a"], pair["lora_b"], shape, self.scale)
                return y + delta.astype(y.dtype)
            n_in = _input_axes(module, x.ndim)
            out_shape = y.shape[x.ndim - n_in:]
            delta = lora_delta(x, pair["lora_a"], pair["lora_b"], n_in, out_shape, self.scale)
            return y + delta.astype(y.dtype)

        with nn.intercept_methods(add_low_rank):
            return self.base.apply({**variables, "params": params}, *args, **kwargs)

    def merge(self, variables: Any) -> dict:
        """Variables of the plain base model: W' = W + (alpha / r) A B for every adapter."""
        return merge(variables, self.alpha)


def merge(variables: Any, alpha: float) -> dict:
    """Folds params['lora'] into the base kernels; the rank is read from the adapters."""
    params = dict(variables["params"])
    adapters = tree.flatten(params.pop(COLLECTION, {}))
    flat = tree.flatten(params)
    for name in adapters:
        if not name.endswith("/lora_a"):
            continue
        path = name[:-len("/lora_a")]
        a, b = adapters[name], adapters[f"{path}/lora_b"]
        kernel = flat[f"{path}/kernel"]
        delta = (alpha / a.shape[1]) * (jnp.asarray(a, jnp.float32) @ jnp.asarray(b, jnp.float32))
        # A base stored narrower than its adapters (frozen_dtype='bfloat16') merges into the
        # adapters' dtype: rounding W + delta to bfloat16 would lose most of a small delta.
        dtype = jnp.promote_types(jnp.asarray(kernel).dtype, jnp.asarray(a).dtype)
        flat[f"{path}/kernel"] = (jnp.asarray(kernel, jnp.float32)
                                  + delta.reshape(kernel.shape)).astype(dtype)
    return {**variables, "params": tree.unflatten(flat)}


def count_adapters(params: Any) -> tuple[int, int]:
    """(number of adapted kernels, number of adapter parameters) in `params`."""
    flat = tree.flatten(params.get(COLLECTION, {}) if hasattr(params, "get") else {})
    return (sum(n.endswith("/lora_a") for n in flat),
            sum(int(np.prod(np.shape(x))) for x in flat.values()))
