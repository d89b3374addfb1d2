"""The task API: a task registered outside tljax trains through the unchanged trainer; target
ops; the classification and NER metrics against hand-checked answers; one error base class."""

from __future__ import annotations

import json
import os
import sys

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from tljax import data, tasks
from tljax.data import Feature, preprocess
from tljax.data.sources import DatasetInfo, select_split
from tljax.data.text import IGNORE, ListSource
from tljax.errors import InputError
from tljax.tasks.base import Metrics, Task, eval_mask
from tljax.tasks.classification import MultiLabelMetrics
from tljax.tasks.token_classification import EntityMetrics, split_words, word_predictions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))

import vit_finetune  # noqa: E402

# ---------------------------------------------------------------------------------------------
# A toy task and a toy source, registered here as a user would in their own module.


class Brightness(nn.Module):
    """A scalar head: one output per example."""

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(1, kernel_init=nn.initializers.zeros)(x)[..., 0].astype(jnp.float32)


@tasks.register("toy_brightness")
class BrightnessRegression(Task):
    """Predicts an image's mean pixel value (a target the pp makes with `copy`)."""

    main_metric = "neg_mse"

    def __init__(self, info, target: str = "brightness"):
        super().__init__(info)
        self.target = target

    @property
    def targets(self):
        return (self.target,)

    def head(self, dtype=jnp.float32):
        return Brightness()

    def loss(self, outputs, batch):
        return jnp.mean((outputs - batch[self.target]) ** 2)

    def eval_outputs(self, outputs, batch):
        mask = eval_mask(batch, outputs)
        return {"neg_mse": -jnp.sum((outputs - batch[self.target]) ** 2 * mask),
                "count": mask.sum()}

    def metrics(self):
        return Metrics()


@data.register_source("toy_brightness")
def _toy_source(argument, split, data_dir=None):
    rng = np.random.default_rng(0 if split.startswith("train") else 1)
    levels = rng.uniform(-1, 1, 96).astype(np.float32)
    images = [np.full((8, 8, 3), v, np.float32) + rng.normal(0, 0.05, (8, 8, 3)).astype(
        np.float32) for v in levels]
    splits = {"train": ListSource(image=images, brightness=levels),
              "test": ListSource(image=images[:32], brightness=levels[:32])}
    features = {"image": Feature("image"), "brightness": Feature("float")}
    return select_split("toy_brightness", splits, split,
                        lambda sizes: DatasetInfo("toy_brightness", features, sizes))


def test_a_task_registered_outside_tljax_trains_through_the_trainer(tmp_path):
    from tljax import outputs, train

    config = vit_finetune.get_config("runlocal")
    config.input.dataset = "toy_brightness"
    config.input.split = "train"
    config.input.pp = "keep('image', 'brightness')"
    config.input.batch_size = 16
    config.eval.split = "test"
    config.eval.pp = "keep('image', 'brightness')"
    config.eval.batch_size = 16
    config.model = dict(patch_size=(4, 4), width=16, depth=1, mlp_dim=32, num_heads=2,
                        pool_type="gap", dropout=0.0)
    config.task = dict(name="toy_brightness")
    config.total_steps = 40
    config.warmup_steps = 2
    config.log_every_steps = 10
    config.eval_every_steps = None
    config.checkpoint_every_steps = 40
    config.lr = 3e-3
    final = train.train_and_evaluate(config, str(tmp_path))
    records = [r for r in outputs.read_metrics(str(tmp_path)) if r["kind"] == "train"]
    assert records[-1]["loss"] < 0.5 * records[0]["loss"], records
    # The target's variance is 1/3 (uniform on [-1, 1]); learning beats predicting 0.
    assert final["neg_mse"] > -0.1 and final["examples"] == 32
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["task"] == "toy_brightness" and results["main_metric"] == "neg_mse"
    assert (tmp_path / "curves.png").exists()


# ---------------------------------------------------------------------------------------------
# Target ops and collation.


def test_target_ops_and_collation():
    rng = np.random.default_rng(0)
    pp = preprocess.Preprocess("onehot(4, key_result='labels', on=0.85, off=0.05)|"
                               "copy('label', 'target')|drop('extra')")
    examples = [{"label": 2, "extra": "x", "words": ["a", "b"]},
                {"label": 0, "extra": "y", "words": ["c"]}]
    batch = pp(examples, rng)
    assert sorted(batch) == ["label", "labels", "target", "words"]
    np.testing.assert_allclose(batch["labels"][0], [0.05, 0.05, 0.85, 0.05], rtol=1e-6)
    assert batch["label"].dtype == np.int32 and batch["target"].tolist() == [2, 0]
    assert batch["words"].dtype == object and batch["words"][1] == ["c"]  # ragged: host only
    multi = preprocess.Preprocess("multihot(5)|keep('labels')")([{"labels": [0, 3]},
                                                                  {"labels": []}], rng)
    assert multi["labels"].tolist() == [[1, 0, 0, 1, 0], [0, 0, 0, 0, 0]]
    with pytest.raises(ValueError, match="outside"):
        preprocess.Preprocess("onehot(2)")([{"label": 2}], rng)
    with pytest.raises(ValueError, match="has no"):
        preprocess.Preprocess("keep('image')")([{"label": 1}], rng)
    with pytest.raises(ValueError, match="different keys"):
        preprocess.Preprocess("")([{"label": 1}, {"label": 1, "x": 2}], rng)


# ---------------------------------------------------------------------------------------------
# Metrics against answers worked out by hand.


def test_multilabel_metrics_by_hand():
    # Class 0: scores of positives 0.9, 0.4 and negative 0.6 -> ranking P, N, P:
    # AP = (1/1 + 2/3) / 2 = 5/6. Class 1: positive 0.8 ranks first -> AP 1. Class 2 has no
    # positive and is left out of the mean. mAP = (5/6 + 1) / 2 = 11/12.
    scores = np.array([[0.9, 0.8, 0.1], [0.4, 0.3, 0.2], [0.6, 0.1, 0.3], [0.0, 0.0, 0.0]])
    targets = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]], np.float32)
    mask = np.array([True, True, True, False])  # the last row is padding
    metrics = MultiLabelMetrics()
    metrics.update({"scores": scores[:2], "targets": targets[:2], "mask": mask[:2],
                    "loss": np.float32(1.0)})
    metrics.update({"scores": scores[2:], "targets": targets[2:], "mask": mask[2:],
                    "loss": np.float32(2.0)})
    result = metrics.result()
    assert result["map"] == pytest.approx(11 / 12)
    # At 0.5: predicted {0,1}, {}, {0}; true {0,1}, {0}, {}: TP 2, FP 1, FN 1 -> micro F1 2/3.
    assert result["f1_micro"] == pytest.approx(2 / 3)
    assert result["loss"] == pytest.approx(1.0) and result["examples"] == 3


def test_word_predictions_take_the_first_piece():
    # [CLS] new york ##er is [SEP] pad: words 0 (new), 1 (yorker: 2 pieces), 2 (is).
    word_ids = np.array([-1, 0, 1, 1, 2, -1, -1])
    pieces = np.array([9, 3, 4, 7, 0, 9, 9])
    assert word_predictions(pieces, word_ids, 4).tolist() == [3, 4, 0, IGNORE]


def test_entity_metrics_match_seqeval_by_hand():
    names = ["O", "B-loc", "I-loc", "B-per", "I-per"]
    metrics = EntityMetrics(names)
    # Sentence 1 (5 words): gold loc(0-1), per(3); predicted loc(0-1) right, per(3-4) wrong span.
    # Sentence 2 (2 words, truncated after the first piece): gold per(1); word 1 has no
    # prediction, so it counts as O -> missed.
    word_ids = np.array([[-1, 0, 1, 2, 3, 4, -1], [-1, 0, -1, -1, -1, -1, -1]])
    predictions = np.array([[0, 1, 2, 0, 3, 4, 0], [0, 0, 0, 0, 0, 0, 0]])
    word_tags = np.full((2, 6), IGNORE)
    word_tags[0, :5] = [1, 2, 0, 3, 0]
    word_tags[1, :2] = [0, 3]
    metrics.update({"predictions": predictions, "word_ids": word_ids, "word_tags": word_tags,
                    "mask": np.array([True, True]), "loss": np.float32(3.0),
                    "pieces": np.float32(6.0)})
    result = metrics.result()
    # Gold entities 3, predicted 2, correct 1: P 1/2, R 1/3, F1 2PR/(P+R) = 0.4.
    assert result["precision"] == pytest.approx(0.5)
    assert result["recall"] == pytest.approx(1 / 3)
    assert result["f1"] == pytest.approx(0.4)
    # Words right: sentence 1: 4 of 5 (word 4 is O, predicted I-per); sentence 2: 1 of 2.
    assert result["token_accuracy"] == pytest.approx(5 / 7)
    assert result["loss"] == pytest.approx(0.5)


def test_split_words_for_tweets():
    assert split_words("Apple opens a store in Paris!") == [
        "Apple", "opens", "a", "store", "in", "Paris", "!"]
    assert split_words("@bob loves #NYC, see http://t.co/x1 it's") == [
        "@bob", "loves", "#NYC", ",", "see", "http://t.co/x1", "it's"]


# ---------------------------------------------------------------------------------------------
# Configuration of tasks.


def test_task_config_errors_name_the_closest_valid_value():
    info = DatasetInfo("d", {"image": Feature("image"),
                             "label": Feature("class_label", ("a", "b"))}, {})
    with pytest.raises(InputError, match="closest valid key: classification"):
        tasks.build_task({"name": "clasification"}, info)
    with pytest.raises(InputError, match="task.los'.*closest valid key: loss"):
        tasks.build_task({"name": "classification", "los": "x"}, info)
    with pytest.raises(InputError, match="no label feature 'tags'"):
        tasks.build_task({"name": "token_classification"}, info)
    task = tasks.build_task(None, info)
    assert task.name == "classification" and task.output_names == ["a", "b"]


def test_every_input_error_shares_one_base():
    from tljax.config import ConfigError
    from tljax.data import DatasetNotPreparedError
    from tljax.pretrained import CheckpointMismatchError, OfflineError, UnsafeCheckpointError

    for error in (ConfigError, DatasetNotPreparedError, OfflineError, UnsafeCheckpointError,
                  CheckpointMismatchError):
        assert issubclass(error, InputError), error


# ---------------------------------------------------------------------------------------------
# Regularisers of the classification task.


def _classes(n):
    return DatasetInfo("d", {"image": Feature("image"),
                             "label": Feature("class_label", tuple(str(i) for i in range(n)))},
                       {})


def test_label_smoothing_mixup_and_cutmix_targets():
    import jax

    rng = jax.random.PRNGKey(0)
    images = jnp.stack([jnp.full((8, 8, 3), float(i)) for i in range(4)])
    batch = {"image": images, "label": jnp.array([0, 1, 2, 3])}
    smooth = tasks.build_task({"name": "classification", "label_smoothing": 0.2}, _classes(4))
    out = smooth.train_batch(batch, rng)
    np.testing.assert_allclose(out["label"][0], [0.85, 0.05, 0.05, 0.05], rtol=1e-6)
    assert out["image"] is images  # smoothing alone leaves the inputs alone
    for options in ({"mixup": 0.4}, {"cutmix": 1.0}, {"mixup": 0.4, "cutmix": 1.0,
                                                      "label_smoothing": 0.1}):
        task = tasks.build_task({"name": "classification", **options}, _classes(4))
        for seed in range(6):
            out = jax.jit(task.train_batch)(batch, jax.random.PRNGKey(seed))
            targets, mixed = np.asarray(out["label"]), np.asarray(out["image"])
            np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-5)  # sums to one
            # Each image mixes itself (value i) with its neighbour (i - 1): the pixel mean
            # is the share of itself times i plus the rest times i - 1, as the targets say.
            share = targets[1, 1] if "label_smoothing" not in options else (
                (targets[1, 1] - 0.1 / 4) / 0.9)
            np.testing.assert_allclose(mixed[1].mean(), share * 1 + (1 - share) * 0, atol=1e-5)
    assert smooth.train_batch(batch, rng)["label"].shape == (4, 4)
    with pytest.raises(InputError, match="label_smoothing"):
        tasks.build_task({"name": "classification", "label_smoothing": 1.5}, _classes(4))
