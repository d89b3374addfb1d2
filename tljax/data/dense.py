"""Dense targets: per-pixel masks and boxes, their sources and the ops that keep them aligned.

The keys of a dense example (chosen so that the pipeline's padding flag 'mask' stays free):

    image         uint8 HWC (or float32 HWC intensities for medical volumes)
    segmentation  int (H, W): a class id per pixel; IGNORE (255) marks unlabelled pixels
    boxes         float32 (N, 4): x0, y0, x1, y1 in pixels of the image, continuous
                  coordinates (a box over pixel columns a..b has x0 = a, x1 = b + 1)
    classes       int (N,): the class of each box, 0..K-1 (no background class)
    box_mask      bool (M,): real boxes after `pad_boxes(M)` (boxes and classes padded)

Geometric ops move every one of them with the image:

    resize_dense(size)          image bilinear, segmentation nearest, boxes scaled
    random_crop_dense(size)     one random window for all; boxes clipped to it, and a box
    central_crop_dense(size)    left with no area inside dropped (with its class)
    flip_lr_dense()             mirrored with probability 1/2: x -> W - x, x0 and x1 swap
    pad_boxes(max_boxes)        boxes/classes padded to a fixed count, plus 'box_mask'

Nearest-neighbour resizing samples the source pixel whose centre is nearest to each target
pixel's centre (index floor((i + 0.5) * in / out)), the convention of PIL's bilinear image
resize, so masks stay on their pixels.

Sources (see `register_source`):

    coco:/images,/train.json[,/images2,/test.json[,/images3,/val.json]]
        COCO detection JSON; the pairs are the splits train, test, val in that order. Class
        names: the first file's categories sorted by id (ids renumbered 0..K-1); the other
        files must list the same categories. Crowd annotations (iscrowd=1) and boxes without
        area are left out. Examples: image, boxes, classes, image_id.
    segfolder:/root
        root/<split>/images/NAME.png|jpg and root/<split>/masks/NAME.png (same stem), one
        class id per mask pixel (8-bit gray or palette PNG; 255 = ignore). Class names from
        root/classes.txt (line i names class i), else '0'..'N' for the largest id in train.
    fashion_scenes
        the offline composition set built by `tools/prepare_data.py fashion_scenes` (see
        `tljax.data.scenes`): both segmentation and boxes for every image.
    TFDS datasets with objects (`coco/2017`, `voc/2007`; prepared online): their
        `objects` sequence (normalised ymin, xmin, ymax, xmax boxes and a ClassLabel) is
        described as `boxes` / `classes` features with the class names, and the op
        `tfds_objects()` turns an example's objects into these keys. `oxford_iiit_pet`'s
        trimap becomes a `segmentation` with `pet_trimap()` (name the classes with the
        segmentation task's `class_names=('background', 'pet')`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tljax.data.preprocess import (
    Example,
    ExampleOp,
    _check_fits,
    _hw,
    decode_image,
    register,
    resize_image,
)
from tljax.data.sources import (
    DatasetInfo,
    DatasetNotPreparedError,
    Feature,
    register_source,
    resolve_data_dir,
    select_split,
)
from tljax.errors import InputError

IGNORE = 255
SEGMENTATION, BOXES, CLASSES, BOX_MASK = "segmentation", "boxes", "classes", "box_mask"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")

# ---------------------------------------------------------------------------------------------
# Geometry.


def resize_nearest(array: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of the first two axes (pixel-centre convention)."""
    h, w = array.shape[:2]
    if (h, w) == hw:
        return array
    rows = np.minimum(((np.arange(hw[0]) + 0.5) * h / hw[0]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(hw[1]) + 0.5) * w / hw[1]).astype(np.int64), w - 1)
    return array[rows[:, None], cols[None, :]]


def crop_boxes(example: Example, top: int, left: int, h: int, w: int) -> Example:
    """Boxes shifted into a crop window and clipped to it; boxes left without area dropped."""
    if BOXES not in example:
        return example
    boxes = np.asarray(example[BOXES], np.float32).reshape(-1, 4) - np.float32(
        [left, top, left, top])
    boxes = np.clip(boxes, 0, np.float32([w, h, w, h]))
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    out = {**example, BOXES: boxes[keep]}
    if CLASSES in example:
        out[CLASSES] = np.asarray(example[CLASSES]).reshape(-1)[keep]
    return out


def _crop_all(example: Example, top: int, left: int, h: int, w: int) -> Example:
    out = {**example, "image": example["image"][top:top + h, left:left + w]}
    if SEGMENTATION in example:
        out[SEGMENTATION] = example[SEGMENTATION][top:top + h, left:left + w]
    return crop_boxes(out, top, left, h, w)


@register("resize_dense")
def resize_dense(size: int | Sequence[int], method: str = "bilinear") -> ExampleOp:
    """Image (bilinear), segmentation (nearest) and boxes (scaled) to `size`."""
    hw = _hw(size)

    def op(example: Example, rng: np.random.Generator) -> Example:
        del rng
        image = example["image"]
        h, w = image.shape[:2]
        out = {**example, "image": resize_image(image, hw, method)}
        if SEGMENTATION in example:
            out[SEGMENTATION] = resize_nearest(np.asarray(example[SEGMENTATION]), hw)
        if BOXES in example:
            scale = np.float32([hw[1] / w, hw[0] / h, hw[1] / w, hw[0] / h])
            out[BOXES] = np.asarray(example[BOXES], np.float32).reshape(-1, 4) * scale
        return out

    return op


@register("random_crop_dense", random=True)
def random_crop_dense(size: int | Sequence[int]) -> ExampleOp:
    """One random `size` window for image, segmentation and boxes."""
    h, w = _hw(size)

    def op(example: Example, rng: np.random.Generator) -> Example:
        image = example["image"]
        _check_fits(image, h, w, "random_crop_dense", "resize_dense")
        top = int(rng.integers(0, image.shape[0] - h + 1))
        left = int(rng.integers(0, image.shape[1] - w + 1))
        return _crop_all(example, top, left, h, w)

    return op


@register("central_crop_dense")
def central_crop_dense(size: int | Sequence[int]) -> ExampleOp:
    h, w = _hw(size)

    def op(example: Example, rng: np.random.Generator) -> Example:
        del rng
        image = example["image"]
        _check_fits(image, h, w, "central_crop_dense", "resize_dense")
        return _crop_all(example, (image.shape[0] - h) // 2, (image.shape[1] - w) // 2, h, w)

    return op


@register("flip_lr_dense", random=True)
def flip_lr_dense() -> ExampleOp:
    """Mirrors image, segmentation and boxes left-right with probability 1/2."""

    def op(example: Example, rng: np.random.Generator) -> Example:
        if rng.random() >= 0.5:
            return example
        image = example["image"]
        out = {**example, "image": image[:, ::-1]}
        if SEGMENTATION in example:
            out[SEGMENTATION] = np.asarray(example[SEGMENTATION])[:, ::-1]
        if BOXES in example:
            boxes = np.asarray(example[BOXES], np.float32).reshape(-1, 4)
            width = np.float32(image.shape[1])
            out[BOXES] = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0],
                                   boxes[:, 3]], axis=1)
        return out

    return op


@register("pad_boxes")
def pad_boxes(max_boxes: int) -> ExampleOp:
    """boxes (max_boxes, 4), classes (max_boxes,) and box_mask; extra boxes are an error.

    An example without boxes (an image given to tools/predict.py) gets none."""

    def op(example: Example, rng: np.random.Generator) -> Example:
        del rng
        boxes = np.asarray(example.get(BOXES, np.zeros((0, 4))), np.float32).reshape(-1, 4)
        classes = np.asarray(example.get(CLASSES, np.zeros(0)), np.int32).reshape(-1)
        n = len(boxes)
        if n > max_boxes:
            raise ValueError(f"pad_boxes({max_boxes}): an image has {n} boxes; raise "
                             "max_boxes.")
        padded_boxes = np.zeros((max_boxes, 4), np.float32)
        padded_boxes[:n] = boxes
        padded_classes = np.zeros(max_boxes, np.int32)
        padded_classes[:n] = classes
        return {**example, BOXES: padded_boxes, CLASSES: padded_classes,
                BOX_MASK: np.arange(max_boxes) < n}

    return op


@register("tfds_objects")
def tfds_objects(key: str = "objects", drop_crowd: bool = True) -> ExampleOp:
    """TFDS `objects` (bbox normalised [ymin, xmin, ymax, xmax], label, is_crowd) -> boxes in
    pixels (x0, y0, x1, y1) and classes; crowd regions dropped unless drop_crowd=False."""

    def op(example: Example, rng: np.random.Generator) -> Example:
        del rng
        objects = example[key]
        h, w = example["image"].shape[:2]
        bbox = np.asarray(objects["bbox"], np.float32).reshape(-1, 4)
        keep = np.ones(len(bbox), bool)
        if drop_crowd and "is_crowd" in objects:
            keep &= ~np.asarray(objects["is_crowd"], bool).reshape(-1)
        boxes = bbox[:, [1, 0, 3, 2]] * np.float32([w, h, w, h])
        out = {k: v for k, v in example.items() if k != key}
        out[BOXES] = boxes[keep]
        out[CLASSES] = np.asarray(objects["label"], np.int64).reshape(-1)[keep]
        return out

    return op


@register("pet_trimap")
def pet_trimap(key: str = "segmentation_mask", border: int = IGNORE) -> ExampleOp:
    """oxford_iiit_pet's trimap (1 pet, 2 background, 3 border) -> segmentation 0 background,
    1 pet, `border` for the border pixels (ignored by default)."""

    def op(example: Example, rng: np.random.Generator) -> Example:
        del rng
        trimap = np.asarray(example[key]).reshape(example[key].shape[:2])
        mapped = np.select([trimap == 1, trimap == 2], [1, 0], border).astype(np.uint8)
        out = {k: v for k, v in example.items() if k != key}
        out[SEGMENTATION] = mapped
        return out

    return op


def tfds_dense_features(features: Any) -> dict[str, Feature]:
    """`boxes` and `classes` features for a TFDS FeaturesDict whose `objects` sequence holds
    a `bbox` and a ClassLabel `label` (COCO, VOC); {} otherwise."""
    import tensorflow_datasets as tfds

    objects = features["objects"] if "objects" in features else None
    inner = getattr(objects, "feature", None)
    if not isinstance(inner, tfds.features.FeaturesDict) or not {"bbox", "label"} <= set(inner):
        return {}
    label = inner["label"]
    if not isinstance(label, tfds.features.ClassLabel):
        return {}
    return {BOXES: Feature("boxes"), CLASSES: Feature("box_classes", tuple(label.names))}


# ---------------------------------------------------------------------------------------------
# Reading masks.


def read_mask(path: Path) -> np.ndarray:
    """A mask PNG as uint8 class ids: gray values or palette indices (never RGB colours)."""
    with Image.open(path) as im:
        if im.mode not in ("L", "P"):
            raise InputError(f"Mask {path} is a {im.mode} image; masks must be 8-bit gray or "
                             "palette PNGs holding class ids.")
        return np.asarray(im).copy()


# ---------------------------------------------------------------------------------------------
# COCO JSON.


def _load_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise InputError(f"No COCO annotation file {path}.") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON ({e}).") from None


class CocoSource(Sequence):
    """Images of one COCO JSON file (sorted by id) with their boxes and classes."""

    def __init__(self, images_dir: Path, annotations: dict[str, Any], category_ids: list[int],
                 masks_dir: Path | None = None):
        self._dir, self._masks = images_dir, masks_dir
        index = {c: i for i, c in enumerate(category_ids)}
        self._images = sorted(annotations.get("images", []), key=lambda im: im["id"])
        per_image: dict[int, list] = {im["id"]: [] for im in self._images}
        for ann in annotations.get("annotations", []):
            x, y, w, h = ann["bbox"]
            if ann.get("iscrowd", 0) or w <= 0 or h <= 0 or ann["image_id"] not in per_image:
                continue
            per_image[ann["image_id"]].append((x, y, x + w, y + h, index[ann["category_id"]]))
        self._boxes = [np.asarray([b[:4] for b in per_image[im["id"]]], np.float32).reshape(-1, 4)
                       for im in self._images]
        self._classes = [np.asarray([b[4] for b in per_image[im["id"]]], np.int64)
                         for im in self._images]

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        entry = self._images[i]
        path = self._dir / entry["file_name"]
        if not path.exists():
            raise InputError(f"Image {path} listed in the COCO annotations does not exist.")
        example = {"image": decode_image(path), BOXES: self._boxes[i],
                   CLASSES: self._classes[i], "image_id": int(entry["id"])}
        if self._masks is not None:
            example[SEGMENTATION] = read_mask(self._masks / (Path(entry["file_name"]).stem
                                                             + ".png"))
        return example


def _categories(annotations: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    categories = sorted(annotations.get("categories", []), key=lambda c: c["id"])
    if not categories:
        raise InputError(f"{path} lists no categories.")
    return categories


def coco_splits(pairs: Sequence[tuple[Path, Path]], masks: Sequence[Path | None] | None = None
                ) -> tuple[list[str], dict[str, CocoSource]]:
    """(class names, {split: source}) of (images_dir, annotations.json) pairs."""
    names = ("train", "test", "val")
    if not 1 <= len(pairs) <= len(names):
        raise InputError("coco: expects 1 to 3 pairs /images_dir,/annotations.json "
                         "(train, then test, then val).")
    loaded = [_load_json(ann) for _, ann in pairs]
    categories = _categories(loaded[0], pairs[0][1])
    ids = [c["id"] for c in categories]
    for (_, ann_path), ann in zip(pairs[1:], loaded[1:], strict=True):
        if [c["id"] for c in _categories(ann, ann_path)] != ids:
            raise InputError(f"{ann_path} lists other categories than {pairs[0][1]}; every "
                             "split must use the same category ids.")
    masks = masks or [None] * len(pairs)
    splits = {names[i]: CocoSource(images, ann, ids, mask_dir) for i, ((images, _), ann, mask_dir)
              in enumerate(zip(pairs, loaded, masks, strict=True))}
    return [c["name"] for c in categories], splits


def detection_features(class_names: Sequence[str], channels_hint: str = "image"
                       ) -> dict[str, Feature]:
    return {channels_hint: Feature("image"), BOXES: Feature("boxes"),
            CLASSES: Feature("box_classes", tuple(class_names))}


@register_source("coco", prefix=True)
def coco_source(argument: str, split: str, data_dir: str | None = None
                ) -> tuple[Sequence, DatasetInfo]:
    del data_dir
    parts = [p.strip() for p in argument.split(",") if p.strip()]
    if len(parts) % 2:
        raise InputError(f"coco:{argument}: give pairs /images_dir,/annotations.json "
                         "(train, then test).")
    pairs = [(Path(parts[i]).expanduser(), Path(parts[i + 1]).expanduser())
             for i in range(0, len(parts), 2)]
    class_names, splits = coco_splits(pairs)
    name = f"coco:{argument}"
    features = detection_features(class_names)
    features["image_id"] = Feature("int")
    return select_split(name, splits, split, lambda sizes: DatasetInfo(name, features, sizes))


# ---------------------------------------------------------------------------------------------
# Segmentation folders.


class SegFolderSource(Sequence):
    def __init__(self, images: list[Path], masks: list[Path]):
        self._images, self._masks = images, masks

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": decode_image(self._images[i]), SEGMENTATION: read_mask(self._masks[i])}


def _segfolder_split(split_dir: Path) -> SegFolderSource:
    images_dir, masks_dir = split_dir / "images", split_dir / "masks"
    if not images_dir.is_dir() or not masks_dir.is_dir():
        raise InputError(f"segfolder: {split_dir} needs images/ and masks/ subfolders "
                         "(masks/NAME.png for each images/NAME.png|jpg).")
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    masks = [masks_dir / f"{p.stem}.png" for p in images]
    missing = [m.name for m in masks if not m.exists()]
    if missing:
        raise InputError(f"segfolder: {len(missing)} images in {images_dir} have no mask in "
                         f"{masks_dir} (e.g. {missing[0]}).")
    return SegFolderSource(images, masks)


def segmentation_class_names(root: Path, train: SegFolderSource | None) -> list[str]:
    """root/classes.txt, else '0'..'N' for the largest class id in the train masks."""
    listing = root / "classes.txt"
    if listing.exists():
        return [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    if train is None:
        raise InputError(f"segfolder: {root} has no classes.txt and no train split to read "
                         "the class ids from.")
    largest = 0
    for mask in train._masks:
        ids = np.unique(read_mask(mask))
        ids = ids[ids != IGNORE]
        largest = max(largest, int(ids.max()) if ids.size else 0)
    return [str(i) for i in range(largest + 1)]


def segmentation_features(class_names: Sequence[str]) -> dict[str, Feature]:
    return {"image": Feature("image"), SEGMENTATION: Feature("segmentation", tuple(class_names))}


@register_source("segfolder", prefix=True)
def segfolder_source(argument: str, split: str, data_dir: str | None = None
                     ) -> tuple[Sequence, DatasetInfo]:
    del data_dir
    root = Path(argument).expanduser()
    if not root.is_dir():
        raise InputError(f"segfolder: no directory {root}.")
    splits = {p.name: _segfolder_split(p) for p in sorted(root.iterdir())
              if p.is_dir() and not p.name.startswith(".")}
    if not splits:
        raise InputError(f"segfolder: {root} has no split folders (root/train/images, "
                         "root/train/masks, ...).")
    class_names = segmentation_class_names(root, splits.get("train"))
    name = f"segfolder:{argument}"
    features = segmentation_features(class_names)
    return select_split(name, splits, split, lambda sizes: DatasetInfo(name, features, sizes))


# ---------------------------------------------------------------------------------------------
# The offline composition set.

SCENES = "fashion_scenes"


@register_source(SCENES)
def fashion_scenes_source(argument: str, split: str, data_dir: str | None = None
                          ) -> tuple[Sequence, DatasetInfo]:
    del argument
    data_dir = resolve_data_dir(data_dir)
    root = Path(data_dir) / SCENES
    if not (root / "manifest.json").exists():
        raise DatasetNotPreparedError(
            f"Dataset {SCENES!r} is not prepared in {data_dir}. Prepare it with: python "
            f"tools/prepare_data.py {SCENES} --data_dir={data_dir}")
    split_names = ("train", "test")
    pairs = [(root / s / "images", root / s / "annotations.json") for s in split_names]
    class_names, splits = coco_splits(pairs, [root / s / "masks" for s in split_names])
    features = {**detection_features(class_names),
                SEGMENTATION: Feature("segmentation", ("background", *class_names))}
    return select_split(SCENES, dict(splits), split,
                        lambda sizes: DatasetInfo(SCENES, features, sizes))
