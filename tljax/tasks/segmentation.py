"""Semantic segmentation: one class per pixel.

Targets: `batch[target_key]` (default 'segmentation'), int (B, H, W) class ids; pixels equal
to `ignore_index` (default 255, the VOC/Decathlon convention) or outside 0..C-1 count nowhere
(neither in the loss nor in the metrics). Class names come from the dataset's feature of the
same key (background, when there is one, is class 0), or from the option `class_names`.

Heads (`head`): 'fcn' (torchvision's FCNHead, multi-scale fusion when `head_input` names
several CNN stages, finest first), 'deeplabv3' (ASPP), 'vit' (patch tokens: `head_input=
'tokens'`, `decoder='linear'|'progressive'`); see tljax/models/dense.py. The head's logits
(at its feature resolution) are upsampled bilinearly (half-pixel centres, as torch's
align_corners=False) to the target's size before the loss and the metrics.

Losses (`loss`), over the labelled pixels of the batch:
  xent       mean over pixels of -log softmax(z)_y;
  dice       1 - mean_c (2 sum p_c y_c + 1) / (sum p_c + sum y_c + 1) with p = softmax(z),
             y one-hot, sums over every pixel of the batch; for two classes (binary
             segmentation) only the foreground class 1 enters the mean;
  xent+dice  xent + dice_weight * dice.

Metrics over the whole eval split, from one confusion matrix summed over every labelled
pixel of every real example (padding examples excluded):
  miou            mean over classes of TP / (TP + FP + FN), over the classes that occur in
                  the targets or the predictions;
  iou/<class>     per class (classes that never occur are left out);
  dice            mean over the same classes of 2 TP / (2 TP + FP + FN);
  pixel_accuracy  TP summed over classes / labelled pixels;
  loss            per-pixel cross-entropy.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tljax.data import DatasetInfo
from tljax.errors import InputError
from tljax.models.dense import DeepLabV3Head, FCNHead, ViTSegHead, resize_bilinear
from tljax.tasks.base import Batch, Task, displayable, eval_mask, register
from tljax.tasks.classification import read_image_file

HEADS = ("fcn", "deeplabv3", "vit")
LOSSES = ("xent", "dice", "xent+dice")


def upsample_logits(logits: jnp.ndarray, hw: tuple[int, int]) -> jnp.ndarray:
    """Head logits (B, h, w, C) -> (B, H, W, C), bilinear as torchvision's models."""
    return resize_bilinear(logits, hw)


def pixel_xent(logits: jnp.ndarray, labels: jnp.ndarray, valid: jnp.ndarray) -> jnp.ndarray:
    """Per-pixel cross-entropy (B, H, W), zero where not valid."""
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
    return xent * valid


def dice_loss(logits: jnp.ndarray, labels: jnp.ndarray, valid: jnp.ndarray,
              smooth: float = 1.0) -> jnp.ndarray:
    """Soft Dice loss over the batch (see the module docstring)."""
    num_classes = logits.shape[-1]
    weights = valid[..., None].astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1) * weights
    onehot = jax.nn.one_hot(jnp.where(valid, labels, 0), num_classes) * weights
    axes = tuple(range(logits.ndim - 1))
    intersection = jnp.sum(probs * onehot, axis=axes)
    denominator = jnp.sum(probs, axis=axes) + jnp.sum(onehot, axis=axes)
    dice = (2 * intersection + smooth) / (denominator + smooth)
    if num_classes == 2:
        dice = dice[1:]
    return 1.0 - jnp.mean(dice)


def confusion_per_example(labels: jnp.ndarray, predictions: jnp.ndarray, valid: jnp.ndarray,
                          num_classes: int) -> jnp.ndarray:
    """(B, C, C) counts of (target, predicted) over each example's valid pixels."""
    b = labels.shape[0]
    t = jax.nn.one_hot(jnp.where(valid, labels, 0).reshape(b, -1), num_classes,
                       dtype=jnp.float32) * valid.reshape(b, -1, 1)
    p = jax.nn.one_hot(predictions.reshape(b, -1), num_classes, dtype=jnp.float32)
    return jnp.einsum("bnt,bnp->btp", t, p)


def scores_from_confusion(confusion: np.ndarray, class_names: list[str]) -> dict[str, float]:
    """miou, iou/<class>, dice and pixel_accuracy from a (target, predicted) count matrix."""
    confusion = np.asarray(confusion, np.float64)
    tp = np.diag(confusion)
    targets, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    union = targets + predicted - tp
    seen = union > 0
    iou = np.where(seen, tp / np.maximum(union, 1), np.nan)
    dice = np.where(seen, 2 * tp / np.maximum(targets + predicted, 1), np.nan)
    total = confusion.sum()
    result = {
        "miou": float(np.nanmean(iou)) if seen.any() else 0.0,
        "dice": float(np.nanmean(dice)) if seen.any() else 0.0,
        "pixel_accuracy": float(tp.sum() / total) if total else 0.0,
    }
    for name, value, present in zip(class_names, iou, seen, strict=True):
        if present:
            result[f"iou/{name}"] = float(value)
    return result


class SegmentationMetrics:
    """Sums the confusion matrices of every real example; scores over the split."""

    def __init__(self, class_names: list[str]):
        self.class_names = class_names
        n = len(class_names)
        self.confusion = np.zeros((n, n), np.float64)
        self.loss, self.pixels, self.examples = 0.0, 0.0, 0.0

    def update(self, arrays: dict[str, np.ndarray]) -> None:
        self.confusion += np.asarray(arrays["confusion"], np.float64).sum(axis=0)
        self.loss += float(np.sum(arrays["loss"]))
        self.pixels += float(np.sum(arrays["pixels"]))
        self.examples += float(np.sum(arrays["count"]))

    def result(self) -> dict[str, float]:
        return {**scores_from_confusion(self.confusion, self.class_names),
                "loss": self.loss / max(self.pixels, 1.0), "examples": self.examples}


PALETTE = np.asarray([(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
                      (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230),
                      (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
                      (170, 110, 40), (255, 250, 200), (128, 0, 0)], np.uint8)


def class_color(c: int) -> np.ndarray:
    """A distinct colour per class id (class 0, background, black); cycles after 15."""
    return PALETTE[c] if c < len(PALETTE) else PALETTE[1 + (c - 1) % (len(PALETTE) - 1)]


@register("segmentation")
class Segmentation(Task):
    """See the module docstring."""

    main_metric = "miou"

    def __init__(self, info: DatasetInfo, head: str = "fcn",
                 head_input: str | tuple[str, ...] | list[str] = "stage_4",
                 target_key: str = "segmentation", ignore_index: int = 255,
                 loss: str = "xent", dice_weight: float = 1.0, head_width: int | None = None,
                 lateral_width: int = 128, dropout: float | None = None,
                 decoder: str = "linear", prefix_tokens: int | None = None,
                 class_names: tuple[str, ...] | list[str] | None = None):
        super().__init__(info)
        if head not in HEADS:
            raise InputError(f"task.head={head!r}: expected one of {', '.join(HEADS)}.")
        if loss not in LOSSES:
            raise InputError(f"task.loss={loss!r}: expected one of {', '.join(LOSSES)}.")
        self.head_name, self.loss_name, self.dice_weight = head, loss, dice_weight
        self.head_input = head_input if isinstance(head_input, str) else tuple(head_input)
        self.target_key, self.ignore_index = target_key, ignore_index
        self.head_width, self.lateral_width, self.dropout = head_width, lateral_width, dropout
        self.decoder, self.prefix_tokens = decoder, prefix_tokens
        # Datasets whose masks carry no names (TFDS oxford_iiit_pet) name them here.
        self.class_names = (list(class_names) if class_names is not None
                            else info.class_names(target_key))

    @property
    def targets(self) -> tuple[str, ...]:
        return (self.target_key,)

    @property
    def output_names(self) -> list[str]:
        return self.class_names

    def head(self, dtype: Any = jnp.float32) -> nn.Module:
        n = len(self.class_names)
        options = {} if self.dropout is None else {"dropout": self.dropout}
        if self.head_width is not None:
            options["width"] = self.head_width
        if self.head_name == "fcn":
            return FCNHead(n, lateral_width=self.lateral_width, dtype=dtype, **options)
        if self.head_name == "deeplabv3":
            return DeepLabV3Head(n, dtype=dtype, **options)
        options.pop("dropout", None)
        return ViTSegHead(n, self.decoder, prefix_tokens=self.prefix_tokens, dtype=dtype,
                          **options)

    def _logits_and_valid(self, outputs: jnp.ndarray, batch: Batch
                          ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        labels = batch[self.target_key].astype(jnp.int32)
        if labels.ndim == 4:  # (B, H, W, 1) masks
            labels = labels[..., 0]
        logits = upsample_logits(outputs, labels.shape[1:3])
        valid = (labels != self.ignore_index) & (labels >= 0) & (labels < logits.shape[-1])
        return logits, labels, valid

    def loss(self, outputs: jnp.ndarray, batch: Batch) -> jnp.ndarray:
        logits, labels, valid = self._logits_and_valid(outputs, batch)
        total = jnp.zeros((), jnp.float32)
        if self.loss_name in ("xent", "xent+dice"):
            total += pixel_xent(logits, labels, valid).sum() / jnp.maximum(valid.sum(), 1)
        if self.loss_name in ("dice", "xent+dice"):
            weight = 1.0 if self.loss_name == "dice" else self.dice_weight
            total += weight * dice_loss(logits, labels, valid)
        return total

    def eval_outputs(self, outputs: jnp.ndarray, batch: Batch) -> dict[str, jnp.ndarray]:
        logits, labels, valid = self._logits_and_valid(outputs, batch)
        mask = eval_mask(batch, logits)
        valid = valid & (mask[:, None, None] > 0)
        predictions = jnp.argmax(logits, axis=-1)
        return {"confusion": confusion_per_example(labels, predictions, valid, logits.shape[-1]),
                "loss": pixel_xent(logits, labels, valid).sum(axis=(1, 2)),
                "pixels": valid.sum(axis=(1, 2)).astype(jnp.float32), "count": mask}

    def metrics(self) -> Any:
        return SegmentationMetrics(self.class_names)

    def predict_labels(self, outputs: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
        """Class ids (B, H, W) at the model input's size."""
        return np.asarray(jnp.argmax(upsample_logits(jnp.asarray(outputs), hw), axis=-1))

    def parse_input(self, text: str) -> dict[str, Any]:
        return {"image": read_image_file(text)}

    def describe(self, outputs: np.ndarray, batch: Batch, top: int = 3) -> list[str]:
        """'background 81.2% | Trouser 12.5% | Bag 6.3%': the predicted share of each class."""
        labels = self.predict_labels(outputs, batch["image"].shape[1:3])
        lines = []
        for example in labels:
            counts = np.bincount(example.ravel(), minlength=len(self.class_names))
            order = np.argsort(-counts, kind="stable")
            shown = [c for c in order if counts[c]][:max(top, 1)]
            lines.append(" | ".join(f"{self.class_names[c]} {100 * counts[c] / example.size:.1f}%"
                                    for c in shown))
        return lines

    def render(self, outputs: Any, batch: Batch, images: list[np.ndarray]
               ) -> list[np.ndarray]:
        """Each input image with its predicted classes blended in (class 0 left clear)."""
        from tljax.data.dense import resize_nearest

        labels = self.predict_labels(outputs, batch["image"].shape[1:3])
        pictures = []
        for image, label in zip(images, labels, strict=True):
            rgb = displayable(image)
            label = resize_nearest(label, rgb.shape[:2])
            colors = np.stack([class_color(c) for c in range(len(self.class_names))])
            overlay = colors[label].astype(np.float32)
            alpha = np.where(label > 0, 0.55, 0.0)[..., None]
            pictures.append(np.rint(rgb * (1 - alpha) + overlay * alpha).astype(np.uint8))
        return pictures
