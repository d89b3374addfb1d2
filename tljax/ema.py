"""An exponential moving average of the weights (`config.ema_decay`), evaluated beside them.

With decay d (None: off) the train state carries `ema`, a copy of `params` updated after
every step t = 1, 2, ... (t counts updates, as the state's `step` after the update):

    ema_t = d_t * ema_{t-1} + (1 - d_t) * params_t,   d_t = min(d, (1 + t) / (10 + t)),
    ema_0 = params_0 (the pretrained or initial weights).

The warm-up of d_t (TensorFlow's `ExponentialMovingAverage(num_updates=t)`) keeps the
average of a short fine-tuning run from being dominated by the initial weights: with
d = 0.999 and 47 steps, a plain EMA would still be 95% the starting point. Frozen
parameters are constant, so their average is themselves; an average of constant weights
equals the weights exactly (d x + (1 - d) x, computed as x + (1 - d)(x - x)).

The average lives in the train state, so it is checkpointed with it, placed with the
parameters' shardings and restored exactly on resume. Model state (batch-norm statistics)
is shared: the average is evaluated with the running statistics of the raw weights.
Evaluation reports every metric twice, `accuracy` for the raw weights and `ema/accuracy`
for the average (`weights_to_evaluate`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PREFIX = "ema/"


def decay_at(decay: float, step: jnp.ndarray) -> jnp.ndarray:
    """d_t = min(d, (1 + t) / (10 + t)) after update t (see the module docstring)."""
    t = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1 + t) / (10 + t))


def update(average: Any, params: Any, decay: jnp.ndarray) -> Any:
    """ema + (1 - d)(params - ema), leaf by leaf, in each parameter's dtype."""
    return jax.tree_util.tree_map(
        lambda e, p: (e + (1 - decay) * (p.astype(e.dtype) - e)).astype(e.dtype),
        average, params)


def with_ema(train_step: Callable[[dict, dict], tuple[dict, dict]], decay: float | None
             ) -> Callable[[dict, dict], tuple[dict, dict]]:
    """`train_step` followed by the average's update (the step itself is unchanged)."""
    if decay is None:
        return train_step

    def step(state: dict, batch: dict) -> tuple[dict, dict]:
        new_state, metrics = train_step(state, batch)
        average = update(state["ema"], new_state["params"],
                         decay_at(decay, new_state["step"]))
        return {**new_state, "ema": average}, metrics

    return step


def init_state(state: dict, decay: float | None) -> dict:
    """A fresh train state with the average started at its parameters (when enabled)."""
    if decay is None:
        return state
    return {**state, "ema": jax.tree_util.tree_map(jnp.copy, state["params"])}


def shardings(state_shardings: dict, decay: float | None) -> dict:
    """The train state's shardings with the average placed like the parameters."""
    if decay is None:
        return state_shardings
    return {**state_shardings, "ema": state_shardings["params"]}


def weights_to_evaluate(state: dict) -> list[tuple[str, Any]]:
    """(metric prefix, params) pairs: the raw weights, then the average when there is one."""
    return [("", state["params"])] + ([(PREFIX, state["ema"])] if "ema" in state else [])
