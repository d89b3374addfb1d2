"""Stochastic depth (ViT) and the weight average (tljax.ema), alone and through the trainer."""

from __future__ import annotations

import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tljax import checkpoint, ema, tree
from tljax.models import vit
from tljax.train import train_and_evaluate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import tiny_config  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Stochastic depth.

BLOCK = dict(mlp_dim=32, num_heads=2)


def _block_and_params(drop_path: float):
    block = vit.Encoder1DBlock(**BLOCK, drop_path=drop_path)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 5, 16))
    params = vit.Encoder1DBlock(**BLOCK).init(jax.random.PRNGKey(1), x)
    return block, params, x


def test_drop_path_is_the_identity_at_eval():
    block, params, x = _block_and_params(0.7)
    x = jnp.tile(x, (8, 1, 1))
    plain = vit.Encoder1DBlock(**BLOCK).apply(params, x)
    dropped = block.apply(params, x, train=False)
    assert jnp.array_equal(plain, dropped)
    # And a model built with a rate computes the same as one without, at eval.
    model = vit.ViT(patch_size=(4, 4), width=16, depth=3, mlp_dim=32, num_heads=2)
    images = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 8, 3))
    variables = model.init(jax.random.PRNGKey(3), images)
    with_rate = vit.ViT(patch_size=(4, 4), width=16, depth=3, mlp_dim=32, num_heads=2,
                        drop_path_rate=0.5)
    assert jnp.array_equal(model.apply(variables, images)[0],
                           with_rate.apply(variables, images, train=False)[0])


def test_drop_path_drops_whole_residual_branches_per_example():
    block, params, x = _block_and_params(0.5)
    batch = jnp.tile(x, (64, 1, 1))  # 64 copies of one example: only the draws differ
    out, captured = block.apply(params, batch, train=True, capture_intermediates=True,
                                rngs={"dropout": jax.random.PRNGKey(4)})
    inner = captured["intermediates"]
    attn = inner["MultiHeadDotProductAttention_0"]["__call__"][0]  # branch outputs
    mlp = inner["MlpBlock_0"]["__call__"][0]
    scale = 1 / (1 - 0.5)  # survivors are scaled by 1 / keep probability
    seen = set()
    for i in range(len(batch)):
        # Each branch is kept (scaled) or dropped for the whole example: one of 4 outcomes.
        matches = [(a, m) for a in (0, 1) for m in (0, 1) if np.allclose(
            out[i], batch[i] + a * scale * attn[i] + m * scale * mlp[i], rtol=0, atol=1e-5)]
        assert len(matches) == 1, f"example {i} is not a whole-branch outcome"
        seen.add(matches[0])
        if matches[0] == (0, 0):  # both dropped: the input passes exactly
            assert jnp.array_equal(out[i], batch[i])
    # 64 draws at p = 0.5: every outcome appears (each is missed with probability ~1e-8).
    assert seen == {(0, 0), (0, 1), (1, 0), (1, 1)}


def test_drop_path_rate_grows_linearly_with_depth():
    # depth 2, rate 1: block 0 gets 0 (always runs), block 1 gets 1 (never runs), so
    # training computes the first block only, then the final norm.
    model = vit.ViT(patch_size=(4, 4), width=16, depth=2, mlp_dim=32, num_heads=2,
                    pool_type="gap", drop_path_rate=1.0)
    one_block = vit.ViT(patch_size=(4, 4), width=16, depth=1, mlp_dim=32, num_heads=2,
                        pool_type="gap")
    images = jax.random.normal(jax.random.PRNGKey(5), (4, 8, 8, 3))
    variables = model.init(jax.random.PRNGKey(6), images)
    params = variables["params"]
    shallow = {"params": {**{k: v for k, v in params.items() if k != "Transformer"},
                          "Transformer": {"encoderblock_0": params["Transformer"][
                              "encoderblock_0"], "encoder_norm": params["Transformer"][
                              "encoder_norm"]}}}
    trained, _ = model.apply(variables, images, train=True,
                             rngs={"dropout": jax.random.PRNGKey(7)})
    np.testing.assert_allclose(trained, one_block.apply(shallow, images)[0], rtol=0, atol=1e-6)
    # With three blocks the middle one gets half the rate: at rate 1 it runs or not per
    # example, so outputs differ between examples given the same image.
    three = vit.ViT(patch_size=(4, 4), width=16, depth=3, mlp_dim=32, num_heads=2,
                    pool_type="gap", drop_path_rate=1.0)
    same = jnp.tile(images[:1], (32, 1, 1, 1))
    v3 = three.init(jax.random.PRNGKey(8), same)
    out = three.apply(v3, same, train=True, rngs={"dropout": jax.random.PRNGKey(9)})[0]
    distinct = {tuple(np.round(np.asarray(o), 4)) for o in out}
    assert 2 <= len(distinct) <= 4  # middle block's two branches: kept or dropped each


# ---------------------------------------------------------------------------------------------
# The weight average.


def _tree(seed: int) -> dict:
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {"a": {"kernel": jax.random.normal(keys[0], (3, 4)),
                  "bias": jax.random.normal(keys[1], (4,))},
            "b": jax.random.normal(keys[2], (5,)).astype(jnp.bfloat16)}


def test_ema_of_constant_weights_equals_the_weights():
    params = _tree(0)
    state = ema.init_state({"step": jnp.zeros((), jnp.int32), "params": params}, 0.999)

    def train_step(state, batch):  # an optimizer that never moves the weights
        return {**state, "step": state["step"] + 1}, {}

    step = jax.jit(ema.with_ema(train_step, 0.999))
    for _ in range(50):
        state, _ = step(state, {})
    for name, value in tree.flatten(params).items():
        assert tree.flatten(state["ema"])[name].dtype == value.dtype
        assert tree.flatten(state["ema"])[name].tobytes() == value.tobytes(), name


def test_ema_follows_the_warmed_up_recurrence():
    decay = 0.9
    targets = [_tree(s) for s in range(1, 8)]

    def train_step(state, batch):
        return {**state, "step": state["step"] + 1, "params": batch}, {}

    start = _tree(0)
    state = ema.init_state({"step": jnp.zeros((), jnp.int32), "params": start}, decay)
    step = jax.jit(ema.with_ema(train_step, decay))
    expected = {k: np.asarray(v, np.float64) for k, v in tree.flatten(start).items()}
    for t, params in enumerate(targets, start=1):
        state, _ = step(state, params)
        d = min(decay, (1 + t) / (10 + t))  # 0.18, 0.25, ... then capped at 0.9
        for k, v in tree.flatten(params).items():
            expected[k] = d * expected[k] + (1 - d) * np.asarray(v, np.float64)
    for name, value in tree.flatten(state["ema"]).items():
        tolerance = 1e-2 if value.dtype == jnp.bfloat16 else 1e-6
        np.testing.assert_allclose(np.asarray(value, np.float64), expected[name], rtol=0,
                                   atol=tolerance, err_msg=name)


def test_ema_disabled_leaves_the_step_and_state_alone():
    def train_step(state, batch):
        return state, {}

    assert ema.with_ema(train_step, None) is train_step
    state = {"params": _tree(0)}
    assert ema.init_state(state, None) is state
    assert ema.weights_to_evaluate(state) == [("", state["params"])]


def _state(workdir: str, step: int) -> dict:
    manager = ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"), options=ocp.CheckpointManagerOptions(
            read_only=True), item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                                            "data": ocp.JsonCheckpointHandler()})
    try:
        return checkpoint._restore_as_numpy(manager, step)  # noqa: SLF001 - the whole state
    finally:
        manager.close()


def test_ema_in_training_is_evaluated_checkpointed_and_resumes_exactly(tmp_path,
                                                                       fashion_mnist_dir):
    overrides = dict(total_steps=20, checkpoint_every_steps=10, eval_every_steps=10,
                     keep_checkpoints=2, ema_decay=0.9, freeze="last_k_blocks(1)",
                     **{"eval.split": "test[:256]"})
    reference = str(tmp_path / "reference")
    final = train_and_evaluate(tiny_config(**overrides), reference)
    assert {"accuracy", "loss", "ema/accuracy", "ema/loss"} <= set(final)
    assert final["ema/accuracy"] != final["accuracy"] or final["ema/loss"] != final["loss"]
    records = [json.loads(line) for line in open(os.path.join(reference, "metrics.jsonl"))]
    assert [r["step"] for r in records if r["kind"] == "eval" and "ema/accuracy" in r] == [
        10, 20]

    state = _state(reference, 20)
    params, average = tree.flatten(state["params"]), tree.flatten(state["ema"])
    assert params.keys() == average.keys()
    trained = {n for n in params if n.startswith(("head/", "Transformer/encoder_norm/"))}
    for name in params:
        if name in trained:  # moved: the average lags behind
            assert not np.array_equal(params[name], average[name]), name
        else:  # frozen: constant weights average to themselves, bit for bit
            assert params[name].tobytes() == average[name].tobytes(), name

    # Resume from checkpoint 10 alone: the same weights and average at step 20.
    resumed = str(tmp_path / "resumed")
    os.makedirs(os.path.join(resumed, "checkpoints"))
    shutil.copytree(os.path.join(reference, "checkpoints", "10"),
                    os.path.join(resumed, "checkpoints", "10"))
    shutil.copy(os.path.join(reference, "config.json"), resumed)
    again = train_and_evaluate(tiny_config(**overrides), resumed)
    assert again == final
    state_again = _state(resumed, 20)
    for key in ("params", "ema", "opt_state"):
        for name, value in tree.flatten(state[key]).items():
            assert value.tobytes() == tree.flatten(state_again[key])[name].tobytes(), (key,
                                                                                       name)


@pytest.mark.parametrize("decay", [-0.1, 1.5, "0.9"])
def test_ema_decay_out_of_range_is_refused(tmp_path, decay):
    from tljax.config import ConfigError

    with pytest.raises(ConfigError, match="ema_decay"):
        train_and_evaluate(tiny_config(ema_decay=decay), str(tmp_path))
    assert not os.path.exists(os.path.join(tmp_path, "config.json"))
