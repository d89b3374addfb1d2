"""Dense data: geometric ops keep image, mask and boxes aligned (hand-checked), sources."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tljax.data import Preprocess, get_source
from tljax.data.dense import resize_nearest
from tljax.errors import InputError


def _run(pp: str, example: dict, seed: int = 0) -> dict:
    return Preprocess(pp).example(example, np.random.default_rng(seed))


def _scene() -> dict:
    """A 10 (h) x 12 (w) image with two objects, their masks and boxes from the masks."""
    image = np.zeros((10, 12, 3), np.uint8)
    segmentation = np.zeros((10, 12), np.uint8)
    segmentation[2:5, 1:4] = 1   # rows 2-4, columns 1-3
    segmentation[6:9, 7:11] = 2  # rows 6-8, columns 7-10
    image[segmentation > 0] = 200
    return {"image": image, "segmentation": segmentation,
            "boxes": np.float32([[1, 2, 4, 5], [7, 6, 11, 9]]), "classes": np.int64([4, 7])}


def _extents(segmentation: np.ndarray, value: int) -> list[float]:
    ys, xs = np.nonzero(segmentation == value)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_flip_mirrors_boxes_with_the_pixels():
    out = _run("flip_lr_dense", _scene(), seed=2)
    assert np.random.default_rng(2).random() < 0.5  # this seed flips
    # Hand-checked: x -> 12 - x, x0 and x1 swap.
    np.testing.assert_array_equal(out["boxes"], [[8, 2, 11, 5], [1, 6, 5, 9]])
    for value, box in zip((1, 2), out["boxes"], strict=True):
        assert _extents(out["segmentation"], value) == list(box)
    np.testing.assert_array_equal(out["image"][..., 0] > 0, out["segmentation"] > 0)
    unflipped = next(s for s in range(100) if np.random.default_rng(s).random() >= 0.5)
    np.testing.assert_array_equal(_run("flip_lr_dense", _scene(), unflipped)["boxes"],
                                  _scene()["boxes"])


def test_resize_scales_boxes_and_keeps_mask_labels():
    out = _run("resize_dense((20, 24))", _scene())
    np.testing.assert_array_equal(out["boxes"], [[2, 4, 8, 10], [14, 12, 22, 18]])
    assert out["image"].shape == (20, 24, 3) and out["segmentation"].shape == (20, 24)
    assert set(np.unique(out["segmentation"])) == {0, 1, 2}  # nearest: no blended labels
    for value, box in zip((1, 2), out["boxes"], strict=True):
        assert _extents(out["segmentation"], value) == list(box)
    # Nearest sampling by pixel centres: a 2x2 mask to 4x4 is blocks, 4x4 to 2x2 the centres.
    np.testing.assert_array_equal(resize_nearest(np.array([[0, 1], [2, 3]]), (4, 4)),
                                  [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
    np.testing.assert_array_equal(resize_nearest(np.arange(16).reshape(4, 4), (2, 2)),
                                  [[5, 7], [13, 15]])


def test_crops_clip_boxes_and_drop_those_left_outside():
    scene = _scene()
    out = _run("central_crop_dense((6, 8))", scene)  # rows 2..7, columns 2..9
    # Object 1 (columns 1-3, rows 2-4) is cut to columns 2-3; object 2 to rows 6-7, cols 7-9.
    np.testing.assert_array_equal(out["boxes"], [[0, 0, 2, 3], [5, 4, 8, 6]])
    np.testing.assert_array_equal(out["classes"], [4, 7])
    for value, box in zip((1, 2), out["boxes"], strict=True):
        assert _extents(out["segmentation"], value) == list(box)
    # A window holding only object 2: object 1 goes, with its class.
    for seed in range(20):
        out = _run("random_crop_dense((4, 5))", scene, seed)
        assert out["image"].shape[:2] == (4, 5) and len(out["boxes"]) == len(out["classes"])
        present = [v for v in (1, 2) if (out["segmentation"] == v).any()]
        assert [int(c) for c in out["classes"]] == [{1: 4, 2: 7}[v] for v in present]
        for value, box in zip(present, out["boxes"], strict=True):
            assert _extents(out["segmentation"], value) == list(box)


def test_pad_boxes_fixed_count_with_mask():
    out = _run("pad_boxes(4)", _scene())
    assert out["boxes"].shape == (4, 4) and out["classes"].tolist() == [4, 7, 0, 0]
    assert out["box_mask"].tolist() == [True, True, False, False]
    with pytest.raises(ValueError, match="raise max_boxes"):
        _run("pad_boxes(1)", _scene())
    batch = Preprocess("pad_boxes(3)")([_scene(), {**_scene(), "boxes": np.zeros((0, 4)),
                                                   "classes": np.zeros(0)}],
                                       np.random.default_rng(0))
    assert batch["boxes"].shape == (2, 3, 4) and batch["box_mask"].sum() == 2
    with pytest.raises(ValueError, match="pad_boxes"):  # ragged boxes cannot be batched
        Preprocess("drop('classes')")([_scene(), {**_scene(), "boxes": np.zeros((1, 4))}],
                                      np.random.default_rng(0))


def _write_coco(tmp_path, name: str, categories: list[dict]) -> tuple[str, str]:
    images = tmp_path / f"{name}_images"
    images.mkdir()
    Image.fromarray(np.full((8, 10, 3), 50, np.uint8)).save(images / "a.png")
    Image.fromarray(np.full((8, 10, 3), 90, np.uint8)).save(images / "b.png")
    annotations = {
        "images": [{"id": 7, "file_name": "b.png"}, {"id": 3, "file_name": "a.png"}],
        "annotations": [
            {"id": 1, "image_id": 3, "category_id": 18, "bbox": [1, 2, 3, 4], "iscrowd": 0},
            {"id": 2, "image_id": 3, "category_id": 5, "bbox": [0, 0, 5, 5], "iscrowd": 0},
            {"id": 3, "image_id": 7, "category_id": 5, "bbox": [0, 0, 9, 9], "iscrowd": 1},
            {"id": 4, "image_id": 7, "category_id": 18, "bbox": [2, 2, 0, 4], "iscrowd": 0}],
        "categories": categories}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(annotations))
    return str(images), str(path)


def test_coco_source(tmp_path):
    categories = [{"id": 18, "name": "dog"}, {"id": 5, "name": "bicycle"}]
    train = _write_coco(tmp_path, "train", categories)
    test = _write_coco(tmp_path, "test", categories)
    source, info = get_source(f"coco:{','.join(train + test)}", "train")
    assert info.class_names("classes") == ["bicycle", "dog"]  # sorted by category id
    assert info.split_sizes["test"] == 2
    first, second = source[0], source[1]  # sorted by image id: a.png (3), then b.png (7)
    assert first["image_id"] == 3 and first["image"][0, 0, 0] == 50
    np.testing.assert_array_equal(first["boxes"], [[1, 2, 4, 6], [0, 0, 5, 5]])
    assert first["classes"].tolist() == [1, 0]
    assert second["boxes"].shape == (0, 4)  # the crowd region and the empty box are left out
    other = _write_coco(tmp_path, "other", [{"id": 1, "name": "cat"}])
    with pytest.raises(InputError, match="other categories"):
        get_source(f"coco:{','.join(train + other)}", "train")


def test_segfolder_source(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split / "images").mkdir(parents=True)
        (tmp_path / split / "masks").mkdir(parents=True)
        mask = np.zeros((6, 6), np.uint8)
        mask[1:3, 1:3] = 2
        mask[5, 5] = 255
        Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(tmp_path / split / "images" / "x.jpg")
        palette = Image.fromarray(mask, mode="P")
        palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
        palette.save(tmp_path / split / "masks" / "x.png")
    source, info = get_source(f"segfolder:{tmp_path}", "train")
    assert info.class_names("segmentation") == ["0", "1", "2"]  # from the largest id
    np.testing.assert_array_equal(source[0]["segmentation"], mask)  # palette indices
    (tmp_path / "classes.txt").write_text("background\ncat\ndog\n")
    _, info = get_source(f"segfolder:{tmp_path}", "test")
    assert info.class_names("segmentation") == ["background", "cat", "dog"]
    (tmp_path / "test" / "images" / "y.png").write_bytes(
        (tmp_path / "test" / "masks" / "x.png").read_bytes())
    with pytest.raises(InputError, match="have no mask"):
        get_source(f"segfolder:{tmp_path}", "test")


def test_fashion_scenes_build_is_the_published_set(tmp_path):
    """Seeded and machine-independent: the build reproduces the recorded SHA-256 (it checks
    itself), boxes are the extents of the masks, and the sources read it back."""
    from tljax.data import prepare, scenes

    if not all(p.exists() for pair in prepare.fashion_mnist_files().values() for p in pair):
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    prepare.prepare("fashion_scenes", str(tmp_path))
    manifest = json.loads((tmp_path / "fashion_scenes" / "manifest.json").read_text())
    assert manifest["sha256"] == scenes.SHA256
    source, info = get_source("fashion_scenes", "test[:50]", str(tmp_path))
    assert info.split_sizes == {"train": 2000, "test": 500, "test[:50]": 50}
    assert info.class_names("segmentation")[0] == "background"
    for example in source:
        for box, cls in zip(example["boxes"], example["classes"], strict=True):
            assert _extents(example["segmentation"][int(box[1]):int(box[3]),
                                                    int(box[0]):int(box[2])], cls + 1) == [
                0, 0, box[2] - box[0], box[3] - box[1]]


def test_tfds_objects_and_pet_trimap():
    tfds = pytest.importorskip("tensorflow_datasets")
    from tljax.data.dense import tfds_dense_features

    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(),
        "objects": tfds.features.Sequence({"bbox": tfds.features.BBoxFeature(),
                                           "label": tfds.features.ClassLabel(names=["a", "b"]),
                                           "is_crowd": np.bool_})})
    described = tfds_dense_features(features)
    assert described["classes"].names == ("a", "b") and described["boxes"].kind == "boxes"
    example = {"image": np.zeros((10, 20, 3), np.uint8),
               "objects": {"bbox": np.float32([[0.1, 0.25, 0.5, 1.0], [0, 0, 1, 1]]),
                           "label": np.int64([1, 0]), "is_crowd": np.array([False, True])}}
    out = _run("tfds_objects", example)
    # ymin 0.1, xmin 0.25, ymax 0.5, xmax 1.0 of a 10 x 20 image; the crowd box is left out.
    np.testing.assert_allclose(out["boxes"], [[5, 1, 20, 5]])
    assert out["classes"].tolist() == [1] and "objects" not in out
    trimap = np.array([[1, 2], [3, 1]], np.uint8)[..., None]
    out = _run("pet_trimap", {"image": np.zeros((2, 2, 3), np.uint8),
                              "segmentation_mask": trimap})
    np.testing.assert_array_equal(out["segmentation"], [[1, 0], [255, 1]])
