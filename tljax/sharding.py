"""Device mesh and regex sharding rules over parameter names.

Mesh axes (`config.mesh`, e.g. [('data', 2), ('fsdp', 2), ('model', 2)]) are named; the rules
below know three names:
  data   data parallelism: each device along it sees other examples.
  fsdp   data parallelism whose parameters (and optimizer state) are split, not replicated.
  model  tensor parallelism: the devices along it see the *same* examples and each computes
         a slice of every layer (Megatron-style), so the batch is not split over 'model'.
The batch is split over every other axis of the mesh.

`config.sharding_rules` is a list of (regex, rule) over '/'-joined parameter names; the first
match wins and a parameter matching nothing is replicated. A rule is
  'replicate'   every device holds the whole parameter;
  'fsdp'        the largest dimension divisible by the 'fsdp' axis is split over it
                (replicated when none is);
  a tuple       a PartitionSpec: per dimension a mesh axis, a tuple of axes or None, e.g.
                ('fsdp', 'model', None). Axes the mesh lacks are dropped, so one list serves
                every mesh; a spec shorter than the parameter applies to its trailing
                dimensions (stacked blocks of a scanned model keep their depth axis whole);
                a dimension its axes do not divide is an error naming the parameter.

`tensor_parallel(family)` gives the Megatron rules of ViT and BERT: in each block the
query/key/value and first MLP kernels are split by output (column-parallel: over heads, over
the hidden units), the attention-out and second MLP kernels by input (row-parallel), so a
block needs one all-reduce after attention and one after the MLP; the other dimension of each
kernel is split over 'fsdp'. Add a catch-all for the remaining parameters, e.g.
`tensor_parallel('vit') + [('.*', 'fsdp')]`.
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


MODEL_AXIS = "model"


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes the batch is split over: all but the tensor-parallel 'model' axis."""
    return tuple(a for a in mesh.axis_names if a != MODEL_AXIS)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over `batch_axes(mesh)`, replicated along 'model'."""
    axes = batch_axes(mesh)
    return NamedSharding(mesh, PartitionSpec(axes if axes else None))


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


def _explicit_spec(name: str, shape: tuple[int, ...], rule: Sequence[Any], pattern: str,
                   mesh: Mesh) -> PartitionSpec:
    """A tuple rule -> PartitionSpec for one parameter (see the module docstring)."""
    rule = list(rule)
    if len(rule) > len(shape):
        raise ConfigError(f"sharding rule ({pattern!r}, {tuple(rule)}) has {len(rule)} entries; "
                          f"parameter {name} has shape {shape}.")
    spec: list[Any] = [None] * (len(shape) - len(rule))
    for dim, entry in zip(shape[len(spec):], rule, strict=True):
        axes = tuple(a for a in ((entry,) if isinstance(entry, str) else entry or ())
                     if a in mesh.shape)
        size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if dim % size:
            raise ConfigError(f"sharding rule ({pattern!r}, {tuple(rule)}): dimension {dim} of "
                              f"{name} {shape} is not divisible by mesh axes {axes} ({size} "
                              "devices); change the mesh or the rule.")
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def param_shardings(params: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
    """NamedShardings for `params` (arrays or ShapeDtypeStructs) from regex rules."""
    patterns = [pattern for pattern, _ in rules]

    def sharding(name: str, leaf: Any) -> NamedSharding:
        index = tree.first_match(name, patterns)
        kind = rules[index][1] if index is not None else "replicate"
        if kind == "replicate":
            return replicated(mesh)
        if kind == "fsdp":
            return NamedSharding(mesh, _fsdp_spec(tuple(leaf.shape), mesh))
        if isinstance(kind, (tuple, list)):
            return NamedSharding(mesh, _explicit_spec(name, tuple(leaf.shape), kind,
                                                      patterns[index], mesh))
        raise ConfigError(f"sharding rule ({patterns[index]!r}, {kind!r}): expected "
                          f"'replicate', 'fsdp' or a tuple of mesh axes per dimension.")

    return tree.map_with_names(sharding, params)


# Megatron-style tensor parallelism (see the module docstring). Kernel shapes: ViT query/key/
# value (D, H, Dh) and out (H, Dh, D), MLP (D, F) and (F, D); BERT (D, D), (D, F), (F, D).
TENSOR_PARALLEL = {
    "vit": [
        (r"MultiHeadDotProductAttention_0/(query|key|value)/kernel$", ("fsdp", "model", None)),
        (r"MultiHeadDotProductAttention_0/(query|key|value)/bias$", ("model", None)),
        (r"MultiHeadDotProductAttention_0/out/kernel$", ("model", None, "fsdp")),
        (r"MlpBlock_0/Dense_0/kernel$", ("fsdp", "model")),
        (r"MlpBlock_0/Dense_0/bias$", ("model",)),
        (r"MlpBlock_0/Dense_1/kernel$", ("model", "fsdp")),
    ],
    "bert": [
        (r"attention/(query|key|value)/kernel$", ("fsdp", "model")),
        (r"attention/(query|key|value)/bias$", ("model",)),
        (r"attention/output/dense/kernel$", ("model", "fsdp")),
        (r"intermediate/dense/kernel$", ("fsdp", "model")),
        (r"intermediate/dense/bias$", ("model",)),
        (r"layer_\d+/output/dense/kernel$", ("model", "fsdp")),
    ],
}


def tensor_parallel(family: str) -> list[tuple[str, tuple]]:
    """Megatron rules for model family `family` ('vit' or 'bert'); add a catch-all after."""
    if family not in TENSOR_PARALLEL:
        raise ConfigError(f"No tensor-parallel rules for model family {family!r}; known: "
                          f"{', '.join(TENSOR_PARALLEL)}. Write (regex, spec) rules instead.")
    return list(TENSOR_PARALLEL[family])


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
