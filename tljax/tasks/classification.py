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

Regularisers for small data, applied to training batches only (`train_batch`):
  label_smoothing e   targets (1 - e) y + e / C
  mixup a             x = l x + (1 - l) x', y = l y + (1 - l) y' with l ~ Beta(a, a) and
                      (x', y') the batch rolled by one (Zhang et al. 2018)
  cutmix a            a box of area (1 - l) of x' pasted into x, y mixed by the box's
                      true area share (Yun et al. 2019)
With both mixup and cutmix each batch uses one of them, chosen with probability 1/2.
They mix the batch's 'image' and make the targets vectors; the draws come from the train
step's RNG, so a run stays reproducible and resumable.

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
                 head_zeroinit: bool = True, head_input: str | None = None,
                 label_smoothing: float = 0.0, mixup: float = 0.0, cutmix: float = 0.0):
        super().__init__(info)
        self.head_input = head_input
        if loss not in LOSSES:
            raise InputError(f"task.loss={loss!r}: expected one of {', '.join(LOSSES)}.")
        for name, value in (("label_smoothing", label_smoothing), ("mixup", mixup),
                            ("cutmix", cutmix)):
            if not 0 <= value < (1 if name == "label_smoothing" else float("inf")):
                raise InputError(f"task.{name}={value!r}: must be >= 0"
                                 f"{' and < 1' if name == 'label_smoothing' else ''}.")
        self.label_smoothing, self.mixup, self.cutmix = label_smoothing, mixup, cutmix
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

    def train_batch(self, batch: Batch, rng: jax.Array) -> Batch:
        """Label smoothing, mixup and cutmix (see the module docstring)."""
        if not (self.label_smoothing or self.mixup or self.cutmix):
            return batch
        targets = batch[self.target_key]
        num_classes = len(self.class_names)
        if targets.ndim == 1:
            targets = jax.nn.one_hot(targets, num_classes)
        targets = targets * (1 - self.label_smoothing) + self.label_smoothing / num_classes
        batch = {**batch, self.target_key: targets}
        if not (self.mixup or self.cutmix):
            return batch
        choose, draw, box = jax.random.split(rng, 3)
        mixed = mix_batch(batch, self.target_key, draw, box, self.mixup, self.cutmix,
                          use_cutmix=jax.random.bernoulli(choose, 0.5))
        return mixed

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
        """An image or audio file (by the run's features), or the text itself."""
        kinds = {f.kind for f in self.info.features.values()}
        if "image" in kinds:
            return {"image": read_image_file(text)}
        if "audio" in kinds:
            return read_audio_file(text)
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


def mix_batch(batch: Batch, target_key: str, draw: jax.Array, box: jax.Array, mixup: float,
              cutmix: float, use_cutmix: jax.Array) -> Batch:
    """Mixup or cutmix of batch['image'] and its vector targets with the batch rolled by one.

    `use_cutmix` (a traced bool) picks cutmix when both are on; with one of them on, that
    one is used.
    """
    if "image" not in batch:
        raise InputError(f"task.mixup / task.cutmix mix batch['image'], but the training "
                         f"batch has {sorted(batch)} (cached features cannot be mixed).")
    images, targets = batch["image"], batch[target_key]
    other_images, other_targets = jnp.roll(images, 1, axis=0), jnp.roll(targets, 1, axis=0)
    if not cutmix:
        use_cutmix = jnp.asarray(False)
    elif not mixup:
        use_cutmix = jnp.asarray(True)
    alpha = jnp.where(use_cutmix, max(cutmix, 1e-6), max(mixup, 1e-6))
    lam = jax.random.beta(draw, alpha, alpha)
    # Cutmix: a box of area (1 - lam), clipped to the image; lam becomes the kept area.
    height, width = images.shape[1], images.shape[2]
    cut_h = jnp.sqrt(1 - lam) * height
    cut_w = jnp.sqrt(1 - lam) * width
    cy, cx = jax.random.uniform(box, (2,)) * jnp.array([height, width])
    top, bottom = jnp.clip(cy - cut_h / 2, 0, height), jnp.clip(cy + cut_h / 2, 0, height)
    left, right = jnp.clip(cx - cut_w / 2, 0, width), jnp.clip(cx + cut_w / 2, 0, width)
    rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    inside = ((rows >= jnp.round(top)) & (rows < jnp.round(bottom))
              & (cols >= jnp.round(left)) & (cols < jnp.round(right)))
    kept = 1 - inside.mean()
    cut_images = jnp.where(inside[None, :, :, None], other_images, images)
    mixed_images = lam * images + (1 - lam) * other_images
    share = jnp.where(use_cutmix, kept, lam)
    return {**batch,
            "image": jnp.where(use_cutmix, cut_images, mixed_images).astype(images.dtype),
            target_key: share * targets + (1 - share) * other_targets}


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


def read_audio_file(path: str) -> dict[str, Any]:
    """{'audio': float32 mono, 'sample_rate'} of an audio file for prediction (the run's eval
    pp resamples it), or an InputError naming the file."""
    from tljax.data.audio import AUDIO_EXTENSIONS, AudioFileError, decode_audio

    if not os.path.isfile(path):
        raise InputError(f"No audio file {path} (this run classifies audio; give paths to "
                         f"{'/'.join(AUDIO_EXTENSIONS)} files).")
    try:
        samples, rate = decode_audio(Path(path))
    except AudioFileError as e:
        raise InputError(str(e)) from None
    return {"audio": samples, "sample_rate": rate}
