"""Parameter trees addressed by '/'-joined path names ('Transformer/encoderblock_0/...').

Freezing, learning-rate groups, sharding and checkpoint conversion all select
parameters by regexes over these names; this module is the one place that
turns trees into names and back.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_name(path: tuple) -> str:
    """A `jax.tree_util` key path as 'a/b/c'."""
    return "/".join(_key_name(k) for k in path)


def flatten(tree: Any) -> dict[str, Any]:
    """{'a/b/c': leaf} for every leaf of a nested mapping."""
    return {path_name(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `flatten` for nested dicts."""
    tree: dict[str, Any] = {}
    for name, leaf in flat.items():
        *parents, last = name.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = leaf
    return tree


def map_with_names(fn: Callable[[str, Any], Any], tree: Any) -> Any:
    """`tree_map` where `fn` also receives each leaf's path name."""
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_name(p), x), tree)


def first_match(name: str, patterns: Iterable[str]) -> int | None:
    """Index of the first regex in `patterns` that matches `name` (re.search), else None."""
    for i, pattern in enumerate(patterns):
        if re.search(pattern, name):
            return i
    return None
