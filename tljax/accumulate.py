"""Gradient accumulation: one optimizer step over a batch computed in microbatches.

    grad_fn = accumulate.value_and_grad(loss_fn, accum_steps)
    (loss, model_state), grads = grad_fn(params, model_state, batch, rng)

with `loss_fn(params, model_state, batch, rng) -> (loss, new model_state)`. With A =
`accum_steps` > 1, the batch of B examples is cut into A microbatches of B/A, run one after
another inside the same compiled step (`lax.scan`), and

    loss = (1/A) sum_i loss_i,    grads = (1/A) sum_i grad loss_i,

accumulated in the parameters' dtype (float32). When the loss is a mean over examples (as the
classification losses are), that is the loss and gradient of the whole batch, so the run is
the B-example run up to the order of floating-point sums; peak activation memory is that of
B/A examples. A loss averaged over a varying number of items per microbatch (tokens with
ignored labels) weights the microbatches equally instead.

What does and does not change with A (`config.accum_steps`):
  * `input.batch_size` stays the batch of one optimizer step, so the learning rate, the
    schedule, the durations and the data order are those of the unaccumulated run: do not
    rescale the learning rate.
  * Microbatch i takes examples i, i + A, i + 2A, ... of the batch: each is spread over the
    devices exactly as the batch is, so every device does 1/A of its work per microbatch.
  * Dropout draws from fold_in(rng, i) per microbatch (different masks from A = 1; same
    distribution).
  * Mutable state (batch-norm statistics in training mode) passes from one microbatch to the
    next: batch statistics are computed over B/A examples, and the running averages are
    updated A times per step (momentum m per microbatch is m^A per step). Frozen statistics
    (`bn_update=False`, the fine-tuning default) are unaffected.
  * Accumulation lives inside one step: a checkpoint is always between optimizer steps, so a
    resumed run can never restart halfway through an accumulation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

LossFn = Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, Any]]


def microbatches(batch: dict, accum_steps: int) -> dict:
    """(B, ...) arrays -> (A, B/A, ...), microbatch i = examples i, i + A, ... (see above)."""

    def split(x: jax.Array) -> jax.Array:
        if x.shape[0] % accum_steps:
            raise ValueError(f"A batch of {x.shape[0]} examples cannot be split into "
                             f"accum_steps={accum_steps} equal microbatches.")
        x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree_util.tree_map(split, batch)


def value_and_grad(loss_fn: LossFn, accum_steps: int = 1
                   ) -> Callable[..., tuple[tuple[jax.Array, Any], Any]]:
    """`jax.value_and_grad(loss_fn, has_aux=True)`, over `accum_steps` microbatches."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum_steps < 1:
        raise ValueError(f"accum_steps={accum_steps}: expected a positive integer.")
    if accum_steps == 1:
        return grad_fn

    def accumulated(params: Any, model_state: Any, batch: dict, rng: jax.Array
                    ) -> tuple[tuple[jax.Array, Any], Any]:
        def body(carry: tuple, xs: tuple) -> tuple[tuple, None]:
            loss_sum, grad_sum, state = carry
            index, micro = xs
            (loss, state), grads = grad_fn(params, state, micro, jax.random.fold_in(rng, index))
            grad_sum = jax.tree_util.tree_map(lambda s, g: s + g.astype(s.dtype), grad_sum, grads)
            return (loss_sum + loss.astype(jnp.float32), grad_sum, state), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        init = (jnp.zeros((), jnp.float32), zeros, model_state)
        xs = (jnp.arange(accum_steps), microbatches(batch, accum_steps))
        (loss_sum, grad_sum, model_state), _ = jax.lax.scan(body, init, xs)
        grads = jax.tree_util.tree_map(lambda g: g / accum_steps, grad_sum)
        return (loss_sum / accum_steps, model_state), grads

    return accumulated
