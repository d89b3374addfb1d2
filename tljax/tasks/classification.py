"""Classification: one class per example (softmax or sigmoid), or several (multi-label).

The head is linear on the backbone's features, or on the output `head_input` names: a
decoder LM (gpt2, llama) classifies from 'last_token', the state of each sequence's last
real token (`task.head_input='last_token'`).

Targets: `batch[target_key]` (default 'label'), either integer class ids (B,) or float
vectors (B, C): one-hot, smoothed or mixed targets (`onehot`, mixup), or multi-hot vectors
for multi-label data (`multihot`). Class names come from the dataset's `label_key` feature.

Losses, per example, then the mean over the batch:
  softmax_xent   -sum_c y_c log softmax(z)_c   (y one-hot for integer ids)
  sigmoid_xent   sum_c BCE(sigmoid(z_c), y_c)  (independent per-class decisions)
`multilabel=True` implies sigmoid_xent.

Metrics over the whole eval split (padding examples excluded):
  single label   accuracy (top-1; against argmax y for vector targets), loss;
  multi-label    map (mean over classes with a positive of scikit-learn's average precision),
                 f1_micro and f1_macro at a 0.5 threshold, loss.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tljax.data import DatasetInfo
from tljax.errors import InputError
from tljax.models import LinearHead
from tljax.tasks.base import Batch, Metrics, Task, eval_mask, register

LOSSES = ("softmax_xent", "sigmoid_xent")


def softmax_xent(logits: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
    """Per-example -sum_c y_c log softmax(logits)_c; integer targets are class ids."""
    if targets.ndim == logits.ndim - 1:
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return optax.softmax_cross_entropy(logits, targets)


def sigmoid_xent(logits: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
    """Per-example sum over classes of binary cross-entropy; integer targets are one-hot."""
    if targets.ndim == logits.ndim - 1:
        targets = jax.nn.one_hot(targets, logits.shape[-1])
    return optax.sigmoid_binary_cross_entropy(logits, targets).sum(axis=-1)


class MultiLabelMetrics:
    """Keeps every real example's scores and targets; mAP and F1 over the split at the end."""

    def __init__(self):
        self._scores, self._targets, self._loss, self._count = [], [], 0.0, 0.0

    def update(self, arrays: dict[str, np.ndarray]) -> None:
        real = np.asarray(arrays["mask"], bool)
        self._scores.append(np.asarray(arrays["scores"])[real])
        self._targets.append(np.asarray(arrays["targets"])[real] > 0.5)
        self._loss += float(np.sum(arrays["loss"]))
        self._count += float(real.sum())

    def result(self) -> dict[str, float]:
        from sklearn.metrics import average_precision_score, f1_score

        scores, targets = np.concatenate(self._scores), np.concatenate(self._targets)
        with_positives = targets.any(axis=0)
        ap = [average_precision_score(targets[:, c], scores[:, c])
              for c in np.flatnonzero(with_positives)]
        predicted = scores >= 0.5
        return {
            "map": float(np.mean(ap)) if ap else 0.0,
            "f1_micro": float(f1_score(targets, predicted, average="micro", zero_division=0)),
            "f1_macro": float(f1_score(targets, predicted, average="macro", zero_division=0)),
            "loss": self._loss / max(self._count, 1.0),
            "examples": self._count,
        }


@register("classification")
class Classification(Task):
    """See the module docstring."""

    def __init__(self, info: DatasetInfo, loss: str = "softmax_xent", multilabel: bool = False,
                 label_key: str = "label", target_key: str | None = None,
                 head_zeroinit: bool = True, head_input: str | None = None):
        super().__init__(info)
        self.head_input = head_input
        if loss not in LOSSES:
            raise InputError(f"task.loss={loss!r}: expected one of {', '.join(LOSSES)}.")
        self.multilabel = multilabel
        self.loss_name = "sigmoid_xent" if multilabel else loss
        self.label_key = label_key
        self.target_key = target_key or label_key
        self.head_zeroinit = head_zeroinit
        self.class_names = info.class_names(label_key)

    @property
    def targets(self) -> tuple[str, ...]:
        return (self.target_key,)

    @property
    def output_names(self) -> list[str]:
        return self.class_names

    @property
    def main_metric(self) -> str:  # type: ignore[override]
        return "map" if self.multilabel else "accuracy"

    def head(self, dtype: Any = jnp.float32) -> nn.Module:
        return LinearHead(len(self.class_names), self.head_zeroinit, dtype)

    def _per_example_loss(self, logits: jnp.ndarray, batch: Batch) -> jnp.ndarray:
        fn = softmax_xent if self.loss_name == "softmax_xent" else sigmoid_xent
        return fn(logits, batch[self.target_key])

    def loss(self, outputs: jnp.ndarray, batch: Batch) -> jnp.ndarray:
        return self._per_example_loss(outputs, batch).mean()

    def eval_outputs(self, outputs: jnp.ndarray, batch: Batch) -> dict[str, jnp.ndarray]:
        mask = eval_mask(batch, outputs)
        loss = self._per_example_loss(outputs, batch) * mask
        targets = batch[self.target_key]
        if self.multilabel:
            return {"scores": jax.nn.sigmoid(outputs), "targets": targets, "mask": mask > 0,
                    "loss": loss.sum()}
        labels = targets if targets.ndim == 1 else jnp.argmax(targets, axis=-1)
        correct = (jnp.argmax(outputs, axis=-1) == labels).astype(jnp.float32)
        return {"accuracy": jnp.sum(correct * mask), "loss": jnp.sum(loss), "count": mask.sum()}

    def metrics(self) -> Any:
        return MultiLabelMetrics() if self.multilabel else Metrics()

    def probabilities(self, outputs: np.ndarray) -> np.ndarray:
        outputs = np.asarray(outputs, np.float64)
        if self.loss_name == "sigmoid_xent":
            return 1 / (1 + np.exp(-outputs))
        outputs = outputs - outputs.max(axis=-1, keepdims=True)
        return np.exp(outputs) / np.exp(outputs).sum(axis=-1, keepdims=True)

    def parse_input(self, text: str) -> dict[str, Any]:
        kinds = {f.kind for f in self.info.features.values()}
        if "image" in kinds:
            return {"image": read_image_file(text)}
        if "text" in kinds:
            return {"text": text}
        raise InputError(f"Cannot predict from the command line for features "
                         f"{sorted(kinds)}.")

    def describe(self, outputs: np.ndarray, batch: Batch, top: int = 3) -> list[str]:
        """'sports 0.974 | business 0.011 | politics 0.007' per example (most probable first;
        multi-label: every class at p >= 0.5, else the most probable one)."""
        lines = []
        for probs in self.probabilities(outputs):
            order = np.argsort(-probs, kind="stable")
            if self.multilabel:
                order = [c for c in order if probs[c] >= 0.5] or order[:1]
            lines.append(" | ".join(f"{self.class_names[c]} {probs[c]:.3f}"
                                    for c in order[:max(top, 1)]))
        return lines


def read_image_file(path: str) -> np.ndarray:
    """An image file for prediction, or an InputError naming it."""
    from PIL import UnidentifiedImageError

    from tljax.data.preprocess import decode_image

    if not os.path.isfile(path):
        raise InputError(f"No image file {path} (this run classifies images; give paths to "
                         ".png/.jpg files).")
    try:
        return decode_image(Path(path))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(f"Cannot read image {path}: {e}") from None
