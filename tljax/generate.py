"""Autoregressive generation with a KV cache: greedy, temperature and nucleus sampling.

`generate(model, variables, prompt_ids, prompt_mask, max_new_tokens, ...)` works for the
decoder-only families (GPT-2, Llama: the prompt is the start of the sequence) and for
T5 (the prompt is the encoder input; the decoder starts from `decoder_start_token_id`).
One jit-compiled function per (model, shapes, sampling settings) runs

  1. prefill: the padded prompt goes through the backbone with `decode=True` in one call,
     filling the cache (tljax.models.lm); the head's logits at each row's last real token
     give the first new token (rows may be padded on either side);
  2. a `lax.while_loop`: choose a token, write it, feed it back (one cache slot per step),
     until `max_new_tokens` or until every row has produced `eos_id`.

Choosing a token from logits z (float32): temperature 0 takes argmax z (first index on
ties); otherwise z / temperature is restricted to the nucleus (Holtzman et al. 2020): the
smallest set of most likely tokens whose probability reaches `top_p` (the most likely
token always stays), and a token is drawn from the renormalised distribution.
After a row emits `eos_id`, its remaining tokens are `eos_id`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tljax.models import lm


def nucleus_logits(logits: jnp.ndarray, top_p: float) -> jnp.ndarray:
    """`logits` (..., V) with every token outside the top-p nucleus set to -inf."""
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    keep_sorted = before < top_p
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
    return jnp.where(keep, logits, -jnp.inf)


def choose(logits: jnp.ndarray, rng: jax.Array, temperature: float, top_p: float
           ) -> jnp.ndarray:
    """Next tokens (B,) from logits (B, V): argmax at temperature 0, else a nucleus sample."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_p < 1.0:
        logits = nucleus_logits(logits, top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _is_encoder_decoder(model: nn.Module) -> bool:
    return "decoder_input_ids" in model.inputs


def decode(model: Any, variables: Any, prompt_ids: jnp.ndarray, prompt_mask: jnp.ndarray,
           rng: jax.Array, *, max_new_tokens: int, temperature: float = 0.0,
           top_p: float = 1.0, eos_id: int | None = None) -> jnp.ndarray:
    """New tokens (B, max_new_tokens), traceable: what `generate` jit-compiles, for callers
    already inside jit (a seq2seq task's evaluation). Arguments as for `generate`."""
    batch, length = prompt_ids.shape
    backbone, head = lm.decoding_parts(model)
    decoder, _ = lm.decoding_parts(model, decode=True)
    seq2seq = _is_encoder_decoder(lm.backbone_of(model))
    ones = jnp.ones((batch, 1), jnp.int32)
    head_params = variables["params"].get("head")
    head_variables = {"params": head_params} if head_params is not None else {}

    def logits_of(features: jnp.ndarray, out: dict) -> jnp.ndarray:
        return head.apply(head_variables, (features, out.get("embedding")))

    if seq2seq:  # the decoder holds [start, new tokens]; the encoder runs once
        encoder_inputs = {"input_ids": prompt_ids, "attention_mask": prompt_mask}
        encoded = backbone.apply(variables, encoder_inputs, method="encode")
        cache = lm.init_cache(model, batch, 1 + max_new_tokens)

        def step(cache, ids, mask):
            inputs = {**encoder_inputs, "decoder_input_ids": ids, "decoder_attention_mask": mask}
            (features, out), state = decoder.apply({**variables, "cache": cache}, inputs,
                                                   encoded=encoded, mutable=["cache"])
            return features, out, state["cache"]

        start_id = lm.backbone_of(model).decoder_start_token_id
        start = jnp.full((batch, 1), start_id, jnp.int32)
        features, out, cache = step(cache, start, ones)
        last = features[:, -1]
    else:
        cache = lm.init_cache(model, batch, length + max_new_tokens)

        def step(cache, ids, mask):
            (features, out), state = decoder.apply(
                {**variables, "cache": cache}, {"input_ids": ids, "attention_mask": mask},
                mutable=["cache"])
            return features, out, state["cache"]

        features, out, cache = step(cache, prompt_ids, prompt_mask)
        # The last real token of each row (the prompt may be padded on either side).
        last = features[jnp.arange(batch), lm.last_token_index(prompt_mask)]
    logits = logits_of(last, out)

    fill = 0 if eos_id is None else eos_id
    tokens = jnp.full((batch, max_new_tokens), fill, jnp.int32)
    done = jnp.zeros((batch,), bool)

    def cond(state):
        i, _, _, _, _, done = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, tokens, cache, logits, rng, done = state
        rng, key = jax.random.split(rng)
        token = choose(logits, key, temperature, top_p)
        if eos_id is not None:
            token = jnp.where(done, eos_id, token)
            done = done | (token == eos_id)
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, i))
        features, out, cache = step(cache, token[:, None], ones)
        logits = logits_of(features[:, -1], out)
        return i + 1, tokens, cache, logits, rng, done

    state = (jnp.zeros((), jnp.int32), tokens, cache, logits, rng, done)
    return jax.lax.while_loop(cond, body, state)[1]


_generate = jax.jit(decode, static_argnames=("model", "max_new_tokens", "temperature", "top_p",
                                             "eos_id"))


def generate(model: nn.Module, variables: Any, prompt_ids: Any, prompt_mask: Any = None,
             max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
             rng: jax.Array | None = None, eos_id: int | None = None) -> np.ndarray:
    """New tokens (B, max_new_tokens) int32 after `prompt_ids` (B, L).

    `model`: a GPT-2 / Llama / T5 backbone (built with decode=False) or a `Model` with an LM
    head (what `load_pretrained` gives and `causal_lm` trains), either possibly wrapped in
    LoRA; `variables`: its variables, with any untied LM head at params['head'].
    `prompt_mask` (B, L): 1 for real tokens (default all ones). temperature 0 is greedy;
    otherwise `rng` (default PRNGKey(0)) drives sampling from the top-p nucleus. With
    `eos_id`, rows stop at it (padded with it) and the loop ends when all rows have.
    """
    if temperature < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"Need temperature >= 0 and 0 < top_p <= 1 (got {temperature}, "
                         f"{top_p}).")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    if prompt_ids.ndim != 2:
        raise ValueError(f"prompt_ids must be (batch, length), got shape {prompt_ids.shape}.")
    mask = jnp.ones_like(prompt_ids) if prompt_mask is None else jnp.asarray(prompt_mask,
                                                                               jnp.int32)
    if not bool(jnp.all(mask.sum(axis=1) > 0)):
        raise ValueError("Every prompt needs at least one real token (prompt_mask row of zeros).")
    rng = jax.random.PRNGKey(0) if rng is None else rng
    tokens = _generate(model, variables, prompt_ids, mask, rng, max_new_tokens=max_new_tokens,
                       temperature=float(temperature), top_p=float(top_p), eos_id=eos_id)
    return np.asarray(tokens)
