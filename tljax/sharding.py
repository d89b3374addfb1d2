"""Device mesh and regex sharding rules over parameter names.

The batch is split over every mesh axis (data parallelism across the whole
mesh); parameters are replicated unless a rule says 'fsdp', which splits the
largest dimension divisible by the 'fsdp' axis over that axis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tljax import tree
from tljax.config import ConfigError


def make_mesh(axes: Sequence[tuple[str, int]], devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh from [(name, size), ...]; one size may be -1 (all remaining devices)."""
    devices = list(devices if devices is not None else jax.devices())
    names = [name for name, _ in axes]
    sizes = [int(size) for _, size in axes]
    if sizes.count(-1) > 1:
        raise ConfigError(f"config.mesh={list(axes)}: at most one axis may have size -1.")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ConfigError(f"config.mesh={list(axes)} needs {int(np.prod(sizes))} devices; "
                          f"{len(devices)} are available.")
    # Auto axes: the model code is written for GSPMD propagation, not explicit typing.
    return Mesh(np.asarray(devices).reshape(sizes), tuple(names),
                axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over all mesh axes."""
    return NamedSharding(mesh, PartitionSpec(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _fsdp_spec(shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    if "fsdp" not in mesh.shape:
        raise ConfigError("A 'fsdp' sharding rule needs an 'fsdp' mesh axis, e.g. "
                          "config.mesh=[('data', -1), ('fsdp', 2)].")
    size = mesh.shape["fsdp"]
    for dim in np.argsort(shape)[::-1]:  # largest dimension first
        if shape[dim] % size == 0 and shape[dim] >= size:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return PartitionSpec(*spec)
    return PartitionSpec()


def param_shardings(params: Any, mesh: Mesh, rules: Sequence[tuple[str, str]]) -> Any:
    """NamedShardings for `params` (arrays or ShapeDtypeStructs) from regex rules."""
    patterns = [pattern for pattern, _ in rules]

    def sharding(name: str, leaf: Any) -> NamedSharding:
        index = tree.first_match(name, patterns)
        kind = rules[index][1] if index is not None else "replicate"
        if kind == "replicate":
            return replicated(mesh)
        if kind == "fsdp":
            return NamedSharding(mesh, _fsdp_spec(tuple(leaf.shape), mesh))
        raise ConfigError(f"sharding rule ({patterns[index]!r}, {kind!r}): expected "
                          f"'replicate' or 'fsdp'.")

    return tree.map_with_names(sharding, params)


def like_params(state_shapes: Any, params: Any, shardings: Any, mesh: Mesh) -> Any:
    """Shardings for optimizer state: a leaf named '<...>/<param name>' with that
    parameter's shape is sharded like it; everything else (counts, scalars) is replicated."""
    by_name = {name: (leaf.shape, sharding) for (name, leaf), sharding in zip(
        tree.flatten(params).items(), tree.flatten(shardings).values(), strict=True)}

    def sharding(name: str, leaf: Any) -> NamedSharding:
        for suffix_start in range(name.count("/") + 1):
            suffix = name.split("/", suffix_start)[-1]
            if suffix in by_name and by_name[suffix][0] == leaf.shape:
                return by_name[suffix][1]
        return replicated(mesh)

    return tree.map_with_names(sharding, state_shapes)
