"""Classification by verbaliser: a decoder LM scores one label word per class.

Each example is a prompt ending where the label word would follow (e.g. the `tokenize_lm`
op with `suffix='\\nTopic:'`, no eos). Class c is verbalised by the word v_c (default: its
class name after a space, ' sport'), which must be one token t_c of the tokenizer (the
task says which words are not, and how they split). The head is the backbone's own LM
head on the state of the last real token (head_input ('last_token', 'embedding')), and the
score of class c is the label word's log-likelihood after the prompt,

    s_c = log p(t_c | prompt) = z_{t_c} - logsumexp_v z_v,    z = LM logits (V,),

so before any training the model classifies zero-shot. The loss is the cross-entropy of
softmax(s) over the classes (PET, Schick & Schuetze 2021; the logsumexp over the
vocabulary cancels there), which fine-tuning (LoRA, or the untied head) minimises.

Metrics over the eval split: `accuracy` (argmax_c s_c), `loss` and `label_logp`, the mean
log-likelihood of the true label word.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tljax.data import DatasetInfo
from tljax.errors import InputError
from tljax.tasks.base import Batch, Metrics, Task, eval_mask, register
from tljax.tasks.causal_lm import UsesLMHead


def label_token_ids(tokenizer: Any, words: Sequence[str]) -> list[int]:
    """The single token of each label word, or an InputError naming the words that are not."""
    ids, bad = [], []
    for word in words:
        tokens = tokenizer.encode(word, add_special_tokens=False)
        if len(tokens.ids) != 1:
            bad.append(f"{word!r} -> {tokens.tokens}")
        ids.extend(tokens.ids[:1])
    if bad:
        raise InputError(f"Label words must be single tokens; these are not: {'; '.join(bad)}. "
                         "Choose other task.label_words.")
    if len(set(ids)) != len(ids):
        raise InputError(f"Label words {list(words)} share tokens; each class needs its own.")
    return ids


@register("verbaliser")
class Verbaliser(UsesLMHead, Task):
    """See the module docstring. Options: `tokenizer` (tokenizer.json, required),
    `label_words` (one per class, default ' ' + class name), `label_key`."""

    main_metric = "accuracy"
    head_input = ("last_token", "embedding")

    def __init__(self, info: DatasetInfo, tokenizer: str | None = None,
                 label_words: Sequence[str] | None = None, label_key: str = "label"):
        super().__init__(info)
        if tokenizer is None:
            raise InputError("The verbaliser task needs task.tokenizer (the tokenizer.json the "
                             "pp string uses) to find the label words' tokens.")
        from tljax.data.lm_text import load_raw_tokenizer

        self.label_key = label_key
        self.class_names = info.class_names(label_key)
        words = list(label_words) if label_words else [f" {c}" for c in self.class_names]
        if len(words) != len(self.class_names):
            raise InputError(f"task.label_words has {len(words)} words for "
                             f"{len(self.class_names)} classes ({', '.join(self.class_names)}).")
        self.label_words = words
        self.token_ids = label_token_ids(load_raw_tokenizer(tokenizer), words)

    @property
    def targets(self) -> tuple[str, ...]:
        return (self.label_key,)

    @property
    def output_names(self) -> list[str]:
        return self.class_names

    def scores(self, logits: jnp.ndarray) -> jnp.ndarray:
        """(B, C) log-likelihoods of the label words from the last token's logits (B, V)."""
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return logp[:, jnp.asarray(self.token_ids)]

    def _losses(self, scores: jnp.ndarray, batch: Batch) -> jnp.ndarray:
        return optax.softmax_cross_entropy_with_integer_labels(scores, batch[self.label_key])

    def loss(self, outputs: jnp.ndarray, batch: Batch) -> jnp.ndarray:
        return self._losses(self.scores(outputs), batch).mean()

    def eval_outputs(self, outputs: jnp.ndarray, batch: Batch) -> dict[str, jnp.ndarray]:
        mask = eval_mask(batch, outputs)
        scores = self.scores(outputs)
        labels = batch[self.label_key]
        correct = (jnp.argmax(scores, axis=-1) == labels).astype(jnp.float32)
        gold = jnp.take_along_axis(scores, labels[:, None], axis=-1)[:, 0]
        return {"accuracy": (correct * mask).sum(), "loss": (self._losses(scores, batch)
                                                             * mask).sum(),
                "label_logp": (gold * mask).sum(), "count": mask.sum()}

    def metrics(self) -> Metrics:
        return Metrics()

    def parse_input(self, text: str) -> dict[str, Any]:
        return {"text": text}

    def describe(self, outputs: np.ndarray, batch: Batch, top: int = 3) -> list[str]:
        """'sport 0.912 | business 0.040 | ...': class probabilities softmax(s)."""
        scores = np.asarray(self.scores(jnp.asarray(outputs)), np.float64)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        lines = []
        for p in probs:
            order = np.argsort(-p, kind="stable")[:max(top, 1)]
            lines.append(" | ".join(f"{self.class_names[c]} {p[c]:.3f}" for c in order))
        return lines
