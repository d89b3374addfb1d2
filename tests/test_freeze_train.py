"""Freeze schedules through the real trainer: phase changes, mid-phase resume, cached features."""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import pytest

from tljax import checkpoint, train, tree

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs"))
import vit_finetune  # noqa: E402


def _config(freeze_spec, **overrides):
    config = vit_finetune.get_config("runlocal")
    config.model = dict(patch_size=(7, 7), width=16, depth=1, mlp_dim=32, num_heads=2,
                        pool_type="gap", dropout=0.0)
    config.task.head_zeroinit = False
    config.input.split = "train[:256]"
    config.input.batch_size = 32
    config.input.pp = "decode|rgb|value_range(-1,1)"  # deterministic: cacheable
    config.eval.split = "test[:64]"
    config.eval.batch_size = 64
    config.freeze = freeze_spec
    config.total_steps = 6
    config.warmup_steps = 0
    config.log_every_steps = 3
    config.eval_every_steps = None
    config.checkpoint_every_steps = 2
    config.keep_checkpoints = 5
    for key, value in overrides.items():
        config[key] = value
    return config


def _params(workdir, step=None):
    variables, _ = checkpoint.load_variables(workdir, step)
    return tree.flatten(variables["params"])


@pytest.mark.parametrize("spec", ["lp_ft(lp_steps=3)",
                                  pytest.param("gradual_unfreeze(every=2)",
                                               marks=pytest.mark.slow)])
def test_phases_change_at_configured_steps_and_resume_mid_phase(spec, tmp_path,
                                                                fashion_mnist_dir):
    config = _config(spec)
    straight = str(tmp_path / "straight")
    train.train_and_evaluate(config, straight)
    p0, p2, p4, p6 = (_params(straight, s) for s in (None, 2, 4, 6))
    del p0
    head = {n for n in p6 if n.startswith("head/")}
    moved = lambda a, b: {n for n in a if not np.array_equal(a[n], b[n])}  # noqa: E731
    if spec.startswith("lp_ft"):
        assert moved(p2, p4) == set(p6)  # step 3 (in 2..4) is full fine-tuning
        resumed_from = 2  # mid linear-probe phase
    else:
        # blocks: stem, encoderblock_0, encoder_norm, head -> phases at 0, 2, 4, 6.
        assert moved(p2, p4) == head | {n for n in p6 if "encoder_norm" in n}
        resumed_from = 4  # phase 2 (top 3 groups) resumes from its own checkpoint
    # Interrupted run: the checkpoints after `resumed_from` are lost; rerunning resumes.
    interrupted = str(tmp_path / "interrupted")
    shutil.copytree(straight, interrupted)
    for step in (2, 4, 6):
        if step > resumed_from:
            shutil.rmtree(os.path.join(interrupted, "checkpoints", str(step)))
    train.train_and_evaluate(config, interrupted)
    resumed = _params(interrupted, 6)
    for name in p6:
        np.testing.assert_array_equal(resumed[name], p6[name], err_msg=name)


def test_cached_features_linear_probe_matches_uncached(tmp_path, fashion_mnist_dir):
    config = _config("linear_probe", total_steps=10)  # crosses an epoch boundary (8 steps)
    train.train_and_evaluate(config, str(tmp_path / "plain"))
    config.cache_features = True
    train.train_and_evaluate(config, str(tmp_path / "cached"))
    plain, cached = _params(str(tmp_path / "plain")), _params(str(tmp_path / "cached"))
    assert os.listdir(tmp_path / "cached" / "features")
    for name in plain:
        if name.startswith("head/"):
            np.testing.assert_allclose(cached[name], plain[name], rtol=1e-4, atol=1e-6)
        else:
            np.testing.assert_array_equal(cached[name], plain[name])
    assert np.abs(plain["head/kernel"]).sum() > 0
