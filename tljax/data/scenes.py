"""`fashion_scenes`: a seeded composition of real Fashion-MNIST images into small scenes.

No real box- or mask-annotated dataset ships with any package this project can install
offline, so this set is *composed* from real images: Fashion-MNIST items (from Debian's
`dataset-fashion-mnist`, IDX order) are scaled, tinted and placed on larger canvases. It is a
composition of real images for trying the dense tasks end to end, not a detection or
segmentation benchmark.

The rules (all draws from `numpy.random.default_rng(SEED + split index)`; pure integer and
float64 arithmetic, so the pixels are identical on every machine):

* canvas CANVAS x CANVAS RGB; background: a uniform gray level in 0..60 plus Gaussian noise
  (sigma 8), clipped to 0..255;
* 1..3 items per scene, each a random Fashion-MNIST image of the split's pool (train items
  for the train scenes, test items for the test scenes), scaled by 0.8..1.6 (bilinear, 22..45
  px), tinted by a random colour with channels in 100..255 and alpha-blended by its own
  intensity (alpha = pixel / 255);
* an item's mask is its pixels brighter than MASK_THRESHOLD (of 255); its box is the extent
  of that mask ([x0, y0, x1, y1), continuous pixel coordinates); an item whose box would
  overlap an earlier one is placed again (20 tries, then left out), so masks never occlude;
* segmentation: 0 background, 1 + Fashion-MNIST class for item pixels.

Written as `segfolder`/`coco` layouts under data_dir/fashion_scenes:
{train,test}/images/NNNNN.png, {train,test}/masks/NNNNN.png, {train,test}/annotations.json,
classes.txt (segmentation names) and manifest.json (the rules' parameters and a SHA-256 of
every split's pixels, masks and boxes).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

SEED = 20240901
CANVAS = 64
SIZES = {"train": 2000, "test": 500}
MASK_THRESHOLD = 40
# SHA-256 of each split's pixels, masks and boxes as built from Debian's Fashion-MNIST 3.0.1
# files: `build` checks its result against them, so a set that differs says so.
SHA256 = {"train": "1ef576b33abe09d5ccc699be7dd090608d23fa03c8b1a86f57a48e8f395ff185",
          "test": "8492f07e339bb3d53be5dd2571e7359664186afb957c0e74f5154d92c9546086"}
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")


def bilinear(image: np.ndarray, size: int) -> np.ndarray:
    """float64 bilinear resize of a square 2-D image (pixel-centre convention, edges clamped)."""
    n = image.shape[0]
    coords = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
    low = np.floor(coords).astype(np.int64)
    high = np.minimum(low + 1, n - 1)
    frac = coords - low
    rows = image[low] * (1 - frac)[:, None] + image[high] * frac[:, None]
    return rows[:, low] * (1 - frac)[None, :] + rows[:, high] * frac[None, :]


def compose(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, int, int]], list[int]]:
    """One scene: (RGB uint8, segmentation uint8, boxes, classes)."""
    background = rng.uniform(0, 60)
    canvas = background + rng.normal(0, 8, (CANVAS, CANVAS, 1))
    canvas = np.repeat(canvas, 3, axis=2)
    segmentation = np.zeros((CANVAS, CANVAS), np.uint8)
    boxes: list[tuple[int, int, int, int]] = []
    classes: list[int] = []
    for _ in range(int(rng.integers(1, 4))):
        index = int(rng.integers(0, len(images)))
        size = int(round(28 * rng.uniform(0.8, 1.6)))
        color = rng.uniform(100, 255, 3)
        item = bilinear(images[index].astype(np.float64), size)
        mask = item > MASK_THRESHOLD
        if not mask.any():
            continue
        ys, xs = np.nonzero(mask)
        for _ in range(20):
            top = int(rng.integers(0, CANVAS - size + 1))
            left = int(rng.integers(0, CANVAS - size + 1))
            box = (left + int(xs.min()), top + int(ys.min()), left + int(xs.max()) + 1,
                   top + int(ys.max()) + 1)
            if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1]
                   for b in boxes):
                break
        else:
            continue
        alpha = (item / 255.0)[..., None]
        window = canvas[top:top + size, left:left + size]
        canvas[top:top + size, left:left + size] = window * (1 - alpha) + color * alpha
        segmentation[top:top + size, left:left + size][mask] = 1 + int(labels[index])
        boxes.append(box)
        classes.append(int(labels[index]))
    image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
    return image, segmentation, boxes, classes


def build(root: Path, fashion_mnist_dir: Path | None = None) -> dict[str, int]:
    """Writes the set under `root`; returns the split sizes."""
    from tljax.data import prepare

    files = prepare.fashion_mnist_files(fashion_mnist_dir or prepare.FASHION_MNIST_DIR)
    missing = [str(p) for pair in files.values() for p in pair if not p.exists()]
    if missing:
        raise RuntimeError(f"Cannot build fashion_scenes: missing {', '.join(missing)}. "
                           "Install them with `apt-get install dataset-fashion-mnist`.")
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(FASHION_CLASSES)]
    digests = {}
    for split_index, (split, count) in enumerate(SIZES.items()):
        images, labels = (prepare.read_idx(p) for p in files[split])
        rng = np.random.default_rng(SEED + split_index)
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "masks").mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        entries, annotations = [], []
        for i in range(count):
            image, segmentation, boxes, classes = compose(rng, images, labels)
            name = f"{i:05d}.png"
            Image.fromarray(image).save(root / split / "images" / name)
            Image.fromarray(segmentation).save(root / split / "masks" / name)
            entries.append({"id": i, "file_name": name, "width": CANVAS, "height": CANVAS})
            for box, cls in zip(boxes, classes, strict=True):
                x0, y0, x1, y1 = box
                annotations.append({"id": len(annotations) + 1, "image_id": i,
                                    "category_id": cls + 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                                    "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
            digest.update(image.tobytes())
            digest.update(segmentation.tobytes())
            digest.update(json.dumps([boxes, classes]).encode())
        with open(root / split / "annotations.json", "w") as f:
            json.dump({"images": entries, "annotations": annotations,
                       "categories": categories}, f)
        digests[split] = digest.hexdigest()
    if digests != SHA256:
        raise RuntimeError(f"fashion_scenes built in {root} differs from the published set "
                           f"(SHA-256 {digests} vs {SHA256}): other Fashion-MNIST files or a "
                           "changed builder.")
    (root / "classes.txt").write_text("\n".join(("background", *FASHION_CLASSES)) + "\n")
    manifest = {"what": "a composition of real Fashion-MNIST images, not a benchmark",
                "seed": SEED, "canvas": CANVAS, "sizes": SIZES,
                "mask_threshold": MASK_THRESHOLD, "sha256": digests}
    # Written last: its presence marks a finished build.
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return dict(SIZES)
