"""Medical volumes: real sample files shipped by nibabel and pydicom, read as Decathlon
slices; windowing hand-checked."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from tljax.data import Preprocess, get_source
from tljax.errors import InputError

nibabel = pytest.importorskip("nibabel")
pydicom = pytest.importorskip("pydicom")

ANATOMICAL = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", "anatomical.nii")


def _nifti_task(root, cases: int = 2) -> np.ndarray:
    """A Decathlon folder whose cases are nibabel's real anatomical.nii (33 x 41 x 25), with
    labels thresholded from it; returns the real volume."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    image = nibabel.load(ANATOMICAL)
    data = np.asarray(image.get_fdata())
    labels = (data > np.percentile(data, 70)).astype(np.uint8) + (data > np.percentile(
        data, 95))
    for i in range(cases):
        shutil.copy(ANATOMICAL, root / "imagesTr" / f"case_{i}.nii")
        nibabel.save(nibabel.Nifti1Image(labels, image.affine),
                     root / "labelsTr" / f"case_{i}.nii.gz")
    (root / "imagesTr" / "._case_0.nii").write_bytes(b"mac metadata")  # skipped
    (root / "dataset.json").write_text(json.dumps(
        {"labels": {"0": "background", "1": "tissue", "2": "bright"}}))
    return data


def test_decathlon_nifti_slices_of_a_real_volume(tmp_path):
    data = _nifti_task(tmp_path, cases=2)
    source, info = get_source(f"decathlon:{tmp_path}", "train")
    assert info.class_names("segmentation") == ["background", "tissue", "bright"]
    # Two cases: the last is the test case; every slice of a case is an example.
    assert info.split_sizes == {"train": 25, "test": 25}
    example = source[7]
    assert example["case"] == "case_0" and example["slice"] == 7
    assert example["image"].shape == (41, 33, 1)
    np.testing.assert_array_equal(example["image"][..., 0], data[:, :, 7].T.astype(np.float32))
    assert set(np.unique(example["segmentation"])) <= {0, 1, 2}
    test, _ = get_source(f"decathlon:{tmp_path}", "test")
    assert test[0]["case"] == "case_1"


def _dicom_series(folder, base, arrays: list[np.ndarray], positions: list[float]) -> None:
    """A DICOM series made from a real file, slices written in scrambled name order."""
    folder.mkdir(parents=True)
    for k, (array, z) in enumerate(zip(arrays, positions, strict=True)):
        ds = pydicom.dcmread(base)
        ds.PixelData = array.astype(np.int16 if ds.PixelRepresentation else np.uint16).tobytes()
        ds.ImagePositionPatient = [0.0, 0.0, z]
        ds.InstanceNumber = k + 1
        ds.save_as(folder / f"{(7 * k) % 10:02d}.dcm")


def test_decathlon_dicom_series_in_hounsfield_units(tmp_path):
    from pydicom.data import get_testdata_file
    from pydicom.pixels import apply_modality_lut

    base = get_testdata_file("CT_small.dcm")
    real = pydicom.dcmread(base)
    pixels = real.pixel_array
    arrays = [pixels, np.roll(pixels, 5, axis=0), np.roll(pixels, 9, axis=1)]
    positions = [-40.0, 10.0, -75.0]  # slice order by position: 2, 0, 1
    labels = [(a > a.mean()).astype(np.int16) for a in arrays]
    for case in ("ct_a", "ct_b"):
        _dicom_series(tmp_path / "imagesTr" / case, base, arrays, positions)
        _dicom_series(tmp_path / "labelsTr" / case, base, labels, positions)
    # The label series keeps the CT's rescale (slope 1, intercept -1024): undo it here, so
    # stored label values of v read as v.
    for path in (tmp_path / "labelsTr").rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.RescaleIntercept = 0
        ds.save_as(path)
    source, info = get_source(f"decathlon:{tmp_path}", "train")
    assert len(source) == 3 and info.class_names("segmentation") == ["0", "1"]
    hu = [apply_modality_lut(a, real).astype(np.float32) for a in arrays]
    for k, original in enumerate((2, 0, 1)):
        example = source[k]
        np.testing.assert_array_equal(example["image"][..., 0], hu[original])
        np.testing.assert_array_equal(example["segmentation"], labels[original])
    assert float(real.RescaleIntercept) == -1024  # the values above are really shifted


def test_window_and_intensity_scaling_hand_checked():
    image = np.array([[-1000.0, -160.0], [40.0, 240.0], [1000.0, 0.0]])[..., None]
    out = Preprocess("window(40, 400)").example({"image": image}, None)["image"]
    # [-160, 240] -> 0..255: -1000 clips to 0, 40 is the middle (127.5 -> 128), 0 is 0.4.
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 0], [[0, 0], [128, 255], [255, 102]])
    scaled = Preprocess("scale_intensity(0, 100)").example(
        {"image": np.array([[2.0, 4.0], [6.0, 10.0]])[..., None]}, None)["image"]
    np.testing.assert_array_equal(scaled[..., 0], [[0, 64], [128, 255]])


def test_decathlon_errors_say_what_is_missing(tmp_path):
    with pytest.raises(InputError, match="imagesTr"):
        get_source(f"decathlon:{tmp_path}", "train")
    _nifti_task(tmp_path, cases=1)
    os.remove(tmp_path / "labelsTr" / "case_0.nii.gz")
    with pytest.raises(InputError, match="has no label"):
        get_source(f"decathlon:{tmp_path}", "train")
