"""LoRA (Hu et al. 2022): low-rank adapters on the Dense kernels of any Flax Linen model.

For a target kernel W, flattened to (d_in, d_out), the adapted layer computes

    y = x W + b + (alpha / r) (x A) B,    A: (d_in, r),  B: (r, d_out),

with A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) and B = 0, so at initialisation the model is
exactly the base model. The base model is not modified: `LoRA.apply` intercepts the
`__call__` of every targeted `nn.Dense` / `nn.DenseGeneral` (`nn.intercept_methods`)
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
# language models (GPT-2, Llama, T5: attn or cross_attn q/k/v/o, mlp gate/up/down).
DEFAULT_TARGETS = (
    r"/(MultiHeadDotProductAttention_\d+|attention)/(query|key|value|out|output/dense)/kernel$",
    r"/(MlpBlock_\d+/Dense_\d+|intermediate/dense|layer_\d+/output/dense)/kernel$",
    r"(^|/)(cross_)?attn/(q|k|v|o)/kernel$",
    r"(^|/)mlp/(gate|up|down)/kernel$",
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

    def _dense_modules(self, variables: Any, *args: Any, **kwargs: Any) -> dict[str, int]:
        """{module path: number of contracted input axes} of every Dense the model calls."""
        found: dict[str, int] = {}

        def record(next_fun, call_args, call_kwargs, context):
            module = context.module
            if context.method_name == "__call__" and isinstance(module,
                                                                (nn.Dense, nn.DenseGeneral)):
                found["/".join(module.path)] = _input_axes(module, np.ndim(call_args[0]))
            return next_fun(*call_args, **call_kwargs)

        with nn.intercept_methods(record):
            jax.eval_shape(lambda v: self.base.apply(v, *args, **kwargs), variables)
        return found

    def add_adapters(self, variables: Any, rng: jax.Array, *args: Any, **kwargs: Any) -> dict:
        """`variables` of the base model plus fresh adapters (B = 0) under params['lora'].

        `args`/`kwargs` are a sample call (e.g. a batch of inputs): they show which kernels
        belong to Dense layers.
        """
        targets = list(self.targets or DEFAULT_TARGETS)
        params = variables["params"]
        dense = self._dense_modules(variables, *args, **kwargs)
        kernels = {n: x for n, x in tree.flatten(params).items()
                   if tree.first_match(n, targets) is not None}
        if not kernels:
            raise ValueError(f"LoRA targets {targets} match no parameter.")
        not_dense = [n for n in kernels if not n.endswith("/kernel")
                     or n[:-len("/kernel")] not in dense]
        if not_dense:
            raise ValueError(f"LoRA targets must select Dense/DenseGeneral kernels; these are "
                             f"not: {', '.join(not_dense[:5])}.")
        adapters = {}
        for i, (name, kernel) in enumerate(sorted(kernels.items())):
            path = name[:-len("/kernel")]
            n_in = dense[path]
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
            if context.method_name != "__call__" or not isinstance(
                    module, (nn.Dense, nn.DenseGeneral)):
                return y
            pair = by_module.get("/".join(module.path))
            if pair is None:
                return y
            x = call_args[0]
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
