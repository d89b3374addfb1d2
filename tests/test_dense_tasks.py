"""Segmentation and detection tasks: losses, matching, NMS and metrics on hand-checked cases;
COCO AP from the task equals pycocotools run on the same boxes as files."""

from __future__ import annotations

import contextlib
import io
import json

import jax.numpy as jnp
import numpy as np
import pytest

from tljax import tasks
from tljax.data import DatasetInfo, Feature
from tljax.tasks.detection import coco_map, generalized_iou, level_points
from tljax.tasks.segmentation import dice_loss, scores_from_confusion


def _segmentation(**options):
    info = DatasetInfo("t", {"segmentation": Feature("segmentation", ("bg", "a", "b"))}, {})
    return tasks.build_task({"name": "segmentation", **options}, info)


def _detection(**options):
    info = DatasetInfo("t", {"classes": Feature("box_classes", ("a", "b"))}, {})
    return tasks.build_task({"name": "detection", **options}, info)


def test_segmentation_metrics_hand_checked():
    task = _segmentation()
    labels = np.array([[[0, 0, 1, 1], [0, 2, 2, 255]]])        # one image, 2 x 4
    predicted = np.array([[[0, 1, 1, 1], [0, 2, 0, 0]]])
    logits = jnp.asarray(np.eye(3)[predicted] * 5.0, jnp.float32)  # argmax = predicted
    batch = {"segmentation": jnp.asarray(labels), "mask": jnp.asarray([True])}
    metrics = task.metrics()
    metrics.update(task.eval_outputs(logits, batch))
    # A padding example must not count.
    metrics.update(task.eval_outputs(logits, {**batch, "mask": jnp.asarray([False])}))
    result = metrics.result()
    # Labelled pixels: 7 (255 ignored). bg: TP 2, FP 1 (the 2 predicted 0), FN 1 -> 2/4.
    # a: TP 2, FP 1, FN 0 -> 2/3. b: TP 1, FN 1 -> 1/2.
    assert result["iou/bg"] == pytest.approx(0.5)
    assert result["iou/a"] == pytest.approx(2 / 3)
    assert result["iou/b"] == pytest.approx(0.5)
    assert result["miou"] == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert result["pixel_accuracy"] == pytest.approx(5 / 7)
    assert result["dice"] == pytest.approx((4 / 6 + 4 / 5 + 2 / 3) / 3)
    assert result["examples"] == 1
    # All-background prediction: only bg has IoU (4/7), a and b are 0.
    baseline = scores_from_confusion(np.array([[4, 0, 0], [2, 0, 0], [1, 0, 0]]), ["bg", "a",
                                                                                  "b"])
    assert baseline["miou"] == pytest.approx(4 / 7 / 3)


def test_segmentation_loss_ignores_pixels_and_upsamples():
    task = _segmentation(loss="xent")
    labels = jnp.asarray([[[1, 1, 255, 255], [1, 1, 255, 255]]])
    logits = jnp.zeros((1, 1, 2, 3)).at[..., 1].set(2.0)   # half resolution, class a favoured
    expected = -np.log(np.exp(2) / (np.exp(2) + 2))
    assert float(task.loss(logits, {"segmentation": labels})) == pytest.approx(expected, 1e-5)


def test_dice_loss_hand_checked():
    labels = jnp.asarray([[0, 1, 1, 0]])
    valid = jnp.ones_like(labels, bool)
    perfect = jnp.asarray([[[9.0, -9], [-9, 9], [-9, 9], [9, -9]]])
    assert float(dice_loss(perfect, labels, valid)) == pytest.approx(0.0, abs=1e-3)
    # Uniform binary probabilities: foreground only, (2 * 1 + 1) / (2 + 2 + 1) = 0.6.
    assert float(dice_loss(jnp.zeros((1, 4, 2)), labels, valid)) == pytest.approx(0.4)


def test_fcos_matching_hand_checked():
    task = _detection()
    shapes = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]  # a 64 px image
    points, sizes, lower, upper = (jnp.asarray(a) for a in level_points(shapes, task.strides))
    assert points.shape == (86, 2) and points[9].tolist() == [8.0, 8.0]
    boxes = jnp.asarray([[[8, 8, 40, 40], [0, 0, 0, 0]]], jnp.float32)
    matched, foreground = task.match(points, sizes, lower, upper, boxes,
                                     jnp.asarray([[True, False]]))
    # Inside the box and within 1.5 * 8 = 12 px of its centre (24, 24): x, y in {16, 24, 32}
    # on P3; the largest distance (<= 24) is below P3's upper bound 64.
    fg = [tuple(np.asarray(points[i]).tolist()) for i in np.flatnonzero(foreground[0])]
    assert fg == [(x, y) for y in (16.0, 24.0, 32.0) for x in (16.0, 24.0, 32.0)]
    assert set(np.asarray(matched[0])[np.asarray(foreground[0])]) == {0}


def test_giou_hand_checked():
    a = jnp.asarray([[0.0, 0, 2, 2]])
    b = jnp.asarray([[1.0, 1, 3, 3]])
    # IoU 1/7; enclosing 3x3 = 9, union 7: GIoU = 1/7 - 2/9.
    assert float(generalized_iou(a, b)[0]) == pytest.approx(1 / 7 - 2 / 9, 1e-6)


def _outputs(predictions: list[tuple[int, int, int, list[float]]]):
    """Head outputs on a 16 px image (levels 2x2, 1x1 x 4) with chosen points predicting."""
    shapes = [(2, 2), (1, 1), (1, 1), (1, 1), (1, 1)]
    cls = [np.full((1, h, w, 2), -20.0, np.float32) for h, w in shapes]
    reg = [np.zeros((1, h, w, 4), np.float32) for h, w in shapes]
    ctr = [np.full((1, h, w, 1), 20.0, np.float32) for h, w in shapes]
    for y, x, c, (logit, *distances) in predictions:
        cls[0][0, y, x, c] = logit
        reg[0][0, y, x] = distances
    return {"cls_logits": cls, "box_regression": reg, "centerness": ctr}


def test_postprocess_nms_is_class_wise():
    task = _detection(score_threshold=0.05, nms_iou=0.5, max_detections=5)
    # Points (0, 0), (8, 0), (0, 8) of stride 8; distances in strides.
    outputs = _outputs([(0, 0, 0, [3.0, 0, 0, 1, 1]),     # class a, box (0, 0, 8, 8)
                        (0, 1, 0, [2.0, 1, 0, 0.1, 1]),   # class a, box (0, 0, 8.8, 8): dup
                        (1, 0, 1, [1.0, 0, 1, 1, 0])])    # class b, box (0, 0, 8, 8)
    found = task.postprocess(outputs, (16, 16))
    valid = np.asarray(found["valid"][0])
    assert valid.sum() == 2
    assert np.asarray(found["classes"][0])[valid].tolist() == [0, 1]
    np.testing.assert_allclose(np.asarray(found["boxes"][0])[valid], [[0, 0, 8, 8]] * 2,
                               atol=1e-6)
    scores = np.asarray(found["scores"][0])[valid]
    expected = np.sqrt(1 / (1 + np.exp(-np.array([3.0, 1.0]))) / (1 + np.exp(-20.0)))
    np.testing.assert_allclose(scores, expected, rtol=1e-6)


def test_detection_loss_prefers_the_right_box():
    task = _detection()
    batch = {"boxes": jnp.asarray([[[0.0, 0, 16, 16]]]), "classes": jnp.asarray([[1]]),
             "box_mask": jnp.asarray([[True]]), "image": jnp.zeros((1, 16, 16, 3))}
    # Point (8, 8) (row 1, col 1) is the one match; distances 1 stride each way hit the box.
    right = _outputs([(1, 1, 1, [5.0, 1, 1, 1, 1])])
    wrong = _outputs([(1, 1, 0, [5.0, 0.2, 0.2, 0.2, 0.2])])
    terms = task.loss_terms(right, batch)
    assert float(terms["num_foreground"]) == 1
    assert float(terms["bbox_regression"]) == pytest.approx(0.0, abs=1e-5)
    assert float(task.loss(right, batch)) < float(task.loss(wrong, batch))


def test_map_equals_pycocotools_on_a_known_fixture(tmp_path):
    """Class a: one box found exactly (AP 1). Class b: two boxes; detections: a false
    positive (0.95) then one of them (0.8): precision 1/2 up to recall 1/2, so COCO's
    101-point AP is 51 * 0.5 / 101 at every IoU threshold. mAP = (1 + 25.5/101) / 2."""
    known = (1 + 25.5 / 101) / 2
    m = 6  # padded box count, as the eval batches have them
    gt_boxes = np.zeros((2, m, 4), np.float32)
    gt_classes = np.zeros((2, m), np.int32)
    gt_mask = np.zeros((2, m), bool)
    gt_boxes[0, 0], gt_classes[0, 0], gt_mask[0, 0] = [10, 10, 30, 40], 0, True
    gt_boxes[1, :2], gt_classes[1, :2], gt_mask[1, :2] = [[0, 0, 20, 20], [40, 40, 60, 64]], 1, True
    boxes = np.zeros((2, m, 4), np.float32)
    scores = np.zeros((2, m), np.float32)
    classes = np.zeros((2, m), np.int32)
    valid = np.zeros((2, m), bool)
    boxes[0, 0], scores[0, 0], classes[0, 0], valid[0, 0] = [10, 10, 30, 40], 0.9, 0, True
    boxes[1, :2], scores[1, :2], classes[1, :2], valid[1, :2] = (
        [[100, 100, 120, 120], [0, 0, 20, 20]], [0.95, 0.8], 1, True)
    metrics = _detection().metrics()
    arrays = {"boxes": boxes, "scores": scores, "classes": classes, "valid": valid,
              "gt_boxes": gt_boxes, "gt_classes": gt_classes, "gt_mask": gt_mask,
              "mask": np.array([1.0, 1.0])}
    metrics.update(arrays)
    metrics.update({**arrays, "mask": np.array([0.0, 0.0])})  # padding: ignored
    result = metrics.result()
    assert result["examples"] == 2
    assert result["map"] == pytest.approx(known, abs=1e-6)
    assert result["ap/a"] == pytest.approx(1.0) and result["ap/b"] == pytest.approx(25.5 / 101)

    # pycocotools on the same boxes, written as COCO files.
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    xywh = lambda b: [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]
    gt = {"images": [{"id": 1}, {"id": 2}], "categories": [{"id": 1}, {"id": 2}],
          "annotations": [{"id": k + 1, "image_id": i + 1, "category_id": int(c) + 1,
                           "bbox": xywh(b), "area": float((b[2] - b[0]) * (b[3] - b[1])),
                           "iscrowd": 0}
                          for k, (i, b, c) in enumerate(
                              (i, gt_boxes[i, j], gt_classes[i, j]) for i in range(2)
                              for j in range(m) if gt_mask[i, j])]}
    dt = [{"image_id": i + 1, "category_id": int(classes[i, j]) + 1, "bbox": xywh(boxes[i, j]),
           "score": float(scores[i, j])} for i in range(2) for j in range(m) if valid[i, j]]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(dt))
    with contextlib.redirect_stdout(io.StringIO()):
        reference = COCO(str(tmp_path / "gt.json"))
        evaluation = COCOeval(reference, reference.loadRes(str(tmp_path / "dt.json")), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    assert result["map"] == pytest.approx(evaluation.stats[0], abs=1e-12)
    assert result["map50"] == pytest.approx(evaluation.stats[1], abs=1e-12)
    # The empty prediction scores 0 (the detection baseline).
    assert coco_map([(gt_boxes[0][:1], gt_classes[0][:1])], [(np.zeros((0, 4)), np.zeros(0),
                                                             np.zeros(0))], ["a", "b"])["map"] == 0
