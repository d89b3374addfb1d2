"""Best-checkpoint selection and early stopping (tljax.selection), alone and in a run."""

from __future__ import annotations

import json
import os
import sys

import ml_collections
import numpy as np
import pytest

from tljax import checkpoint, selection, tree
from tljax.config import ConfigError
from tljax.train import train_and_evaluate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import tiny_config  # noqa: E402


def _config(**early_stopping) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"early_stopping": early_stopping, "ema_decay": None,
                                      "eval_every_steps": 5})


def _observe(sel: selection.Selection, values: list[float], every: int = 5) -> None:
    for i, value in enumerate(values, start=1):
        sel.observe(i * every, {"accuracy": value, "loss": 1 - value}, _FAKE_STATE)
        if sel.stopped:
            return


_FAKE_STATE = {"params": {"w": np.zeros(2, np.float32)}, "model_state": {}}


def test_selection_keeps_the_first_best_and_stops_after_patience(tmp_path):
    sel = selection.Selection(_config(metric="accuracy", patience=2), str(tmp_path), 0)
    _observe(sel, [0.5, 0.7, 0.6, 0.7, 0.65, 0.9])  # ties do not improve: 0.6, 0.7 -> stop
    assert sel.best["step"] == 10 and sel.stopped == 20
    assert sel.final_eval() == {"accuracy": 0.7, "loss": pytest.approx(0.3)}
    saved, metadata = checkpoint.load_variables(os.path.join(tmp_path, "best"))
    assert metadata["step"] == 10 and metadata["metrics"]["accuracy"] == 0.7

    # Lower is better for a loss; min_delta demands a real improvement.
    sel = selection.Selection(_config(metric="loss", patience=3, min_delta=0.05),
                              str(tmp_path / "loss"), 0)
    _observe(sel, [0.5, 0.52, 0.54, 0.53, 0.9])  # losses .5 .48 .46 .47: none 0.05 better,
    assert sel.mode == "min" and sel.best["step"] == 5  # then 0.1 (too late: stopped at 20)
    assert sel.stopped == 20 and len(sel.history) == 4


def test_selection_resumes_from_the_record_before_the_checkpoint(tmp_path):
    sel = selection.Selection(_config(metric="accuracy", patience=3), str(tmp_path), 0)
    _observe(sel, [0.5, 0.7, 0.6, 0.65])
    # Resumed from checkpoint 10: evaluations at 15 and 20 are forgotten (made again).
    again = selection.Selection(_config(metric="accuracy", patience=3), str(tmp_path), 10)
    assert [h["step"] for h in again.history] == [5, 10] and again.stopped is None
    for step, value in ((15, 0.6), (20, 0.65), (25, 0.6)):
        again.observe(step, {"accuracy": value}, _FAKE_STATE)
    assert again.best["step"] == 10 and again.stopped == 25
    saved = json.load(open(os.path.join(tmp_path, "selection.json")))
    assert [h["step"] for h in saved["history"]] == [5, 10, 15, 20, 25]


def test_without_early_stopping_the_last_evaluation_is_reported(tmp_path):
    sel = selection.Selection(ml_collections.ConfigDict({"early_stopping": None}),
                              str(tmp_path), 0)
    _observe(sel, [0.5, 0.9, 0.6])
    assert sel.final_eval()["accuracy"] == 0.6 and sel.summary() == {}
    assert not os.path.exists(os.path.join(tmp_path, "best"))


@pytest.mark.parametrize("spec,match", [
    (dict(patience=2), "needs metric"),
    (dict(metric="accuracy", patience=0), "patience"),
    (dict(metric="accuracy", mode="up"), "mode"),
    (dict(metric="accuracy", patients=3), "unknown keys"),
    (dict(metric="ema/accuracy"), "ema_decay"),
])
def test_bad_early_stopping_is_one_line(spec, match):
    with pytest.raises(ConfigError, match=match):
        selection.check(_config(**spec))


def _eval_records(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == "eval"]


def test_early_stopping_picks_the_best_validation_step(tmp_path, fashion_mnist_dir):
    # Validation: 256 held-out training images; the test split rides along as an extra
    # evaluation and is reported at the selected step.
    base = dict(total_steps=40, eval_every_steps=5, checkpoint_every_steps=5,
                keep_checkpoints=10, lr=0.01, **{"input.split": "train[:1500]",
                                                 "eval.split": "train[1500:1756]"})
    extra = {"test": {"split": "test[:256]"}}

    # A selection that must stop: on 'loss' with mode 'max', the first evaluation (the
    # highest loss of a learning run) is best, so the run stops `patience` evaluations
    # later, and best/ holds exactly the weights of checkpoint 5.
    forced = str(tmp_path / "forced")
    config = tiny_config(**base, extra_evals=extra,
                         early_stopping=dict(metric="loss", mode="max", patience=2))
    final = train_and_evaluate(config, forced)
    results = json.load(open(os.path.join(forced, "results.json")))
    assert results["selection"]["best_step"] == 5 and results["selection"]["stopped_at"] == 15
    assert [r["step"] for r in _eval_records(forced)] == [5, 10, 15]
    first = _eval_records(forced)[0]
    assert final == results["final_eval"] == {k: v for k, v in first.items()
                                              if k not in ("step", "kind")}
    assert "test/accuracy" in final
    best, metadata = checkpoint.load_variables(os.path.join(forced, "best"))
    at_5, _ = checkpoint.load_variables(forced, step=5)
    assert metadata["step"] == 5
    for name, value in tree.flatten(at_5).items():
        assert value.tobytes() == tree.flatten(best)[name].tobytes(), name
    assert sorted(os.listdir(os.path.join(forced, "checkpoints"))) == ["10", "15", "5"]
    # Finished: running it again does nothing.
    assert train_and_evaluate(config, forced) == final
    assert len(_eval_records(forced)) == 3

    # A real selection on accuracy: the reported step is the first best of the evaluations.
    natural = str(tmp_path / "natural")
    final = train_and_evaluate(tiny_config(
        **base, extra_evals=extra, early_stopping=dict(metric="accuracy", patience=2)),
        natural)
    records = _eval_records(natural)
    accuracies = [r["accuracy"] for r in records]
    best_index = int(np.argmax(accuracies))  # argmax: the first maximum
    results = json.load(open(os.path.join(natural, "results.json")))
    assert results["selection"]["best_step"] == records[best_index]["step"]
    assert final["accuracy"] == max(accuracies)
    assert final["test/accuracy"] == records[best_index]["test/accuracy"]
    stopped = results["selection"]["stopped_at"]
    if stopped is None:  # ran to the end: never two evaluations in a row without a new best
        assert records[-1]["step"] == 40
    else:
        assert stopped == records[best_index]["step"] + 2 * 5 == records[-1]["step"]
