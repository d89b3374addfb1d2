"""Causal language modelling: next-token prediction with a decoder LM (GPT-2, Llama).

Batches come from the `tokenize_lm` pp op (tljax.data.lm_text): `input_ids`,
`attention_mask` (B, L) and `loss_mask`, 1 on the tokens the loss predicts (the text and
its eos, not the bos or a prompt); `pack` adds `segment_ids`. The head is the backbone's
own LM head (tied to the embedding, or its untied `head/kernel`), attached like any task
head; it reads ('features', 'embedding').

Loss. Position t predicts token t + 1, weighted by

    w_t = loss_mask[t+1] * attention_mask[t+1] * [segment[t+1] == segment[t]]

(no loss on prompts or padding, none across a packed document boundary); the loss is
sum_t w_t * -log p(x_{t+1} | x_<=t) / sum_t w_t over the batch (a mean over predicted
tokens, not over rows).

Metrics over the whole eval split (tokens of padding examples excluded): `loss` (mean
next-token negative log-likelihood over every predicted token of the split),
`perplexity` = exp(loss) (the main metric; lower is better), `token_accuracy`
(argmax = next token), `tokens` and `examples`.

Prediction (tools/predict.py) continues a prompt: `parse_input` makes the text a
generation prompt for tokenize_lm, the tool decodes (greedy, temperature, top-p) and
`describe` shows the continuation, cut at `eos`, with newlines as '\\n'.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tljax.data import DatasetInfo
from tljax.errors import InputError
from tljax.models import lm
from tljax.tasks.base import Batch, Metrics, Task, eval_mask, register


def next_token_nll(logits: jnp.ndarray, batch: Batch, loss_mask_key: str = "loss_mask"
                   ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """(negative log-likelihoods, weights w_t, correct argmax) of the next tokens, (B, L-1)."""
    ids = batch["input_ids"]
    targets = ids[:, 1:]
    weights = batch.get("attention_mask", jnp.ones_like(ids))[:, 1:].astype(jnp.float32)
    if loss_mask_key in batch:
        weights = weights * batch[loss_mask_key][:, 1:]
    if "segment_ids" in batch:
        segments = batch["segment_ids"]
        weights = weights * (segments[:, 1:] == segments[:, :-1])
    logits = logits[:, :-1].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return nll, weights, correct


def perplexity_metrics(totals: dict[str, float]) -> dict[str, float]:
    tokens = max(totals.get("tokens", 0.0), 1.0)
    loss = totals.get("nll", 0.0) / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "token_accuracy": totals.get("correct", 0.0) / tokens,
            "tokens": totals.get("tokens", 0.0), "examples": totals.get("count", 0.0)}


class TokenizerOptions:
    """The `tokenizer` and `eos` options of the tasks that read or write text."""

    tokenizer_path: str | None
    eos: str | int | None

    @property
    def tokenizer(self) -> Any:
        if self.tokenizer_path is None:
            return None
        from tljax.data.lm_text import load_raw_tokenizer

        return load_raw_tokenizer(self.tokenizer_path)

    @property
    def eos_id(self) -> int | None:  # type: ignore[override]
        if self.eos is None or isinstance(self.eos, int):
            return self.eos
        if self.tokenizer is None:
            raise InputError(f"task.eos={self.eos!r} is a token name: set task.tokenizer too.")
        from tljax.data.lm_text import token_id

        return token_id(self.tokenizer, self.eos, "task.eos")

    def decode(self, tokens: np.ndarray) -> list[str]:
        """Generated ids (B, T) -> texts cut before eos, newlines shown as '\\n'."""
        eos = self.eos_id
        texts = []
        for row in np.asarray(tokens).tolist():
            if eos is not None and eos in row:
                row = row[:row.index(eos)]
            text = self.tokenizer.decode(row) if self.tokenizer else " ".join(map(str, row))
            texts.append(text.replace("\n", "\\n"))
        return texts


class UsesLMHead:
    """For tasks whose head is the backbone's own LM head (its vocabulary, tied embedding)."""

    name: str
    needs = "a decoder language model (gpt2, llama)"

    def accepts(self, backbone: nn.Module) -> bool:
        return hasattr(backbone, "vocab_size")

    def head(self, dtype: Any = jnp.float32) -> nn.Module:
        raise InputError(f"The {self.name} head is the backbone's LM head: build the model "
                         "with tljax.models.from_config (it calls head_for(backbone)).")

    def head_for(self, backbone: nn.Module, dtype: Any = jnp.float32) -> nn.Module:
        if not self.accepts(backbone):
            raise InputError(f"{self.name} needs {self.needs}; {type(backbone).__name__} is "
                             "not one.")
        return lm.lm_head(backbone, dtype)


@register("causal_lm")
class CausalLM(UsesLMHead, TokenizerOptions, Task):
    """See the module docstring. Options: `tokenizer` (a tokenizer.json, to show
    predictions), `eos` (the token ending a generated text: a token string or id),
    `loss_mask_key`."""

    main_metric = "perplexity"
    higher_is_better = False
    head_input = lm.HEAD_INPUT
    generates = True

    def __init__(self, info: DatasetInfo, tokenizer: str | None = None,
                 eos: str | int | None = None, loss_mask_key: str = "loss_mask"):
        super().__init__(info)
        self.tokenizer_path, self.eos = tokenizer, eos
        self.loss_mask_key = loss_mask_key

    @property
    def targets(self) -> tuple[str, ...]:
        return (self.loss_mask_key,)

    def loss(self, outputs: jnp.ndarray, batch: Batch) -> jnp.ndarray:
        nll, weights, _ = next_token_nll(outputs, batch, self.loss_mask_key)
        return (nll * weights).sum() / jnp.maximum(weights.sum(), 1.0)

    def eval_outputs(self, outputs: jnp.ndarray, batch: Batch) -> dict[str, jnp.ndarray]:
        nll, weights, correct = next_token_nll(outputs, batch, self.loss_mask_key)
        mask = eval_mask(batch, outputs)
        weights = weights * mask[:, None]
        return {"nll": (nll * weights).sum(), "correct": (correct * weights).sum(),
                "tokens": weights.sum(), "count": mask.sum()}

    def metrics(self) -> Metrics:
        return Metrics(perplexity_metrics)

    def parse_input(self, text: str) -> dict[str, Any]:
        return {"prompt": text}  # no 'text': tokenize_lm makes a generation prompt

    def describe(self, outputs: np.ndarray, batch: Batch, top: int = 3) -> list[str]:
        del batch, top
        return self.decode(outputs)
