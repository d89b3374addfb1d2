"""Config parsing and its errors: one clear line, before any work."""

import os
import subprocess
import sys

import ml_collections
import pytest

from tljax import config as config_lib
from tljax.models import model_fields

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import vit_finetune  # noqa: E402


def _validate(config: ml_collections.ConfigDict) -> None:
    config_lib.validate(config, model_fields(config.model_name))


def test_default_config_is_the_paper_recipe():
    config = vit_finetune.get_config()
    _validate(config)
    assert config.model.variant == "B/16"
    assert config.input.dataset == "cifar10" and config.input.batch_size == 512
    assert config.optim.name == "sgd" and config.optim.momentum == 0.9
    assert config.total_steps == 10_000 and config.warmup_steps == 500
    assert config.grad_clip_norm == 1.0 and config.lr_schedule.decay_type == "cosine"
    assert config.expected.value == 98.95
    assert "inception_crop(384)" in config.input.pp and "value_range(-1,1)" in config.input.pp


def test_arguments_select_model_dataset_freeze_and_runlocal():
    config = vit_finetune.get_config("model=L/16,dataset=oxford_iiit_pet,freeze=linear_probe,val")
    _validate(config)
    assert config.model.variant == "L/16"
    assert config.total_steps == 500 and config.warmup_steps == 100
    assert config.input.split == "train[:90%]" and config.eval.split == "train[90%:]"
    assert config.freeze == "linear_probe"
    local = vit_finetune.get_config("runlocal")
    _validate(local)
    assert local.input.dataset == "fashion_mnist" and not local.init.source


def test_unknown_argument_names_the_closest():
    with pytest.raises(config_lib.ConfigError, match="closest valid key: dataset"):
        vit_finetune.get_config("datset=cifar10")


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c.__setitem__("warmup_step", 5), "'warmup_step'.*closest valid key: warmup_steps"),
    (lambda c: c.input.__setitem__("batchsize", 3), "'input.batchsize'.*closest valid key: batch_size"),
    (lambda c: c.model.__setitem__("widht", 3), "'model.widht'.*closest valid key: width"),
    (lambda c: c.optim.__setitem__("momentun", 0.9), "'optim.momentun'.*closest valid key: momentum"),
    (lambda c: c.__setitem__("total_epochs", 3.0), "Conflicting durations total_steps and total_epochs"),
    (lambda c: c.__setitem__("total_steps", None), "No training duration"),
])
def test_validation_errors(mutate, message):
    config = vit_finetune.get_config()
    with config.unlocked():
        mutate(config)
    with pytest.raises(config_lib.ConfigError, match=message):
        _validate(config)


def test_durations_in_any_unit():
    config = ml_collections.ConfigDict(dict(total_epochs=2.5, warmup_examples=1000,
                                            log_every_steps=7, eval_every_steps=None))
    kw = dict(batch_size=100, train_size=1000)
    assert config_lib.steps(config, "total", **kw) == 25
    assert config_lib.steps(config, "warmup", **kw, total=25) == 10
    assert config_lib.steps(config, "log_every", **kw, total=25) == 7
    assert config_lib.steps(config, "eval_every", **kw, total=25) is None


def _main(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tljax.main", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_cli_unknown_override_fails_in_one_line(tmp_path):
    result = _main("--config=configs/vit_finetune.py:runlocal", f"--workdir={tmp_path}/w",
                   "--config.no_such_key=1")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "no_such_key" in lines[0]
    result = _main("--config=configs/vit_finetune.py", f"--workdir={tmp_path}/w",
                   "--config.optim.momentun=0.5")
    assert result.returncode == 2 and "closest valid key: momentum" in result.stderr
    assert not os.path.exists(tmp_path / "w"), "nothing may be written before the config is valid"


def test_argument_values_may_list_paths():
    arg = config_lib.parse_arg("dataset=textfile:/d/train.csv,/d/test.csv,runlocal",
                               dataset="", runlocal=False)
    assert arg.dataset == "textfile:/d/train.csv,/d/test.csv" and arg.runlocal


def test_cli_duration_units_conflict_or_clear(tmp_path):
    result = _main("--config=configs/vit_finetune.py:runlocal", f"--workdir={tmp_path}/w",
                   "--config.total_epochs=3")
    assert result.returncode == 2
    assert "Conflicting durations total_steps and total_epochs" in result.stderr.splitlines()[-1]
    # `=None` clears the unit the file set; with nothing left the run says so.
    result = _main("--config=configs/vit_finetune.py:runlocal", f"--workdir={tmp_path}/w",
                   "--config.total_steps=None")
    assert result.returncode == 2 and "No training duration" in result.stderr.splitlines()[-1]
