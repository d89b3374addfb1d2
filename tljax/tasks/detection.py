"""Object detection: FCOS (Tian et al. 2019), anchor-free and one-stage, as torchvision has it.

Targets (fixed shapes, from the pp op `pad_boxes(M)`): `boxes` float32 (B, M, 4) as x0, y0,
x1, y1 in pixels of the model's input, `classes` int (B, M) in 0..K-1 and `box_mask` bool
(B, M) for the real boxes. Class names come from the dataset's `classes` feature.

Head: `tljax.models.dense.FCOSHead` over the backbone stages named by `head_input` (strides 8,
16, 32: ('stage_2', 'stage_3', 'stage_4') for ResNet, ('stage_3', 'stage_4', 'stage_5') for
EfficientNet-Lite), FPN levels P3..P7 at `strides` (8, 16, 32, 64, 128).

Locations: level l of stride s has one point per cell at (x s, y s) (torchvision's anchor
centres), of size s. Matching, per point and image (torchvision's FCOS.compute_loss): a box
is a candidate when the point lies inside it, within `center_sampling_radius` * s of its
centre (max-norm), and the largest of its distances (l, t, r, b) to the box's sides lies in
the level's range (4 s, 8 s] (the first level from 0, the last up to infinity); among
candidates the box of the smallest area wins; points without one are background.

Loss (summed over the batch, divided by the number of foreground points, at least 1):
  sigmoid focal loss (alpha 0.25, gamma 2) over every point and class (one-hot targets);
  GIoU loss 1 - GIoU(decoded box, matched box) over foreground points, boxes decoded as
  (x - l s, y - t s, x + r s, y + b s) from the head's ReLU'd distances;
  binary cross-entropy of the centerness logit against sqrt(min(l, r) / max(l, r) *
  min(t, b) / max(t, b)) of the regression targets, over foreground points.

Post-processing (evaluation and prediction, inside jit, per image): score = sqrt(sigmoid(
class logit) * sigmoid(centerness)) per point and class; the `pre_nms_top_k` best (point,
class) pairs over all levels with score > `score_threshold`, boxes decoded and clipped to the
image; greedy class-wise NMS at IoU `nms_iou`; the `max_detections` best kept, padded with
`valid` False. (torchvision takes the top k per level; here over all levels at once.)

Metrics over the whole eval split: COCO box AP computed by `pycocotools` (COCOeval, 'bbox')
on the real examples' boxes: map (AP@[.5:.95]), map50, map75 and ap/<class> (area 'all',
100 detections). Ground-truth area is the box area; there are no crowd regions.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tljax.data import DatasetInfo
from tljax.models.dense import FCOSHead
from tljax.tasks.base import Batch, Task, displayable, eval_mask, register
from tljax.tasks.classification import read_image_file

# ---------------------------------------------------------------------------------------------
# Boxes.


def box_area(boxes: jnp.ndarray) -> jnp.ndarray:
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def generalized_iou(a: jnp.ndarray, b: jnp.ndarray, eps: float = 1e-7) -> jnp.ndarray:
    """GIoU of matching boxes a[i], b[i] (Rezatofighi et al. 2019), as torchvision's loss."""
    x0, y0 = jnp.maximum(a[..., 0], b[..., 0]), jnp.maximum(a[..., 1], b[..., 1])
    x1, y1 = jnp.minimum(a[..., 2], b[..., 2]), jnp.minimum(a[..., 3], b[..., 3])
    intersection = jnp.clip(x1 - x0, 0) * jnp.clip(y1 - y0, 0)
    union = box_area(a) + box_area(b) - intersection
    iou = intersection / (union + eps)
    cx0, cy0 = jnp.minimum(a[..., 0], b[..., 0]), jnp.minimum(a[..., 1], b[..., 1])
    cx1, cy1 = jnp.maximum(a[..., 2], b[..., 2]), jnp.maximum(a[..., 3], b[..., 3])
    enclosing = (cx1 - cx0) * (cy1 - cy0)
    return iou - (enclosing - union) / (enclosing + eps)


def pairwise_iou(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """(..., N, 4) x (..., M, 4) -> (..., N, M) IoU."""
    lt = jnp.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = jnp.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = jnp.clip(rb - lt, 0)
    intersection = wh[..., 0] * wh[..., 1]
    union = box_area(a)[..., :, None] + box_area(b)[..., None, :] - intersection
    return intersection / jnp.maximum(union, 1e-9)


def level_points(shapes: Sequence[tuple[int, int]], strides: Sequence[int]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Points (N, 2), sizes (N,) and regression ranges (N,) x 2 of all levels, in the order
    of the flattened head outputs (level, then row, then column)."""
    points, sizes, lower, upper = [], [], [], []
    for level, ((h, w), s) in enumerate(zip(shapes, strides, strict=True)):
        ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        points.append(np.stack([xs.ravel(), ys.ravel()], axis=1) * float(s))
        n = h * w
        sizes.append(np.full(n, float(s)))
        lower.append(np.full(n, 0.0 if level == 0 else 4.0 * s))
        upper.append(np.full(n, np.inf if level == len(shapes) - 1 else 8.0 * s))
    cat = lambda xs: np.concatenate(xs).astype(np.float32)
    return cat(points), cat(sizes), cat(lower), cat(upper)


def decode(distances: jnp.ndarray, points: jnp.ndarray, sizes: jnp.ndarray) -> jnp.ndarray:
    """(..., N, 4) distances in units of the stride -> boxes x0, y0, x1, y1."""
    d = distances * sizes[..., None]
    return jnp.concatenate([points - d[..., :2], points + d[..., 2:]], axis=-1)


def flatten_levels(outputs: dict[str, list[jnp.ndarray]]) -> tuple[jnp.ndarray, ...]:
    """Per-level head outputs -> (cls (B, N, K), distances (B, N, 4), centerness (B, N))."""
    flat = lambda xs: jnp.concatenate([x.reshape(x.shape[0], -1, x.shape[-1]) for x in xs],
                                      axis=1)
    return (flat(outputs["cls_logits"]), flat(outputs["box_regression"]),
            flat(outputs["centerness"])[..., 0])


# ---------------------------------------------------------------------------------------------
# COCO evaluation.


def coco_map(ground_truth: Sequence[tuple[np.ndarray, np.ndarray]],
             detections: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
             class_names: Sequence[str]) -> dict[str, float]:
    """COCO box AP by pycocotools: ground_truth[i] = (boxes xyxy, classes) of image i,
    detections[i] = (boxes xyxy, scores, classes)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(box: np.ndarray) -> list[float]:
        x0, y0, x1, y1 = (float(v) for v in box)
        return [x0, y0, x1 - x0, y1 - y0]

    annotations = []
    for image_id, (boxes, classes) in enumerate(ground_truth):
        for box, cls in zip(boxes, classes, strict=True):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(cls) + 1, "bbox": xywh(box),
                                "area": float(box_area(np.asarray(box))), "iscrowd": 0})
    results = [{"image_id": image_id, "category_id": int(cls) + 1, "bbox": xywh(box),
                "score": float(score)}
               for image_id, (boxes, scores, classes) in enumerate(detections)
               for box, score, cls in zip(boxes, scores, classes, strict=True)]
    empty = {"map": 0.0, "map50": 0.0, "map75": 0.0}
    if not annotations:
        return empty
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": [{"id": i} for i in range(len(ground_truth))],
                      "annotations": annotations,
                      "categories": [{"id": c + 1, "name": n} for c, n in enumerate(class_names)]}
        gt.createIndex()
        if not results:
            return {**empty, **{f"ap/{class_names[c]}": 0.0
                                for c in sorted({a["category_id"] - 1 for a in annotations})}}
        evaluation = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = evaluation.stats
    out = {"map": max(float(stats[0]), 0.0), "map50": max(float(stats[1]), 0.0),
           "map75": max(float(stats[2]), 0.0)}
    precision = evaluation.eval["precision"]  # (iou thresholds, recall, class, area, max dets)
    for k, category in enumerate(evaluation.params.catIds):
        p = precision[:, :, k, 0, -1]
        if (p > -1).any():
            out[f"ap/{class_names[category - 1]}"] = float(p[p > -1].mean())
    return out


class DetectionMetrics:
    """Keeps every real image's boxes and detections; COCO AP over the split at the end."""

    def __init__(self, class_names: list[str]):
        self.class_names = class_names
        self.ground_truth: list[tuple[np.ndarray, np.ndarray]] = []
        self.detections: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def update(self, arrays: dict[str, np.ndarray]) -> None:
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        for i in np.flatnonzero(arrays["mask"] > 0):
            gt, det = arrays["gt_mask"][i], arrays["valid"][i]
            self.ground_truth.append((arrays["gt_boxes"][i][gt], arrays["gt_classes"][i][gt]))
            self.detections.append((arrays["boxes"][i][det], arrays["scores"][i][det],
                                    arrays["classes"][i][det]))

    def result(self) -> dict[str, float]:
        return {**coco_map(self.ground_truth, self.detections, self.class_names),
                "examples": float(len(self.ground_truth))}


# ---------------------------------------------------------------------------------------------
# The task.


@register("detection")
class Detection(Task):
    """See the module docstring."""

    main_metric = "map"

    def __init__(self, info: DatasetInfo,
                 head_input: str | tuple[str, ...] | list[str] = ("stage_2", "stage_3",
                                                                   "stage_4"),
                 fpn_width: int = 256, head_convs: int = 4, gn_groups: int = 32,
                 strides: tuple[int, ...] | list[int] = (8, 16, 32, 64, 128),
                 center_sampling_radius: float = 1.5, score_threshold: float = 0.05,
                 nms_iou: float = 0.6, pre_nms_top_k: int = 1000, max_detections: int = 100,
                 boxes_key: str = "boxes", classes_key: str = "classes",
                 box_mask_key: str = "box_mask", show_threshold: float = 0.3):
        super().__init__(info)
        self.head_input = head_input if isinstance(head_input, str) else tuple(head_input)
        self.fpn_width, self.head_convs, self.gn_groups = fpn_width, head_convs, gn_groups
        self.strides = tuple(int(s) for s in strides)
        self.radius, self.score_threshold = center_sampling_radius, score_threshold
        self.nms_iou, self.pre_nms_top_k = nms_iou, pre_nms_top_k
        self.max_detections, self.show_threshold = max_detections, show_threshold
        self.boxes_key, self.classes_key, self.box_mask_key = boxes_key, classes_key, box_mask_key
        self.class_names = info.class_names(classes_key)
        self._postprocess = jax.jit(self.postprocess, static_argnums=1)

    @property
    def targets(self) -> tuple[str, ...]:
        return (self.boxes_key, self.classes_key, self.box_mask_key)

    @property
    def output_names(self) -> list[str]:
        return self.class_names

    def head(self, dtype: Any = jnp.float32) -> nn.Module:
        return FCOSHead(len(self.class_names), self.fpn_width, self.head_convs, self.gn_groups,
                        dtype)

    def _points(self, outputs: dict[str, list[jnp.ndarray]]) -> tuple[np.ndarray, ...]:
        shapes = [tuple(x.shape[1:3]) for x in outputs["cls_logits"]]
        if len(shapes) != len(self.strides):
            raise ValueError(f"The head gives {len(shapes)} levels but task.strides has "
                             f"{len(self.strides)}.")
        return level_points(shapes, self.strides)

    def match(self, points: jnp.ndarray, sizes: jnp.ndarray, lower: jnp.ndarray,
              upper: jnp.ndarray, boxes: jnp.ndarray, box_mask: jnp.ndarray
              ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """(matched box index (B, N), foreground (B, N)); see the module docstring."""
        centers = (boxes[..., :2] + boxes[..., 2:]) / 2  # (B, M, 2)
        near = jnp.max(jnp.abs(points[None, :, None] - centers[:, None]), axis=-1) < (
            self.radius * sizes[None, :, None])
        x, y = points[None, :, None, 0], points[None, :, None, 1]
        distances = jnp.stack([x - boxes[:, None, :, 0], y - boxes[:, None, :, 1],
                               boxes[:, None, :, 2] - x, boxes[:, None, :, 3] - y], axis=-1)
        farthest = distances.max(axis=-1)
        candidate = (near & (distances.min(axis=-1) > 0) & box_mask[:, None, :]
                     & (farthest > lower[None, :, None]) & (farthest < upper[None, :, None]))
        # The smallest box wins (torchvision's 1e8 - area ranking, in float32 as there).
        rank = candidate.astype(jnp.float32) * (1e8 - box_area(boxes))[:, None, :]
        return jnp.argmax(rank, axis=-1), rank.max(axis=-1) > 1e-5

    def loss_terms(self, outputs: dict[str, list[jnp.ndarray]], batch: Batch
                   ) -> dict[str, jnp.ndarray]:
        """Summed focal, GIoU and centerness losses and the foreground count of a batch."""
        points, sizes, lower, upper = (jnp.asarray(a) for a in self._points(outputs))
        logits, distances, centerness = flatten_levels(outputs)
        boxes = batch[self.boxes_key].astype(jnp.float32)
        classes = batch[self.classes_key].astype(jnp.int32)
        box_mask = batch[self.box_mask_key].astype(bool)
        matched, foreground = self.match(points, sizes, lower, upper, boxes, box_mask)
        target_boxes = jnp.take_along_axis(boxes, matched[..., None], axis=1)
        target_classes = jnp.take_along_axis(classes, matched, axis=1)
        fg = foreground.astype(jnp.float32)
        onehot = jax.nn.one_hot(target_classes, logits.shape[-1]) * fg[..., None]
        focal = optax.sigmoid_focal_loss(logits, onehot, alpha=0.25, gamma=2.0).sum()
        predicted = decode(distances, points, sizes)
        giou = jnp.sum((1 - generalized_iou(predicted, target_boxes)) * fg)
        # Regression targets in units of the stride; only foreground points are read.
        x, y = points[None, :, 0], points[None, :, 1]
        left, top = x - target_boxes[..., 0], y - target_boxes[..., 1]
        right, bottom = target_boxes[..., 2] - x, target_boxes[..., 3] - y
        safe = lambda num, den: jnp.where(foreground, num / jnp.where(foreground, den, 1), 0)
        ctr_target = jnp.sqrt(jnp.clip(
            safe(jnp.minimum(left, right), jnp.maximum(left, right))
            * safe(jnp.minimum(top, bottom), jnp.maximum(top, bottom)), 0))
        ctr = jnp.sum(optax.sigmoid_binary_cross_entropy(centerness, ctr_target) * fg)
        return {"classification": focal, "bbox_regression": giou, "bbox_ctrness": ctr,
                "num_foreground": fg.sum()}

    def loss(self, outputs: dict[str, list[jnp.ndarray]], batch: Batch) -> jnp.ndarray:
        terms = self.loss_terms(outputs, batch)
        total = terms["classification"] + terms["bbox_regression"] + terms["bbox_ctrness"]
        return total / jnp.maximum(terms["num_foreground"], 1.0)

    def postprocess(self, outputs: dict[str, list[jnp.ndarray]], image_hw: tuple[int, int]
                    ) -> dict[str, jnp.ndarray]:
        """Detections per image: boxes (B, D, 4), scores, classes, valid (see the docstring)."""
        points, sizes, _, _ = (jnp.asarray(a) for a in self._points(outputs))
        logits, distances, centerness = flatten_levels(outputs)
        scores = jnp.sqrt(jax.nn.sigmoid(logits) * jax.nn.sigmoid(centerness)[..., None])
        num_classes = logits.shape[-1]
        k = min(self.pre_nms_top_k, scores.shape[1] * num_classes)
        top, index = jax.lax.top_k(scores.reshape(scores.shape[0], -1), k)
        point, cls = index // num_classes, index % num_classes
        boxes = decode(jnp.take_along_axis(distances, point[..., None], axis=1), points[point],
                       sizes[point])
        h, w = image_hw
        boxes = jnp.clip(boxes, 0, jnp.asarray([w, h, w, h], jnp.float32))
        overlap = (pairwise_iou(boxes, boxes) > self.nms_iou) & (
            cls[:, :, None] == cls[:, None, :])
        earlier = jnp.arange(k)[:, None] < jnp.arange(k)[None, :]  # [j, i]: j before i

        def suppress(i: int, keep: jnp.ndarray) -> jnp.ndarray:
            beaten = jnp.any(keep & overlap[:, :, i] & earlier[None, :, i], axis=1)
            return keep.at[:, i].set(keep[:, i] & ~beaten)

        keep = jax.lax.fori_loop(0, k, suppress, top > self.score_threshold)
        d = min(self.max_detections, k)
        best, order = jax.lax.top_k(jnp.where(keep, top, -1.0), d)
        take = lambda x: jnp.take_along_axis(x, order if x.ndim == 2 else order[..., None],
                                             axis=1)
        return {"boxes": take(boxes), "scores": best, "classes": take(cls), "valid": best >= 0}

    def eval_outputs(self, outputs: dict[str, list[jnp.ndarray]], batch: Batch
                     ) -> dict[str, jnp.ndarray]:
        detections = self.postprocess(outputs, batch["image"].shape[1:3])
        return {**detections, "gt_boxes": batch[self.boxes_key],
                "gt_classes": batch[self.classes_key], "gt_mask": batch[self.box_mask_key],
                "mask": eval_mask(batch, batch[self.boxes_key])}

    def metrics(self) -> Any:
        return DetectionMetrics(self.class_names)

    def parse_input(self, text: str) -> dict[str, Any]:
        return {"image": read_image_file(text)}

    def detections(self, outputs: Any, batch: Batch) -> list[list[tuple]]:
        """Per image, (class, score, box) of the detections scoring >= show_threshold."""
        found = jax.device_get(self._postprocess(outputs, tuple(batch["image"].shape[1:3])))
        per_image = []
        for i in range(len(found["scores"])):
            keep = found["valid"][i] & (found["scores"][i] >= self.show_threshold)
            per_image.append([(int(c), float(s), b.tolist()) for c, s, b in zip(
                found["classes"][i][keep], found["scores"][i][keep], found["boxes"][i][keep],
                strict=True)])
        return per_image

    def describe(self, outputs: Any, batch: Batch, top: int = 3) -> list[str]:
        """'Trouser 0.93 [12,3,40,60] | Bag 0.71 [...]' (best first), or 'no objects'."""
        lines = []
        for found in self.detections(outputs, batch):
            shown = [f"{self.class_names[c]} {s:.2f} [{','.join(f'{v:.0f}' for v in b)}]"
                     for c, s, b in found[:max(top, 1)]]
            lines.append(" | ".join(shown) if shown else
                         f"no objects (score >= {self.show_threshold})")
        return lines

    def render(self, outputs: Any, batch: Batch, images: list[np.ndarray]) -> list[np.ndarray]:
        """Each input image with its detections drawn (boxes scaled from the model's input);
        images under 256 px are enlarged (nearest) by a whole factor so labels stay legible."""
        from PIL import Image, ImageDraw

        from tljax.tasks.segmentation import class_color

        hw = batch["image"].shape[1:3]
        pictures = []
        for image, found in zip(images, self.detections(outputs, batch), strict=True):
            rgb = displayable(image)
            zoom = max(1, -(-256 // max(rgb.shape[:2])))
            rgb = np.repeat(np.repeat(rgb, zoom, axis=0), zoom, axis=1)
            picture = Image.fromarray(rgb)
            draw = ImageDraw.Draw(picture)
            sx, sy = rgb.shape[1] / hw[1], rgb.shape[0] / hw[0]
            for c, s, (x0, y0, x1, y1) in found:
                color = tuple(int(v) for v in class_color(c + 1))
                draw.rectangle([x0 * sx, y0 * sy, x1 * sx - 1, y1 * sy - 1], outline=color)
                draw.text((x0 * sx + 1, y0 * sy), f"{self.class_names[c]} {s:.2f}", fill=color)
            pictures.append(np.asarray(picture))
        return pictures
