"""VTAB-1k (Zhai et al. 2019): the 19 tasks, their splits and how their labels are made.

Each task is a TFDS dataset read with 1,000 labelled training examples: `train800` (the
first 800 of the task's training split) to train while choosing hyper-parameters,
`val200` (the first 200 of its validation split) to choose them, then `train800val200`
(all 1,000) for the final run, evaluated on the official test split. Where TFDS has no
validation split, VTAB carves one out of train (the split strings below say where).

The structured tasks predict a property the dataset stores in other features; the
`vtab_label(task)` pp op writes it to 'label':
  clevr_count         number of objects - 3 (3..10 objects: 8 classes)
  clevr_distance      depth of the closest object in 6 bins: <8, <8.5, <9, <9.5, <10, >=10
  kitti_distance      distance of the closest vehicle (car, van, truck) in 4 bins:
                      <8 m, <20 m, >=20 m, no vehicle
  dsprites_location   x position (32 values) in 16 bins
  dsprites_orientation  orientation (40 values) in 16 bins
  smallnorb_azimuth   azimuth (18 classes), smallnorb_elevation  elevation (9 classes)
  dmlab               the stored label (6 classes)
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tljax.data.preprocess import Example, ExampleOp, register


@dataclasses.dataclass(frozen=True)
class Task:
    tfds: str
    train: str  # the training split VTAB takes the first 800 from
    val: str  # the validation split VTAB takes the first 200 from
    test: str
    group: str  # natural, specialized or structured
    classes: int


TASKS = {
    # Natural.
    "caltech101": Task("caltech101:3.0.1", "train[:2754]", "train[2754:]", "test", "natural",
                       102),
    "cifar100": Task("cifar100", "train[:45000]", "train[45000:]", "test", "natural", 100),
    "dtd": Task("dtd", "train", "validation", "test", "natural", 47),
    "oxford_flowers102": Task("oxford_flowers102", "train", "validation", "test", "natural",
                              102),
    "oxford_iiit_pet": Task("oxford_iiit_pet", "train[:2944]", "train[2944:]", "test",
                            "natural", 37),
    "sun397": Task("sun397/tfds", "train", "validation", "test", "natural", 397),
    "svhn": Task("svhn_cropped", "train[:65931]", "train[65931:]", "test", "natural", 10),
    # Specialized.
    "patch_camelyon": Task("patch_camelyon", "train", "validation", "test", "specialized", 2),
    "eurosat": Task("eurosat/rgb", "train[:16200]", "train[16200:21600]", "train[21600:]",
                    "specialized", 10),
    "resisc45": Task("resisc45", "train[:18900]", "train[18900:25200]", "train[25200:]",
                     "specialized", 45),
    "diabetic_retinopathy": Task("diabetic_retinopathy_detection/btgraham-300", "train",
                                 "validation", "test", "specialized", 5),
    # Structured.
    "clevr_count": Task("clevr", "train[:63000]", "train[63000:]", "validation", "structured",
                        8),
    "clevr_distance": Task("clevr", "train[:63000]", "train[63000:]", "validation",
                           "structured", 6),
    "dmlab": Task("dmlab", "train", "validation", "test", "structured", 6),
    "kitti_distance": Task("kitti", "train", "validation", "test", "structured", 4),
    "dsprites_location": Task("dsprites", "train[:589824]", "train[589824:663552]",
                              "train[663552:]", "structured", 16),
    "dsprites_orientation": Task("dsprites", "train[:589824]", "train[589824:663552]",
                                 "train[663552:]", "structured", 16),
    "smallnorb_azimuth": Task("smallnorb", "train", "test[:50%]", "test[50%:]", "structured",
                              18),
    "smallnorb_elevation": Task("smallnorb", "train", "test[:50%]", "test[50%:]", "structured",
                                9),
}
GROUPS = ("natural", "specialized", "structured")

# Image feature and label source of the tasks whose TFDS features differ from image/label.
_IMAGE_KEY = {"kitti_distance": "image", "smallnorb_azimuth": "image",
              "smallnorb_elevation": "image"}
_CLEVR_DEPTHS = (8.0, 8.5, 9.0, 9.5, 10.0)
_KITTI_DISTANCES = (8.0, 20.0)
_KITTI_VEHICLES = (0, 1, 2)  # TFDS kitti object types: Car, Van, Truck


def _bin(value: float, edges: tuple[float, ...]) -> int:
    return int(np.searchsorted(np.asarray(edges), value, side="right"))


def label_of(task: str, example: Example) -> int:
    """The VTAB label of `task` for a decoded TFDS example (see the module docstring)."""
    if task == "clevr_count":
        return len(example["objects"]["size"]) - 3
    if task == "clevr_distance":
        depth = float(np.min(np.asarray(example["objects"]["3d_coords"])[:, 2]))
        return _bin(depth, _CLEVR_DEPTHS)
    if task == "kitti_distance":
        objects = example["objects"]
        vehicles = np.isin(np.asarray(objects["type"]), _KITTI_VEHICLES)
        if not vehicles.any():
            return len(_KITTI_DISTANCES) + 1
        distance = float(np.min(np.asarray(objects["location"])[vehicles, 2]))
        return _bin(distance, _KITTI_DISTANCES)
    if task == "dsprites_location":
        return int(example["label_x_position"]) * 16 // 32
    if task == "dsprites_orientation":
        return int(example["label_orientation"]) * 16 // 40
    if task == "smallnorb_azimuth":
        return int(example["label_azimuth"])
    if task == "smallnorb_elevation":
        return int(example["label_elevation"])
    return int(example["label"])


@register("vtab_label")
def vtab_label(task: str) -> ExampleOp:
    """Writes task's VTAB label to 'label' and keeps only 'image' and 'label'."""
    if task not in TASKS:
        from tljax.config import closest

        raise ValueError(f"vtab_label({task!r}): unknown VTAB task{closest(task, TASKS)}.")

    def op(example: Example, rng: np.random.Generator) -> Example:
        del rng
        keep = {"image": example[_IMAGE_KEY.get(task, "image")], "label": label_of(task, example)}
        if "mask" in example:
            keep["mask"] = example["mask"]
        return keep

    return op
