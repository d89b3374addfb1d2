"""Token classification (named-entity recognition): one tag per word, BIO / IOB2 tags.

The data are words with word-level tags ({'tokens', 'tags'}, e.g. `conll:` files or
`wnut16`); the `tokenize_words` pp op splits words into pieces and aligns the tags: the
first piece of a word carries its tag, later pieces, special tokens and padding carry
IGNORE (-1). The head is a linear layer on every piece's hidden state (the backbone's
'tokens' output); the loss is the mean cross-entropy over labelled pieces of the batch.

A word's predicted tag is the argmax at its first piece; words cut off by truncation are
predicted 'O'. Metrics over the whole eval split, on words:
  f1, precision, recall   entity level (exact span and type), computed by `seqeval`
                          (the conlleval rules: an I- tag after O starts an entity);
  token_accuracy          fraction of words whose tag is right;
  loss                    mean cross-entropy per labelled piece.
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import optax

from tljax.data import DatasetInfo
from tljax.data.text import IGNORE
from tljax.models import LinearHead
from tljax.tasks.base import Batch, Task, eval_mask, register

# Words as a tokeniser of tweets would split them: @handles, #tags, URLs, words with
# inner apostrophes/hyphens, numbers, then any other non-space character alone.
_WORD = re.compile(r"https?://\S+|[@#]?\w+(?:['’-]\w+)*|[^\w\s]")


def split_words(text: str) -> list[str]:
    """A sentence as words for `tokenize_words` (tools/predict.py input)."""
    return _WORD.findall(text)


def word_predictions(pieces: np.ndarray, word_ids: np.ndarray, num_words: int) -> np.ndarray:
    """Per word, the prediction at its first piece (IGNORE for words without a piece)."""
    out = np.full(num_words, IGNORE, np.int64)
    first = (word_ids >= 0) & (np.diff(word_ids, prepend=-2) != 0)
    valid = first & (word_ids < num_words)
    out[word_ids[valid]] = pieces[valid]
    return out


class EntityMetrics:
    """Collects word-level gold and predicted tag sequences; seqeval scores them at the end."""

    def __init__(self, tag_names: list[str]):
        self._names = tag_names
        self._gold: list[list[str]] = []
        self._pred: list[list[str]] = []
        self._loss = self._pieces = 0.0

    def update(self, arrays: dict[str, np.ndarray]) -> None:
        self._loss += float(np.sum(arrays["loss"]))
        self._pieces += float(np.sum(arrays["pieces"]))
        for real, pieces, word_ids, word_tags in zip(
                arrays["mask"], arrays["predictions"], arrays["word_ids"], arrays["word_tags"],
                strict=True):
            if not real:
                continue
            gold = word_tags[word_tags != IGNORE]
            pred = word_predictions(pieces, word_ids, len(gold))
            self._gold.append([self._names[t] for t in gold])
            self._pred.append([self._names[t] if t != IGNORE else "O" for t in pred])

    def result(self) -> dict[str, float]:
        from seqeval.metrics import f1_score, precision_score, recall_score

        words = sum(len(g) for g in self._gold)
        right = sum(g == p for gs, ps in zip(self._gold, self._pred, strict=True)
                    for g, p in zip(gs, ps, strict=True))
        return {
            "f1": float(f1_score(self._gold, self._pred, zero_division=0)),
            "precision": float(precision_score(self._gold, self._pred, zero_division=0)),
            "recall": float(recall_score(self._gold, self._pred, zero_division=0)),
            "token_accuracy": right / max(words, 1),
            "loss": self._loss / max(self._pieces, 1.0),
            "examples": float(len(self._gold)),
        }


@register("token_classification")
class TokenClassification(Task):
    """See the module docstring."""

    main_metric = "f1"
    head_input = "tokens"

    def __init__(self, info: DatasetInfo, label_key: str = "tags", head_zeroinit: bool = True):
        super().__init__(info)
        self.label_key = label_key
        self.head_zeroinit = head_zeroinit
        self.tag_names = info.class_names(label_key)

    @property
    def targets(self) -> tuple[str, ...]:
        return ("tags", "word_ids", "word_tags")

    @property
    def output_names(self) -> list[str]:
        return self.tag_names

    def head(self, dtype: Any = jnp.float32) -> nn.Module:
        return LinearHead(len(self.tag_names), self.head_zeroinit, dtype)

    def _piece_losses(self, logits: jnp.ndarray, tags: jnp.ndarray
                      ) -> tuple[jnp.ndarray, jnp.ndarray]:
        labelled = tags != IGNORE
        losses = optax.softmax_cross_entropy_with_integer_labels(
            logits, jnp.where(labelled, tags, 0))
        return losses * labelled, labelled.astype(jnp.float32)

    def loss(self, outputs: jnp.ndarray, batch: Batch) -> jnp.ndarray:
        losses, labelled = self._piece_losses(outputs, batch["tags"])
        return losses.sum() / jnp.maximum(labelled.sum(), 1.0)

    def eval_outputs(self, outputs: jnp.ndarray, batch: Batch) -> dict[str, jnp.ndarray]:
        mask = eval_mask(batch, outputs)
        losses, labelled = self._piece_losses(outputs, batch["tags"])
        return {"predictions": jnp.argmax(outputs, axis=-1), "word_ids": batch["word_ids"],
                "word_tags": batch["word_tags"], "mask": mask > 0,
                "loss": (losses.sum(-1) * mask).sum(), "pieces": (labelled.sum(-1) * mask).sum()}

    def metrics(self) -> EntityMetrics:
        return EntityMetrics(self.tag_names)

    def parse_input(self, text: str) -> dict[str, Any]:
        words = split_words(text)
        return {"tokens": words, "words": words}  # 'words' survives tokenize_words

    def entities(self, outputs: np.ndarray, batch: Batch) -> list[list[tuple[str, str]]]:
        """Per example, the (entity type, words) found, in order."""
        from seqeval.metrics.sequence_labeling import get_entities

        found = []
        for pieces, word_ids, words in zip(np.argmax(outputs, axis=-1), batch["word_ids"],
                                           batch["words"], strict=True):
            pred = word_predictions(pieces, word_ids, len(words))
            tags = [self.tag_names[t] if t != IGNORE else "O" for t in pred]
            found.append([(kind, " ".join(words[start:end + 1]))
                          for kind, start, end in get_entities(tags)])
        return found

    def describe(self, outputs: np.ndarray, batch: Batch, top: int = 3) -> list[str]:
        """'Apple [company] | Paris [geo-loc]' per example ('no entities' when none)."""
        del top
        return [" | ".join(f"{words} [{kind}]" for kind, words in found) or "no entities"
                for found in self.entities(outputs, batch)]
