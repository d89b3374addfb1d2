"""Rematerialisation and scanned blocks change memory and compile time, not the function.

remat: every policy gives the gradients of the plain model, bitwise (float32, CPU: the
recomputed forward runs the same operations on the same inputs). scan: a scanned ViT with
the stacked parameters of an unscanned one computes the same outputs and gradients (1e-5
relative: the loop body is compiled apart from its neighbours, so fusions may differ).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tljax import tree
from tljax.models import bert, vit
from tljax.models.layers import REMAT_POLICIES
from tljax.pretrained import loading

VIT = dict(patch_size=(8, 8), width=32, depth=2, mlp_dim=64, num_heads=4, dropout=0.1)


def _vit_grads(params, images, **kwargs):
    model = vit.make(**{**VIT, **kwargs})

    def loss(p):
        features, out = model.apply({"params": p}, images, train=True,
                                    rngs={"dropout": jax.random.PRNGKey(7)})
        return jnp.sum(features**2) + jnp.mean(out["tokens"] ** 2)

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("policy", [p if p == "full" else pytest.param(p, marks=pytest.mark.slow)
                                    for p in sorted(REMAT_POLICIES)])
def test_vit_remat_gives_identical_gradients(policy):
    """With dropout active: the recomputed forward must redraw the same masks."""
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
    params = vit.make(**VIT).init(jax.random.PRNGKey(1), images)["params"]
    remat_params = vit.make(**VIT, remat=policy).init(jax.random.PRNGKey(1), images)["params"]
    assert tree.flatten(remat_params).keys() == tree.flatten(params).keys()
    loss, grads = _vit_grads(params, images)
    remat_loss, remat_grads = _vit_grads(params, images, remat=policy)
    assert float(loss) == float(remat_loss)
    for name, g in tree.flatten(grads).items():
        np.testing.assert_array_equal(tree.flatten(remat_grads)[name], g, err_msg=name)


def test_bert_remat_gives_identical_gradients():
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 50, (2, 10)), jnp.int32)
    inputs = {"input_ids": ids, "attention_mask": jnp.ones_like(ids).at[1, 6:].set(0)}

    def grads(remat):
        model = bert.make("tiny", vocab_size=50, remat=remat)
        params = model.init(jax.random.PRNGKey(1), inputs)["params"]

        def loss(p):
            features, _ = model.apply({"params": p}, inputs, train=True,
                                      rngs={"dropout": jax.random.PRNGKey(2)})
            return jnp.sum(features**2)

        return jax.jit(jax.grad(loss))(params)

    plain, remat = tree.flatten(grads(None)), tree.flatten(grads("full"))
    assert plain.keys() == remat.keys()
    for name, g in plain.items():
        np.testing.assert_array_equal(remat[name], g, err_msg=name)


@pytest.mark.slow  # ResNet-18 compiled twice: ~30 s on 2 idle cores
def test_resnet_remat_with_batch_statistics_gives_identical_gradients_and_stats():
    from tljax.models import resnet

    images = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))

    def grads(remat):
        model = resnet.make(depth=18, bn_update=True, remat=remat)
        variables = model.init(jax.random.PRNGKey(1), images)

        def loss(p):
            (features, _), new_state = model.apply(
                {"params": p, "batch_stats": variables["batch_stats"]}, images, train=True,
                mutable=["batch_stats"])
            return jnp.sum(features**2), new_state

        return jax.jit(jax.grad(loss, has_aux=True))(variables["params"])

    (plain, plain_stats), (rematted, remat_stats) = grads(None), grads("full")
    for name, g in tree.flatten(plain).items():
        np.testing.assert_array_equal(tree.flatten(rematted)[name], g, err_msg=name)
    for name, s in tree.flatten(plain_stats).items():
        np.testing.assert_array_equal(tree.flatten(remat_stats)[name], s, err_msg=name)


def test_unknown_remat_policy_is_refused():
    with pytest.raises(ValueError, match="expected None or one of"):
        vit.make(**VIT, remat="most").init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))


def test_scanned_vit_matches_unscanned_with_converted_parameters():
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
    params = vit.make(**VIT).init(jax.random.PRNGKey(1), images)["params"]
    scanned = vit.scan_params(params)
    shapes = {k: v.shape for k, v in tree.flatten(scanned).items()}
    assert shapes["Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel"] == (
        2, 32, 4, 8)
    assert not any("encoderblock_" in k for k in shapes)
    # The layout the module creates is the layout scan_params writes.
    init_scanned = vit.make(**VIT, scan=True).init(jax.random.PRNGKey(1), images)["params"]
    assert {k: v.shape for k, v in tree.flatten(init_scanned).items()} == shapes
    # Round trip is exact.
    back = tree.flatten(vit.unscan_params(scanned))
    for name, value in tree.flatten(params).items():
        np.testing.assert_array_equal(back[name], value)

    # Without dropout: the scanned blocks split the dropout rng in their own way.
    loss, grads = _vit_grads(params, images, dropout=0.0)
    scan_loss, scan_grads = _vit_grads(scanned, images, scan=True, remat="full", dropout=0.0)
    np.testing.assert_allclose(scan_loss, loss, rtol=1e-5)
    unscanned_grads = tree.flatten(vit.unscan_params(jax.device_get(scan_grads)))
    for name, g in tree.flatten(grads).items():
        scale = max(float(np.abs(g).max()), 1e-3)
        assert float(np.abs(unscanned_grads[name] - g).max()) / scale < 1e-5, name


def test_pretrained_unscanned_checkpoint_loads_into_scanned_model(monkeypatch):
    images = jnp.zeros((1, 32, 32, 3))
    params = vit.make(**VIT).init(jax.random.PRNGKey(1), images)["params"]
    target = jax.eval_shape(vit.make(**VIT, scan=True).init, jax.random.PRNGKey(0), images)
    from tljax.pretrained import api

    def fake_load(source, path, **hints):
        assert hints["num_heads"] == 4
        return {"params": jax.device_get(params)}, None

    monkeypatch.setattr(api, "load_converted", fake_load)
    loaded, _ = loading.read_init_checkpoint({"source": "big_vision", "path": "x.npz"}, target)
    merged = loading.merge_pretrained(target, loaded)
    np.testing.assert_array_equal(
        tree.flatten(merged)["params/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"][1],
        params["Transformer"]["encoderblock_1"]["MlpBlock_0"]["Dense_0"]["kernel"])
