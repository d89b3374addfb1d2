"""What one training step holds in memory: parameters, optimizer state and activations.

`step_memory(config, model, task, batch)` builds a run's first freeze phase exactly as the
trainer does (`freeze.Plan`, `frozen_dtype` storage, `train.Phases`) on shapes only
(`jax.eval_shape`: no weights are made or read), compiles its train step for `batch`
(arrays or `jax.ShapeDtypeStruct`s) and reports, in bytes:

  params        every parameter, as stored (float32, or bfloat16 where `frozen_dtype`
                narrows the frozen ones), split into trainable and frozen;
  opt_state     the optimizer state (frozen parameters hold none);
  activations   XLA's temporary buffers of the compiled step (`memory_analysis()`):
                activations kept for the backward pass and workspace; remat trades them
                for recomputation;
  flops         XLA's cost analysis of the step.

The numbers are the compiler's on the platform that compiles (CPU here); they are exact
for buffer sizes, independent of machine load, and close to what a GPU compile reports.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tljax import freeze, models, sharding, tree
from tljax.models import lora


def _bytes(shapes: Any) -> int:
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                   for x in jax.tree_util.tree_leaves(shapes)))


def abstract_params(config: Any, model: Any, sample: Any) -> Any:
    """Parameter shapes of `model` for `config` (LoRA adapters included), computing nothing."""
    base = model.base if isinstance(model, lora.LoRA) else model

    def init() -> dict:
        rng = jax.random.PRNGKey(0)
        variables = base.init({"params": rng, "dropout": rng}, sample, train=False)
        if freeze.lora_options(config):
            variables = model.add_adapters(variables, rng, sample, train=False)
        return variables

    return jax.eval_shape(init)["params"]


def step_memory(config: Any, model: Any, task: Any, batch: dict[str, Any],
                cached: dict[str, Any] | None = None) -> dict[str, Any]:
    """Bytes of parameters, optimizer state and activations of `config`'s train step (see
    the module docstring), for one batch shaped like `batch`. With `cached` (a batch of
    cached features and targets) the step is the head's alone (`config.cache_features`)."""
    from tljax import features, train

    shape = lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype)
    sample = models.inputs_of(model, jax.tree_util.tree_map(
        lambda x: jnp.zeros((1,) + np.shape(x)[1:], x.dtype), batch))
    batch = jax.tree_util.tree_map(shape, cached if cached is not None else batch)
    forward = features.head_forward(model) if cached is not None else train.model_forward(model)
    params = abstract_params(config, model, sample)
    plan = freeze.Plan(config, params, model.blocks())
    if config.get("frozen_dtype"):
        frozen = freeze.frozen_names(plan)
        narrow = jnp.dtype(config.frozen_dtype)
        params = tree.map_with_names(
            lambda n, x: jax.ShapeDtypeStruct(x.shape, narrow) if n in frozen else x, params)
        plan = freeze.Plan(config, params, model.blocks())
    mesh = sharding.make_mesh([("data", -1)])
    shardings = {"params": jax.tree_util.tree_map(lambda _: sharding.replicated(mesh), params)}
    phase = train.Phases(config, plan, forward, task.loss, mesh, shardings, total_steps=100,
                         warmup_steps=10).get(0)
    opt_state = jax.eval_shape(phase.tx.init, params)
    state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params, "model_state": {},
             "opt_state": opt_state, "rng": jax.eval_shape(lambda: jax.random.PRNGKey(0))}
    compiled = phase.step.lower(state, batch).compile()
    analysis = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    trainable = plan.trainable_names(0)
    flat = tree.flatten(params)
    return {
        "params": _bytes(params),
        "trainable_params": _bytes([x for n, x in flat.items() if n in trainable]),
        "frozen_params": _bytes([x for n, x in flat.items() if n not in trainable]),
        "num_params": int(sum(np.prod(x.shape) for x in flat.values())),
        "num_trainable": int(sum(np.prod(x.shape) for n, x in flat.items() if n in trainable)),
        "opt_state": _bytes(opt_state),
        "activations": int(analysis.temp_size_in_bytes) if analysis else None,
        "flops": float(cost.get("flops", 0.0)) if cost else None,
    }


def describe(memory: dict[str, Any]) -> str:
    """One line of `step_memory`'s result in MiB."""
    mib = lambda b: f"{b / 2**20:,.1f} MiB"
    return (f"params {mib(memory['params'])} (trainable {mib(memory['trainable_params'])}, "
            f"{memory['num_trainable']:,} of {memory['num_params']:,}), optimizer state "
            f"{mib(memory['opt_state'])}, activations {mib(memory['activations'] or 0)}, "
            f"{(memory['flops'] or 0) / 1e9:,.0f} GFLOPs per step")
