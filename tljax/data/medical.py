"""Medical volumes as 2-D slices: the Medical Segmentation Decathlon layout, NIfTI and DICOM.

`decathlon:/path/TaskXX_Name` reads

    imagesTr/CASE.nii.gz | CASE.nii | CASE/ (a folder holding one DICOM series)
    labelsTr/CASE.nii.gz | CASE.nii | CASE/ (label volume: one class id per voxel)
    dataset.json (optional): {"labels": {"0": "background", "1": "tumour", ...}, ...}

with NIfTI read by `nibabel` and DICOM by `pydicom`. Files whose names start with '.' (the
'._' files of the Decathlon archives) are skipped. Without dataset.json the class names are
'0'..'N' for the largest label of the first case. The image and label of a case must be in
the same format (both NIfTI or both DICOM), so their voxel axes agree.

Examples are slices along the last voxel axis (axial for the Decathlon's NIfTI files):

    image         float32 (H, W, C): raw intensities (Hounsfield units for CT: DICOM pixels go
                  through the modality LUT, RescaleSlope * value + RescaleIntercept); 4-D
                  NIfTI volumes (several modalities) give C channels
    segmentation  uint8 (H, W)
    case, slice   the case name and the slice index

A NIfTI slice is `data[:, :, k].T` (rows follow the second voxel axis), a DICOM slice is the
stored pixel array; DICOM slices are ordered by their position along the slice normal
(ImagePositionPatient . normal of ImageOrientationPatient), else by InstanceNumber.

Split: the Decathlon's test images have no labels, so its labelled cases are split: case i
(sorted by name) is `test` when i % 5 == 4, else `train`; with fewer than 5 cases the last
one is the test case. A case's slices stay in one split.

Intensity ops map the raw values to 0..255 uint8, after which the image ops apply:

    window(level, width)                    CT windowing: [level - width/2, level + width/2]
                                            -> 0..255 (e.g. window(40, 400) soft tissue,
                                            window(-600, 1500) lung)
    scale_intensity(lower=0.5, upper=99.5)  MR: per-image percentiles -> 0..255
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tljax.data.dense import SEGMENTATION, segmentation_features
from tljax.data.preprocess import Example, ExampleOp, register
from tljax.data.sources import DatasetInfo, register_source, select_split
from tljax.errors import InputError

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def _case_name(path: Path) -> str | None:
    if path.name.startswith("."):
        return None
    if path.is_dir():
        return path.name
    for suffix in NIFTI_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return None


def _find(folder: Path, case: str) -> Path | None:
    for candidate in (folder / f"{case}.nii.gz", folder / f"{case}.nii", folder / case):
        if candidate.exists():
            return candidate
    return None


def read_dicom_series(folder: Path) -> np.ndarray:
    """A DICOM series folder -> float32 (rows, cols, slices) after the modality LUT."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise InputError(f"DICOM series folder {folder} holds no files.")
    slices = []
    for path in files:
        try:
            ds = pydicom.dcmread(path)
        except Exception as e:  # pydicom raises several kinds for non-DICOM files
            raise InputError(f"Cannot read {path} as DICOM: {e}") from None
        slices.append(ds)

    def position(ds: Any) -> float:
        if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
            row, col = np.asarray(ds.ImageOrientationPatient[:3], float), np.asarray(
                ds.ImageOrientationPatient[3:], float)
            return float(np.dot(np.asarray(ds.ImagePositionPatient, float), np.cross(row, col)))
        return float(getattr(ds, "InstanceNumber", 0) or 0)

    slices.sort(key=position)
    shapes = {ds.pixel_array.shape for ds in slices}
    if len(shapes) > 1:
        raise InputError(f"DICOM series {folder} mixes slice shapes {sorted(shapes)}.")
    arrays = [np.asarray(apply_modality_lut(ds.pixel_array, ds), np.float32) for ds in slices]
    return np.stack(arrays, axis=-1)


@functools.lru_cache(maxsize=8)
def read_volume(path: str) -> np.ndarray:
    """A NIfTI file or DICOM series folder -> float32 (H, W, slices[, channels]).

    NIfTI data is transposed so that a slice is `data[:, :, k].T`; cached per process (a few
    volumes), since slices of one volume are usually read together.
    """
    p = Path(path)
    if p.is_dir():
        return read_dicom_series(p)
    import nibabel

    try:
        data = np.asarray(nibabel.load(p).get_fdata(dtype=np.float32))
    except Exception as e:  # nibabel raises ImageFileError, OSError, EOFError ...
        raise InputError(f"Cannot read NIfTI file {p}: {e}") from None
    if data.ndim not in (3, 4):
        raise InputError(f"{p} is a {data.ndim}-D image; expected a 3-D volume (or 4-D with "
                         "modalities last).")
    return np.swapaxes(data, 0, 1)


def _num_slices(path: Path) -> int:
    if path.is_dir():
        return len([f for f in path.iterdir() if f.is_file() and not f.name.startswith(".")])
    import nibabel

    return int(nibabel.load(path).shape[2])


class SliceSource(Sequence):
    """Every slice of a list of (case, image path, label path) volumes."""

    def __init__(self, cases: list[tuple[str, Path, Path]]):
        self._cases = cases
        self._index = [(c, k) for c, (_, image, _) in enumerate(cases)
                       for k in range(_num_slices(image))]

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        c, k = self._index[i]
        case, image_path, label_path = self._cases[c]
        image, label = read_volume(str(image_path)), read_volume(str(label_path))
        if image.shape[:3] != label.shape[:3]:
            raise InputError(f"Case {case}: image volume {image.shape[:3]} and label volume "
                             f"{label.shape[:3]} differ in shape.")
        plane = image[:, :, k]
        plane = plane[..., None] if plane.ndim == 2 else plane
        return {"image": np.ascontiguousarray(plane, np.float32),
                SEGMENTATION: np.rint(label[:, :, k]).astype(np.uint8),
                "case": case, "slice": k}


def decathlon_cases(root: Path) -> list[tuple[str, Path, Path]]:
    images, labels = root / "imagesTr", root / "labelsTr"
    if not images.is_dir() or not labels.is_dir():
        raise InputError(f"decathlon: {root} needs imagesTr/ and labelsTr/ (the Medical "
                         "Segmentation Decathlon layout).")
    cases = []
    for path in sorted(images.iterdir()):
        case = _case_name(path)
        if case is None:
            continue
        label = _find(labels, case)
        if label is None:
            raise InputError(f"decathlon: {path.name} has no label in {labels} (expected "
                             f"{case}.nii.gz, {case}.nii or a DICOM folder {case}/).")
        if path.is_dir() != label.is_dir():
            raise InputError(f"decathlon: case {case} mixes DICOM and NIfTI; give the image "
                             "and its label in the same format.")
        cases.append((case, path, label))
    if not cases:
        raise InputError(f"decathlon: no cases in {images}.")
    return cases


def decathlon_class_names(root: Path, cases: list[tuple[str, Path, Path]]) -> list[str]:
    meta = root / "dataset.json"
    if meta.exists():
        labels = json.loads(meta.read_text()).get("labels") or {}
        if labels:
            return [labels[str(i)] for i in range(len(labels))]
    largest = int(np.rint(read_volume(str(cases[0][2]))).max())
    return [str(i) for i in range(largest + 1)]


def split_cases(cases: list) -> dict[str, list]:
    test = [i for i in range(len(cases)) if i % 5 == 4] or (
        [len(cases) - 1] if len(cases) > 1 else [])
    return {"train": [c for i, c in enumerate(cases) if i not in test],
            "test": [cases[i] for i in test]}


@register_source("decathlon", prefix=True)
def decathlon_source(argument: str, split: str, data_dir: str | None = None
                     ) -> tuple[Sequence, DatasetInfo]:
    del data_dir
    root = Path(argument).expanduser()
    cases = decathlon_cases(root)
    class_names = decathlon_class_names(root, cases)
    splits = {name: SliceSource(group) for name, group in split_cases(cases).items() if group}
    name = f"decathlon:{argument}"
    features = segmentation_features(class_names)
    return select_split(name, splits, split, lambda sizes: DatasetInfo(name, features, sizes))


# ---------------------------------------------------------------------------------------------
# Intensity ops.


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(x, 0.0, 1.0) * 255).astype(np.uint8)


@register("window")
def window(level: float, width: float) -> ExampleOp:
    """[level - width/2, level + width/2] -> 0..255 (values outside clip), uint8."""
    if width <= 0:
        raise ValueError(f"window({level}, {width}): width must be positive.")
    low = level - width / 2

    def op(example: Example, rng: np.random.Generator) -> Example:
        del rng
        x = np.asarray(example["image"], np.float64)
        return {**example, "image": _to_uint8((x - low) / width)}

    return op


@register("scale_intensity")
def scale_intensity(lower: float = 0.5, upper: float = 99.5) -> ExampleOp:
    """Per image, the `lower`..`upper` percentiles of the intensities -> 0..255, uint8."""

    def op(example: Example, rng: np.random.Generator) -> Example:
        del rng
        x = np.asarray(example["image"], np.float64)
        lo, hi = np.percentile(x, [lower, upper])
        return {**example, "image": _to_uint8((x - lo) / max(hi - lo, 1e-6))}

    return op
