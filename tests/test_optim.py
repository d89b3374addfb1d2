"""Freeze rules compiled to optax.multi_transform labels; learning-rate schedules."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from tljax import optim, tree
from tljax.config import ConfigError
from tljax.models import classifier


def _params():
    model = classifier("vit", num_classes=5, patch_size=(4, 4), width=16, depth=2, mlp_dim=32,
                        num_heads=2)
    return model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"]


def _config(**overrides):
    config = ml_collections.ConfigDict(dict(
        optim=dict(name="adamw", weight_decay=0.0), lr=0.1, grad_clip_norm=1.0, freeze="full",
        schedule=None, lr_schedule=dict(decay_type="cosine", linear_end=0.0)))
    for key, value in overrides.items():
        config[key] = value
    return config


def test_linear_probe_labels_and_no_state_for_frozen_leaves():
    params = _params()
    tx, labels = optim.make_optimizer(_config(freeze="linear_probe"), params, 10, 2)
    flat = tree.flatten(labels)
    assert {n for n, label in flat.items() if label != optim.FROZEN} == {"head/bias", "head/kernel"}
    state = tx.init(params)
    state_sizes = sum(x.size for x in jax.tree_util.tree_leaves(state) if hasattr(x, "size"))
    head_size = params["head"]["kernel"].size + params["head"]["bias"].size
    # adamw keeps mu and nu for the head only (+ scalar counts).
    assert 2 * head_size <= state_sizes <= 2 * head_size + 4


def test_none_but_and_first_match_wins():
    params = _params()
    _, labels = optim.make_optimizer(
        _config(freeze="none_but=encoderblock_1|^head/"), params, 10, 0)
    trainable = {n for n, t in tree.flatten(optim.trainable_mask(labels)).items() if t}
    assert trainable and all("encoderblock_1" in n or n.startswith("head/") for n in trainable)
    rules = [("^head/", {"lr_mult": 10.0}), ("^head/", None), (".*", None)]
    _, labels = optim.make_optimizer(_config(freeze="", schedule=rules), params, 10, 0)
    assert tree.flatten(labels)["head/kernel"] == "lr=10,wd=1,from=0"  # the first rule's group


def test_unmatched_parameter_is_an_error():
    with pytest.raises(ConfigError, match=r"parameters match no schedule rule \(Transformer/encoder_norm"):
        optim.make_optimizer(_config(freeze="", schedule=[("^head/", {})]), _params(), 10, 0)


def test_schedule_and_conflicting_preset_is_an_error():
    with pytest.raises(ConfigError, match="keep one"):
        optim.rules_of(_config(freeze="linear_probe", schedule=[(".*", {})]))


def test_unknown_preset_is_an_error():
    with pytest.raises(ConfigError, match="Unknown freeze preset"):
        optim.preset("linear_prob")


def test_lr_schedule_warmup_then_cosine():
    schedule = optim.lr_schedule(1.0, total_steps=110, warmup_steps=10)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(5)), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(10)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(60)), 0.5, atol=1e-6)  # cosine midpoint
    np.testing.assert_allclose(float(schedule(110)), 0.0, atol=1e-6)
    linear = optim.lr_schedule(1.0, 100, 0, decay_type="linear", linear_end=0.1)
    np.testing.assert_allclose(float(linear(50)), 0.55, rtol=1e-6)


def test_clipping_sees_only_trainable_gradients():
    params = _params()
    tx, labels = optim.make_optimizer(
        _config(freeze="linear_probe", optim=dict(name="sgd"), lr=1.0,
                lr_schedule=dict(decay_type="constant", linear_end=0.0)), params, 10, 0)
    trainable = optim.trainable_mask(labels)
    # Gradients as the train step produces them: zero for frozen leaves.
    grads = jax.tree_util.tree_map(lambda p, t: jnp.full_like(p, 3.0) if t else jnp.zeros_like(p),
                                   params, trainable)
    updates, _ = tx.update(grads, tx.init(params), params)
    head_norm = optax.tree.norm(updates["head"])
    np.testing.assert_allclose(float(head_norm), 1.0, rtol=1e-5)  # clipped to 1 by head alone
