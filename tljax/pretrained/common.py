"""Helpers shared by the converters: PyTorch -> Flax layouts and strict key bookkeeping."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from tljax import tree

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def linear(w: np.ndarray) -> np.ndarray:
    """torch Linear weight (out, in) -> Flax Dense kernel (in, out)."""
    return np.ascontiguousarray(np.asarray(w).T)


def conv(w: np.ndarray) -> np.ndarray:
    """torch Conv2d weight (O, I, H, W) -> Flax Conv kernel (H, W, I, O)."""
    return np.ascontiguousarray(np.asarray(w).transpose(2, 3, 1, 0))


def conv_to_torch(k: np.ndarray) -> np.ndarray:
    """Flax Conv kernel (H, W, I, O) -> torch Conv2d weight (O, I, H, W)."""
    return np.ascontiguousarray(np.asarray(k).transpose(3, 2, 0, 1))


class SourceWeights:
    """A flat source checkpoint that records which names a converter has read.

    `check_all_used()` then turns "half the checkpoint silently didn't load"
    into an error listing every name the converter did not consume.
    """

    def __init__(self, weights: Mapping[str, np.ndarray], description: str):
        self.weights = dict(weights)
        self.description = description
        self.used: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self.weights

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.weights:
            raise KeyError(f"{self.description} has no tensor {name!r}; it has e.g. "
                           f"{sorted(self.weights)[:8]}. Is this the right source type?")
        self.used.add(name)
        return np.asarray(self.weights[name])

    def names(self) -> list[str]:
        return list(self.weights)

    def check_all_used(self, ignore: Iterable[str] = ()) -> None:
        ignore = list(ignore)
        unused = sorted(n for n in self.weights
                        if n not in self.used and tree.first_match(n, ignore) is None)
        if unused:
            raise ValueError(f"{self.description}: {len(unused)} tensors have no place in the "
                             f"converted model: {unused[:20]}{' ...' if len(unused) > 20 else ''}")


def batch_norm(src: SourceWeights, prefix: str, target: str, out: dict[str, Any]) -> None:
    """torch BatchNorm `prefix.{weight,bias,running_mean,running_var}` -> Flax BatchNorm.

    Writes `params/target/{scale,bias}` and `batch_stats/target/{mean,var}`;
    `num_batches_tracked` is consumed and dropped.
    """
    out[f"params/{target}/scale"] = src[f"{prefix}.weight"]
    out[f"params/{target}/bias"] = src[f"{prefix}.bias"]
    out[f"batch_stats/{target}/mean"] = src[f"{prefix}.running_mean"]
    out[f"batch_stats/{target}/var"] = src[f"{prefix}.running_var"]
    if f"{prefix}.num_batches_tracked" in src:
        src[f"{prefix}.num_batches_tracked"]


def dense(src: SourceWeights, prefix: str, target: str, out: dict[str, Any]) -> None:
    """torch Linear `prefix.{weight,bias}` -> `params/target/{kernel,bias}`."""
    out[f"params/{target}/kernel"] = linear(src[f"{prefix}.weight"])
    out[f"params/{target}/bias"] = src[f"{prefix}.bias"]


def indices(names: Iterable[str], pattern: str) -> list[int]:
    """Sorted distinct integers captured by `pattern`'s first group over `names`."""
    found = {int(m.group(1)) for n in names if (m := re.match(pattern, n))}
    return sorted(found)
