"""Sequence to sequence: an encoder-decoder LM (T5) maps a text to a target text.

Batches come from the `tokenize_seq2seq` pp op (tljax.data.lm_text): encoder
`input_ids` / `attention_mask`, `targets` / `target_mask` (the target's tokens and its eos)
and the teacher-forcing decoder inputs `decoder_input_ids` = [start] + targets[:-1]. The
head is the backbone's LM head (tied and rescaled for T5 v1.0, untied for v1.1).

Loss: teacher forcing, the mean over target tokens of -log p(y_t | y_<t, x).

Evaluation also decodes: greedily from the encoder input, up to the targets' width
(tljax.generate.decode, inside the eval step), stopping at `eos`. Metrics over the eval
split: `exact_match` (the generated tokens equal the target up to and including its eos;
the main metric), `token_accuracy` (teacher-forced argmax = target token), `loss`,
`tokens`, `examples`. `generate_in_eval=False` skips decoding (exact_match is then 0).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tljax.data import DatasetInfo
from tljax.models import lm
from tljax.tasks.base import Batch, Metrics, Task, eval_mask, register
from tljax.tasks.causal_lm import TokenizerOptions, UsesLMHead


def seq2seq_metrics(totals: dict[str, float]) -> dict[str, float]:
    tokens, count = max(totals.get("tokens", 0.0), 1.0), max(totals.get("count", 0.0), 1.0)
    return {"exact_match": totals.get("exact", 0.0) / count,
            "token_accuracy": totals.get("correct", 0.0) / tokens,
            "loss": totals.get("nll", 0.0) / tokens, "tokens": totals.get("tokens", 0.0),
            "examples": totals.get("count", 0.0)}


@register("seq2seq")
class Seq2Seq(UsesLMHead, TokenizerOptions, Task):
    """See the module docstring. Options: `tokenizer` (to show predictions), `eos` (token
    string or id ending a target; T5: '</s>' = 1), `generate_in_eval`."""

    main_metric = "exact_match"
    head_input = lm.HEAD_INPUT
    generates = True

    def __init__(self, info: DatasetInfo, tokenizer: str | None = None,
                 eos: str | int | None = 1, generate_in_eval: bool = True):
        super().__init__(info)
        self.tokenizer_path, self.eos = tokenizer, eos
        self.generate_in_eval = generate_in_eval

    @property
    def targets(self) -> tuple[str, ...]:
        return ("targets", "target_mask")

    needs = "an encoder-decoder model (t5)"

    def accepts(self, backbone: nn.Module) -> bool:
        return "decoder_input_ids" in getattr(backbone, "inputs", ())

    def _token_terms(self, logits: jnp.ndarray, batch: Batch
                     ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        targets = batch["targets"]
        weights = batch["target_mask"].astype(jnp.float32)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
        return nll, weights, correct

    def loss(self, outputs: jnp.ndarray, batch: Batch) -> jnp.ndarray:
        nll, weights, _ = self._token_terms(outputs, batch)
        return (nll * weights).sum() / jnp.maximum(weights.sum(), 1.0)

    def eval_forward(self, model: Any, variables: Any, inputs: Any) -> Any:
        logits = model.apply(variables, inputs, train=False)
        if not self.generate_in_eval:
            return {"logits": logits}
        from tljax.generate import decode

        generated = decode(model, variables, inputs["input_ids"], inputs["attention_mask"],
                           jax.random.PRNGKey(0), max_new_tokens=logits.shape[1],
                           eos_id=self.eos_id)
        return {"logits": logits, "generated": generated}

    def eval_outputs(self, outputs: Any, batch: Batch) -> dict[str, jnp.ndarray]:
        logits = outputs["logits"]
        mask = eval_mask(batch, logits)
        nll, weights, correct = self._token_terms(logits, batch)
        weights_real = weights * mask[:, None]
        result = {"nll": (nll * weights_real).sum(), "correct": (correct * weights_real).sum(),
                  "tokens": weights_real.sum(), "count": mask.sum()}
        if "generated" in outputs:
            wrong = (outputs["generated"] != batch["targets"]) & (weights > 0)
            result["exact"] = ((~wrong.any(axis=-1)).astype(jnp.float32) * mask).sum()
        return result

    def metrics(self) -> Metrics:
        return Metrics(seq2seq_metrics)

    def parse_input(self, text: str) -> dict[str, Any]:
        return {"text": text}  # no target: tokenize_seq2seq makes the encoder input only

    def describe(self, outputs: np.ndarray, batch: Batch, top: int = 3) -> list[str]:
        del batch, top
        return self.decode(outputs)
